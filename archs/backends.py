"""Which Pallas backend runs the lab's kernels (attention, Gated DeltaNet) on a JAX platform."""

from __future__ import annotations

from typing import Optional

import jax


def pallas_backend(platform: Optional[str] = None) -> str:
    """'gpu' (Triton), 'tpu' (Mosaic) or 'interpret' (anything else, e.g. CPU) for a JAX platform
    name (default: the default backend)."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "interpret"
