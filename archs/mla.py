"""Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values from a shared latent.

Per token (d_model x, n heads of head_dim d_h, RoPE dims d_r, latent rank r):
    c_kv = RMSNorm(W_dkv x)                    [r]     the latent, all a decoding cache keeps
    k_rope = RoPE(W_kr x)                      [d_r]   one RoPE key shared by every head (cached too)
    k_h = [W_uk,h c_kv ; k_rope]   v_h = W_uv,h c_kv   per-head up-projections
    q_h = [W_q,h x ; RoPE(W_qr,h x)]           (with q_rank: from c_q = RMSNorm(W_dq x) instead of x)
    o = W_o [gate ⊙ softmax(q_h . k_h / sqrt(d_h + d_r)) v_h]_h
W_dkv and W_kr are one projection (d_model -> r + d_r); the gate is the optional sigmoid output
gate of `attn_gate`. Training and scoring use this unabsorbed form (per-head keys and values
materialised: cheaper when the sequence is long). Decoding absorbs the up-projections:
q_h . W_uk,h c = (W_uk,h^T q_h) . c scores the query against the cached latent directly, and
sum_s p_s W_uv,h c_s = W_uv,h (sum_s p_s c_s) moves the value projection after the weighted sum,
so the cache holds r + d_r numbers per token instead of 2 n d_h. Masks (causal or bidirectional,
packed documents) are Attention's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from archs.attention import attention_mask, attention_pairs
from archs.attention_ops import AttnShape, MaskSpec, attention, resolve_attention_impl, warn_if_interpreted
from archs.config import ModelConfig
from archs.context import Ctx
from archs.layers import RMSNorm, apply_rope, compute_dtype, linear, rope_tables


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        m = cfg.mla
        d, h, dh, dr, r = cfg.d_model, cfg.n_heads, cfg.head_dim, m.rope_dim, m.kv_rank
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        if m.q_rank:
            self.wq_down = linear(cfg, d, m.q_rank, ("embed", "latent"), rngs=rngs)
            self.q_norm = RMSNorm(m.q_rank)
            self.wq = linear(cfg, m.q_rank, h * (dh + dr), ("latent", "heads"), rngs=rngs)
        else:
            self.wq = linear(cfg, d, h * (dh + dr), ("embed", "heads"), rngs=rngs)
        self.wkv_down = linear(cfg, d, r + dr, ("embed", "latent"), rngs=rngs)
        self.kv_norm = RMSNorm(r)
        self.wk_up = linear(cfg, r, h * dh, ("latent", "heads"), rngs=rngs)
        self.wv_up = linear(cfg, r, h * dh, ("latent", "heads"), rngs=rngs)
        self.wo = linear(cfg, h * dh, d, ("heads", "embed"), rngs=rngs, std=out_std)
        if cfg.attn_gate:
            self.w_gate = linear(cfg, d, h * dh, ("embed", "heads"), rngs=rngs)
        resolve_attention_impl(cfg.attention_impl, AttnShape(causal=cfg.causal, head_dim=dh + dr, v_head_dim=dh,
                                                             float32=compute_dtype(cfg) == jnp.float32))
        warn_if_interpreted(cfg.attention_impl)

    def _q(self, x_btd, cos, sin):
        """(q_nope [b, t, h, d_h], q_rope [b, t, h, d_r] rotated)."""
        cfg = self.cfg
        src = self.q_norm(self.wq_down(x_btd)) if cfg.mla.q_rank else x_btd
        q = rearrange(self.wq(src), "b t (h d) -> b t h d", h=cfg.n_heads)
        return q[..., : cfg.head_dim], apply_rope(q[..., cfg.head_dim:], cos, sin)

    def _latent(self, x_btd, cos, sin):
        """(c_kv [b, t, r] normalised, k_rope [b, t, d_r] rotated): what the cache stores."""
        ckr = self.wkv_down(x_btd)
        r = self.cfg.mla.kv_rank
        return self.kv_norm(ckr[..., :r]), apply_rope(ckr[..., None, r:], cos, sin)[:, :, 0]

    def _out(self, x_btd, o_bthd):
        o = rearrange(o_bthd, "b t h d -> b t (h d)")
        if self.cfg.attn_gate:
            o = o * jax.nn.sigmoid(self.w_gate(x_btd))
        return self.wo(o)

    def __call__(self, x_btd, ctx: Ctx, cache=None):
        cfg = self.cfg
        cos, sin = rope_tables(ctx.positions, cfg.mla.rope_dim, cfg.rope_theta)
        q_nope, q_rope = self._q(x_btd, cos, sin)
        c_kv, k_rope = self._latent(x_btd, cos, sin)
        if cache is None:
            k_nope = rearrange(self.wk_up(c_kv), "b t (h d) -> b t h d", h=cfg.n_heads)
            v = rearrange(self.wv_up(c_kv), "b t (h d) -> b t h d", h=cfg.n_heads)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))], -1)
            q = jnp.concatenate([q_nope, q_rope], axis=-1)
            spec = MaskSpec(ctx.positions, ctx.positions, causal=cfg.causal, q_seg_bt=ctx.segment_ids,
                            k_seg_bs=ctx.segment_ids)
            return self._out(x_btd, attention(q, k, v, spec, impl=cfg.attention_impl))  # decode below: xla
        # Decoding: write the latent, attend in latent space with the up-projections absorbed.
        start = ctx.positions[0, 0]
        c_cache = jax.lax.dynamic_update_slice_in_dim(cache["c_kv"], c_kv.astype(cache["c_kv"].dtype), start, axis=1)
        r_cache = jax.lax.dynamic_update_slice_in_dim(cache["k_rope"], k_rope.astype(cache["k_rope"].dtype), start,
                                                      axis=1)
        seg = ctx.segment_ids if ctx.segment_ids is not None else jnp.zeros_like(ctx.positions)
        seg_cache = jax.lax.dynamic_update_slice_in_dim(cache["seg"], seg, start, axis=1)
        b, s = seg_cache.shape
        k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
        written = k_pos < start + x_btd.shape[1]
        mask = attention_mask(ctx.positions, k_pos, causal=cfg.causal, window=0,
                              q_seg_bt=seg, k_seg_bs=seg_cache) & written[:, None, :]
        dt = compute_dtype(cfg)
        w_uk = rearrange(self.wk_up.kernel[...].astype(dt), "r (h d) -> r h d", h=cfg.n_heads)
        w_uv = rearrange(self.wv_up.kernel[...].astype(dt), "r (h d) -> r h d", h=cfg.n_heads)
        q_lat = jnp.einsum("bthd,rhd->bhtr", q_nope, w_uk)
        scores = (jnp.einsum("bhtr,bsr->bhts", q_lat, c_cache, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthe,bse->bhts", q_rope, r_cache, preferred_element_type=jnp.float32))
        scores = scores * (cfg.head_dim + cfg.mla.rope_dim) ** -0.5
        scores = jnp.where(mask[:, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(c_cache.dtype)
        o_lat = jnp.einsum("bhts,bsr->bthr", probs, c_cache)
        o = jnp.einsum("bthr,rhd->bthd", o_lat, w_uv)
        return self._out(x_btd, o), {"c_kv": c_cache, "k_rope": r_cache, "seg": seg_cache}

    def init_cache(self, batch: int, max_len: int, dtype):
        m = self.cfg.mla
        return {"c_kv": jnp.zeros((batch, max_len, m.kv_rank), dtype),
                "k_rope": jnp.zeros((batch, max_len, m.rope_dim), dtype),
                "seg": jnp.zeros((batch, max_len), jnp.int32)}


# --- FLOPs (conventions in archs/flops.py) ------------------------------------------------------


def mla_flops(cfg: ModelConfig, seq_len: int, *, executed: bool) -> float:
    """Forward FLOPs of one MLA mixer for one sequence, in the unabsorbed training form."""
    m, t = cfg.mla, seq_len
    d, h, dh, dr, r = cfg.d_model, cfg.n_heads, cfg.head_dim, m.rope_dim, m.kv_rank
    q = 2 * t * (d * m.q_rank + m.q_rank * h * (dh + dr)) if m.q_rank else 2 * t * d * h * (dh + dr)
    kv = 2 * t * d * (r + dr) + 2 * t * r * 2 * h * dh  # latent + RoPE key, then per-head k and v
    out = 2 * t * h * dh * d * (2 if cfg.attn_gate else 1)  # output projection (and gate)
    pairs = attention_pairs(t, causal=cfg.causal, window=0, executed=executed)
    return q + kv + out + 2 * pairs * h * (dh + dr) + 2 * pairs * h * dh


def mla_state_bytes(cfg: ModelConfig, seq_len: int) -> float:
    """Bytes of decode state per sequence after seq_len tokens: the latent c_kv and the shared
    RoPE key of every position, in the compute dtype (the cache's segment ids are bookkeeping)."""
    itemsize = jnp.dtype(compute_dtype(cfg)).itemsize
    return float(seq_len * (cfg.mla.kv_rank + cfg.mla.rope_dim) * itemsize)
