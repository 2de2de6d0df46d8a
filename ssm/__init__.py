"""Linear-recurrent token mixers: Gated DeltaNet and Mamba-2 (SSD).

Each kernel comes as a chunked (fast, parallel) form, a step-by-step ``lax.scan`` reference
with the same signature, and a single-token step for decoding; ``ssm.layers`` wraps them as
mixers of the shared block builder and registers them with ``archs.mixers`` (letters G, M).
"""

from .gated_delta import gated_delta_rule, gated_delta_rule_reference, gated_delta_step
from .layers import GatedDeltaNet, Mamba2
from .ssd import ssd, ssd_reference, ssd_step

__all__ = [
    "GatedDeltaNet",
    "Mamba2",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_delta_step",
    "ssd",
    "ssd_reference",
    "ssd_step",
]
