"""Building blocks shared by every arch: projections with logical axis names, RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from archs.config import ModelConfig
from archs.sizes import mlp_hidden


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def partitioned(init, axes: tuple[str, ...]):
    """An initializer whose variable carries logical axis names.

    Variables are created unsharded (no eager sharding) and placed by the engine through
    archs.sharding, so the same module code runs with or without a mesh.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


class Linear(nnx.Linear):
    """nnx.Linear applied to a flattened [tokens, d_in] view of its input. With more than one
    leading axis XLA's CPU backend transposes activations for the weight-gradient GEMM (it
    contracts two axes); one GEMM over the flattened tokens avoids those copies (MLP forward +
    backward 23% faster at d=512). Same parameters, names and shardings as nnx.Linear."""

    def __call__(self, x):
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs, std=None, bias=False):
    """A projection whose kernel carries logical axis names (mapped to the mesh by archs.sharding)."""
    init = nnx.initializers.normal(cfg.init_std if std is None else std)
    return Linear(
        d_in,
        d_out,
        use_bias=bias,
        kernel_init=partitioned(init, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "norm"):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,), eager_sharding=False)
        self.eps = eps

    def __call__(self, x):
        # Statistics in fp32 whatever the compute dtype: bf16 mean-of-squares drifts.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, hidden: int = 0, rngs: nnx.Rngs):
        h = hidden or mlp_hidden(cfg)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # residual-branch scaling (GPT-2)
        self.w_gate = linear(cfg, cfg.d_model, h, ("embed", "mlp"), rngs=rngs)
        self.w_up = linear(cfg, cfg.d_model, h, ("embed", "mlp"), rngs=rngs)
        self.w_down = linear(cfg, h, cfg.d_model, ("mlp", "embed"), rngs=rngs, std=out_std)

    def __call__(self, x_btd):
        return self.w_down(jax.nn.silu(self.w_gate(x_btd)) * self.w_up(x_btd))


def rope_tables(positions_bt, head_dim: int, theta: float):
    """cos, sin of shape [B, T, head_dim // 2] for rotate-half RoPE."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthd, cos_btf, sin_btf):
    """Rotate pairs (x_i, x_{i + d/2}) by position-dependent angles (Llama's rotate-half layout)."""
    x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_btf[:, :, None, :], sin_btf[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)
