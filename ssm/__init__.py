"""Pure-JAX linear-recurrence kernels: Gated DeltaNet and Mamba-2 SSD.

Each kernel comes as a chunked (fast, parallel) form, a step-by-step ``lax.scan`` reference
with the same signature, and a single-token step for decoding.
"""

from .gated_delta import gated_delta_rule, gated_delta_rule_reference, gated_delta_step
from .ssd import ssd, ssd_reference, ssd_step

__all__ = [
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_delta_step",
    "ssd",
    "ssd_reference",
    "ssd_step",
]
