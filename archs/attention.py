"""Multi-head attention with grouped-query heads, RoPE, optional q/k norm and sliding window.

Causal or bidirectional; documents packed into one window are masked from each other when the
context carries segment ids. The whole-window kernel is arch.attention_impl's (archs.attention_ops);
a KV cache gives incremental decoding with the same numerics as the full forward pass, always on the
xla path (a step has few queries). With `attn_gate` every head's output is multiplied elementwise
by sigmoid(x W_g) of the layer input before the output projection (gated attention, Qiu et al.
2025, as in Qwen3-Next).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from archs.attention_ops import (AttnShape, MaskSpec, attend, attention, attention_mask, resolve_attention_impl,
                                 warn_if_interpreted)
from archs.config import ModelConfig
from archs.context import Ctx
from archs.layers import RMSNorm, apply_rope, compute_dtype, linear, rope_tables


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, window: int = 0, rngs: nnx.Rngs):
        self.cfg = cfg
        self.window = window
        h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wq = linear(cfg, d, h * hd, ("embed", "heads"), rngs=rngs)
        self.wk = linear(cfg, d, kv * hd, ("embed", "kv_heads"), rngs=rngs)
        self.wv = linear(cfg, d, kv * hd, ("embed", "kv_heads"), rngs=rngs)
        self.wo = linear(cfg, h * hd, d, ("heads", "embed"), rngs=rngs, std=out_std)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd)
            self.k_norm = RMSNorm(hd)
        if cfg.attn_gate:
            self.w_gate = linear(cfg, d, h * hd, ("embed", "heads"), rngs=rngs)
        # An implementation this layer cannot run on this platform fails here, before anything compiles.
        resolve_attention_impl(cfg.attention_impl, self._shape(blocks=cfg.objective == "block_diffusion"))
        warn_if_interpreted(cfg.attention_impl)

    def _shape(self, *, blocks: bool) -> AttnShape:
        cfg = self.cfg
        return AttnShape(causal=cfg.causal, window=self.window, blocks=blocks, head_dim=cfg.head_dim,
                         v_head_dim=cfg.head_dim, float32=compute_dtype(cfg) == jnp.float32)

    def _qkv(self, x_btd, ctx: Ctx):
        cfg = self.cfg
        q = rearrange(self.wq(x_btd), "b t (h d) -> b t h d", d=cfg.head_dim)
        k = rearrange(self.wk(x_btd), "b t (h d) -> b t h d", d=cfg.head_dim)
        v = rearrange(self.wv(x_btd), "b t (h d) -> b t h d", d=cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_tables(ctx.positions, cfg.head_dim, cfg.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x_btd, ctx: Ctx, cache=None):
        q, k, v = self._qkv(x_btd, ctx)
        if cache is None:
            # block diffusion's [noisy; clean] pass carries ctx.blocks
            spec = MaskSpec(ctx.positions, ctx.positions, causal=self.cfg.causal, window=self.window,
                            q_seg_bt=ctx.segment_ids, k_seg_bs=ctx.segment_ids,
                            q_blocks=ctx.blocks, k_blocks=ctx.blocks)
            out = attention(q, k, v, spec, impl=self.cfg.attention_impl)
            return self._out(x_btd, out)
        # Incremental decoding: write the new keys at their positions, attend over the cache.
        start = ctx.positions[0, 0]
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, axis=1)
        seg = ctx.segment_ids if ctx.segment_ids is not None else jnp.zeros_like(ctx.positions)
        seg_cache = jax.lax.dynamic_update_slice_in_dim(cache["seg"], seg, start, axis=1)
        b, s = seg_cache.shape
        k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
        written = k_pos < start + x_btd.shape[1]
        mask = attention_mask(
            ctx.positions, k_pos, causal=self.cfg.causal, window=self.window,
            q_seg_bt=seg, k_seg_bs=seg_cache,
        ) & written[:, None, :]
        out = attend(q, k_cache, v_cache, mask)
        new_cache = {"k": k_cache, "v": v_cache, "seg": seg_cache}
        return self._out(x_btd, out), new_cache

    def _out(self, x_btd, o_bthd):
        o = rearrange(o_bthd, "b t h d -> b t (h d)")
        if self.cfg.attn_gate:
            o = o * jax.nn.sigmoid(self.w_gate(x_btd))
        return self.wo(o)

    def init_cache(self, batch: int, max_len: int, dtype):
        shape = (batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "seg": jnp.zeros((batch, max_len), jnp.int32)}


# --- FLOPs (conventions in archs/flops.py) ------------------------------------------------------


def attention_pairs(seq_len: int, *, causal: bool, window: int, executed: bool) -> float:
    """Number of (query, key) pairs attention evaluates for one sequence."""
    t = seq_len
    if executed:  # every attention_impl computes all pairs (blocked too: it skips no key block)
        return float(t * t)
    if window and window < t:
        if causal:
            # each query sees min(pos + 1, window) keys
            return float(window * (window + 1) / 2 + (t - window) * window)
        # symmetric band |i - j| < window
        return float(t * (2 * window - 1) - window * (window - 1))
    return t * (t + 1) / 2 if causal else float(t * t)


def block_attention_pairs(seq_len: int, block_size: int, *, window: int, executed: bool) -> float:
    """(query, key) pairs of block diffusion's vectorised pass over [noisy; clean] (2T tokens,
    archs.context.BlockSpec's rule) for one sequence of T = seq_len scored tokens.

    Without a window, block b (0-based, n = T / L blocks) has L noisy queries seeing L + b L keys
    and L clean queries seeing (b + 1) L keys: T (T + L) pairs in all (L = T: 2 T^2, L = 1:
    T (T + 1)). A window (|i - j| < window between positions) keeps only the pairs inside it.
    executed=True: the dense [2T, 2T] product a masked kernel computes."""
    t, blk = seq_len, block_size
    if executed:
        return float(4 * t * t)
    if not window or window >= t:
        return float(t * (t + blk))
    p = np.arange(t)
    start = p // blk * blk  # first position of the query's block

    def keys_in(lo, hi):  # keys at positions [lo, hi) within the window of each query
        return np.maximum(0, np.minimum(hi, p + window) - np.maximum(lo, p - window + 1))

    noisy = keys_in(start, start + blk) + keys_in(0, start)
    clean = keys_in(0, start + blk)
    return float(noisy.sum() + clean.sum())


def attention_flops(cfg: ModelConfig, seq_len: int, *, window: int, executed: bool) -> float:
    """Forward FLOPs of one attention mixer (projections, scores and weighted sum) for one sequence.

    Block diffusion runs its [noisy; clean] concatenation: 2 T tokens through the projections and
    the pairs block_attention_pairs counts."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if cfg.objective == "block_diffusion":
        tokens = 2 * seq_len
        pairs = block_attention_pairs(seq_len, cfg.block_size, window=window, executed=executed)
    else:
        tokens = seq_len
        pairs = attention_pairs(seq_len, causal=cfg.causal, window=window, executed=executed)
    proj = 2 * tokens * d * hd * (2 * h + 2 * kv + (h if cfg.attn_gate else 0))  # q, o, k, v (and gate)
    return proj + 2 * 2 * pairs * hd * h


def attention_state_bytes(cfg: ModelConfig, seq_len: int, *, window: int) -> float:
    """Bytes of decode state per sequence after seq_len tokens: keys and values of every position
    a query can still see (all of them; the last `window` for sliding-window attention), in the
    compute dtype, for n_kv_heads heads of head_dim. The cache's segment ids (document-mask
    bookkeeping, one int32 per position) are not model state and are not counted."""
    visible = min(seq_len, window) if window else seq_len
    itemsize = jnp.dtype(compute_dtype(cfg)).itemsize
    return float(2 * visible * cfg.n_kv_heads * cfg.head_dim * itemsize)
