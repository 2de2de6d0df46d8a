"""Softmax attention ops by backend, each next to the reference it must match (`arch.attention_impl`).

    xla      attend: the dense reference. Builds the [B, T, S] mask and fp32 scores; any mask.
    blocked  attend_blocked: online softmax over blocks of keys (lax.scan, fp32 running max /
             denominator / output). Each block's mask is built inside the scan body from positions,
             segment ids, causal flag, window and block-diffusion block/clean arrays, and the body is
             rematerialised, so neither pass holds a [T, S] array: memory O(T * block) per head
             plus the scan's per-block carries. Computes every (query, key) pair (no block skipping).
    cudnn    jax.nn.dot_product_attention(implementation="cudnn"): GPU only, bf16/fp16, causal or
             bidirectional, causal sliding window, GQA; packed documents go in as a boolean mask
             (cuDNN adds it as a [B, 1, T, S] bias). Refuses block diffusion, bidirectional windows,
             different query / value head sizes (MLA), float32.
    pallas   GPU: jax.experimental.pallas.ops.gpu.attention.mha (Triton), TPU:
             jax.experimental.pallas.ops.tpu.flash_attention, anything else: the GPU kernel in
             interpret mode (exact, slow: for tests). Self-attention with segment ids, causal or
             not; GQA by repeating the kv heads (the kernels take one kv head per query head).
             Causality is by index, equal to the positions' rule for the contiguous positions of a
             training window. Refuses sliding windows, block diffusion, MLA head sizes.
    auto     GPU: cudnn where it can run the layer, else xla; TPU: pallas where it can, else xla;
             CPU: blocked once T * S >= BLOCKED_MIN_PAIRS, else xla.

Unsupported explicit choices are a ConfigError naming the fix: from the config where it holds the
information (check_attention_impl, called by archs.sizes.resolve), else when the layer is built
(platform) or traced (sequence lengths), always before anything compiles.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_tpu_attention

from archs.backends import pallas_backend
from archs.config import AttentionImpl, ModelConfig
from archs.context import BlockSpec, block_mask
from archs.errors import ConfigError

# CPU auto switches to blocked at a 2048 x 2048 score matrix: the dense path then holds fp32 scores
# and probabilities of 16 MiB each per (batch, head) for the backward pass, more than the whole
# activations of a small model's block; below it the dense GEMMs are faster and memory is not the
# limit.
BLOCKED_MIN_PAIRS = 2048 * 2048
BLOCK_K = 512  # keys per step of attend_blocked: [T, 512] fp32 scores per head live at a time
_NEG = -1e30  # masked score (finite: exp(_NEG - max) underflows to 0, no inf - inf = nan)
_PALLAS_GPU_MIN_TILE = 16  # Triton dot tiles


def attention_mask(q_pos_bt, k_pos_bs, *, causal: bool, window: int, q_seg_bt=None, k_seg_bs=None):
    """Boolean [B, T, S]: may query t attend to key s."""
    diff = q_pos_bt[:, :, None] - k_pos_bs[:, None, :]
    mask = jnp.ones(diff.shape, bool)
    if causal:
        mask &= diff >= 0
    if window:
        mask &= (diff < window) if causal else (jnp.abs(diff) < window)
    if q_seg_bt is not None:
        mask &= q_seg_bt[:, :, None] == k_seg_bs[:, None, :]
    return mask


def attend(q_bthd, k_bshd, v_bshd, mask_bts):
    """Softmax attention; query heads are grouped over the kv heads (GQA). Softmax in fp32.

    Both products run heads-major ([b, kv, g, t, d]): each is then one plain batched GEMM, and
    XLA's CPU backend needs no transposes of the [t, s] probabilities for the backward pass
    (forward + backward 25% faster than contracting in the token-major layout)."""
    n_kv = k_bshd.shape[2]
    q = rearrange(q_bthd, "b t (k g) d -> b k g t d", k=n_kv)
    k = rearrange(k_bshd, "b s k d -> b k s d")
    v = rearrange(v_bshd, "b s k d -> b k s d")
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * q_bthd.shape[-1] ** -0.5
    scores = jnp.where(mask_bts[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return rearrange(out, "b k g t d -> b t (k g) d")


class MaskSpec(NamedTuple):
    """What decides which keys a query sees, as per-token arrays (never a [B, T, S] mask)."""

    q_pos_bt: jax.Array
    k_pos_bs: jax.Array
    causal: bool
    window: int = 0
    q_seg_bt: Optional[jax.Array] = None  # packed documents; None: one document
    k_seg_bs: Optional[jax.Array] = None
    q_blocks: Optional[BlockSpec] = None  # block diffusion's block / clean arrays of queries and keys
    k_blocks: Optional[BlockSpec] = None

    def dense(self):
        """The [B, T, S] boolean mask (the xla path and the references)."""
        mask = attention_mask(self.q_pos_bt, self.k_pos_bs, causal=self.causal, window=self.window,
                              q_seg_bt=self.q_seg_bt, k_seg_bs=self.k_seg_bs)
        if self.q_blocks is not None:
            qb, kb = self.q_blocks, self.k_blocks
            mask &= block_mask(qb.block_bt, qb.clean_bt, kb.block_bt, kb.clean_bt)
        return mask


def attend_blocked(q_bthd, k_bshd, v_bshd, spec: MaskSpec, *, block_k: Optional[int] = None):
    """attend with the mask of `spec`, by online softmax over blocks of block_k keys (default BLOCK_K).

    Keys are padded to whole blocks; the padded tail is masked out by a `valid` flag. Every block
    computes its scores and mask, rescales the running output by exp(old max - new max) and adds
    its probabilities' weighted values (Milakov & Gimelshein 2018; FlashAttention). The block body
    is jax.checkpoint-ed: the backward pass recomputes each block's [T, block_k] scores from q and
    the block instead of storing them, keeping only the per-block carries."""
    b, t, h, dk = q_bthd.shape
    s, n_kv, dv = k_bshd.shape[1], k_bshd.shape[2], v_bshd.shape[3]
    blk = min(block_k or BLOCK_K, s)
    n_blk = -(-s // blk)
    pad = n_blk * blk - s

    def blocks(x_bs, fill=0):  # [B, S, ...] -> [n_blk, B, blk, ...], the tail padded with `fill`
        x_bs = jnp.pad(x_bs, [(0, 0), (0, pad)] + [(0, 0)] * (x_bs.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x_bs.reshape(b, n_blk, blk, *x_bs.shape[2:]), 1, 0)

    valid_bs = jnp.ones((b, s), bool)
    xs = {"k": blocks(k_bshd), "v": blocks(v_bshd), "pos": blocks(spec.k_pos_bs), "valid": blocks(valid_bs, False)}
    if spec.k_seg_bs is not None:
        xs["seg"] = blocks(spec.k_seg_bs)
    if spec.k_blocks is not None:
        xs["block"] = blocks(spec.k_blocks.block_bt)
        xs["clean"] = blocks(spec.k_blocks.clean_bt, False)
    q_bkgtd = rearrange(q_bthd, "b t (k g) d -> b k g t d", k=n_kv)
    scale = dk ** -0.5

    @jax.checkpoint
    def body(carry, x):
        m_bkgt, l_bkgt, o_bkgtd = carry
        k_bksd = rearrange(x["k"], "b s k d -> b k s d")
        v_bksd = rearrange(x["v"], "b s k d -> b k s d")
        # This block's mask, [B, T, blk], from per-token arrays.
        mask_bts = attention_mask(spec.q_pos_bt, x["pos"], causal=spec.causal, window=spec.window,
                                  q_seg_bt=spec.q_seg_bt, k_seg_bs=x.get("seg"))
        mask_bts &= x["valid"][:, None, :]
        if spec.q_blocks is not None:
            mask_bts &= block_mask(spec.q_blocks.block_bt, spec.q_blocks.clean_bt, x["block"], x["clean"])
        s_bkgts = jnp.einsum("bkgtd,bksd->bkgts", q_bkgtd, k_bksd, preferred_element_type=jnp.float32) * scale
        s_bkgts = jnp.where(mask_bts[:, None, None], s_bkgts, _NEG)
        m_new = jnp.maximum(m_bkgt, s_bkgts.max(-1))
        # where(): a query with no visible key so far has m_new = _NEG, and exp(_NEG - _NEG) = 1
        p_bkgts = jnp.where(mask_bts[:, None, None], jnp.exp(s_bkgts - m_new[..., None]), 0.0)
        corr = jnp.exp(m_bkgt - m_new)
        l_new = l_bkgt * corr + p_bkgts.sum(-1)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p_bkgts.astype(v_bksd.dtype), v_bksd,
                        preferred_element_type=jnp.float32)
        return (m_new, l_new, o_bkgtd * corr[..., None] + pv), None

    g = h // n_kv
    init = (jnp.full((b, n_kv, g, t), _NEG, jnp.float32), jnp.zeros((b, n_kv, g, t), jnp.float32),
            jnp.zeros((b, n_kv, g, t, dv), jnp.float32))
    (_, l_bkgt, o_bkgtd), _ = jax.lax.scan(body, init, xs)
    out = o_bkgtd / jnp.maximum(l_bkgt, 1e-30)[..., None]  # a query seeing no key gets 0
    return rearrange(out, "b k g t d -> b t (k g) d").astype(v_bshd.dtype)


# --- cuDNN and Pallas -----------------------------------------------------------------------------


def attend_cudnn(q_bthd, k_bshd, v_bshd, spec: MaskSpec):
    """cuDNN flash attention. The causal window of `attention_mask` (0 <= t - s < window) is
    cuDNN's left window of window - 1 keys; packed documents are a boolean mask. Causality and
    windows are by index: the positions' rule for the contiguous positions of a training window."""
    mask = None
    if spec.q_seg_bt is not None:
        mask = (spec.q_seg_bt[:, :, None] == spec.k_seg_bs[:, None, :])[:, None]
    window = (spec.window - 1, 0) if spec.window else None
    return jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, mask=mask, is_causal=spec.causal,
                                        local_window_size=window, implementation="cudnn")


def _pow2_tile(n: int, cap: int = 128) -> int:
    """The largest power of two <= cap dividing n (the kernels need whole tiles)."""
    tile = 1
    while tile * 2 <= cap and n % (tile * 2) == 0:
        tile *= 2
    return tile


def attend_pallas(q_bthd, k_bshd, v_bshd, spec: MaskSpec, *, backend: str):
    """Pallas flash attention (backend gpu | tpu | interpret); kv heads repeated to the query heads."""
    h, n_kv = q_bthd.shape[2], k_bshd.shape[2]
    k_bshd = repeat(k_bshd, "b s k d -> b s (k g) d", g=h // n_kv)
    v_bshd = repeat(v_bshd, "b s k d -> b s (k g) d", g=h // n_kv)
    scale = q_bthd.shape[-1] ** -0.5
    if backend == "tpu":
        seg = None
        if spec.q_seg_bt is not None:
            seg = pallas_tpu_attention.SegmentIds(q=spec.q_seg_bt, kv=spec.k_seg_bs)
        q, k, v = (rearrange(x, "b t h d -> b h t d") for x in (q_bthd, k_bshd, v_bshd))
        out = pallas_tpu_attention.flash_attention(q, k, v, segment_ids=seg, causal=spec.causal, sm_scale=scale)
        return rearrange(out, "b h t d -> b t h d")
    t = q_bthd.shape[1]
    tile = _pow2_tile(t)
    if backend == "gpu" and tile < _PALLAS_GPU_MIN_TILE:
        raise ConfigError(f"arch.attention_impl=pallas on GPU needs a sequence length divisible by "
                          f"{_PALLAS_GPU_MIN_TILE} (Triton tiles), got {t}; use arch.attention_impl=auto or xla")
    sizes = pallas_gpu_attention.BlockSizes(block_q=tile, block_k=tile, block_q_dkv=min(tile, 32),
                                            block_kv_dkv=min(tile, 32), block_q_dq=min(tile, 32),
                                            block_kv_dq=min(tile, 32))
    return pallas_gpu_attention.mha(q_bthd, k_bshd, v_bshd, spec.q_seg_bt, sm_scale=scale, causal=spec.causal,
                                    block_sizes=sizes, interpret=backend == "interpret")


# --- selection -----------------------------------------------------------------------------------


class AttnShape(NamedTuple):
    """What decides which implementations can run one attention call."""

    causal: bool
    window: int = 0
    blocks: bool = False  # block diffusion's block-causal mask
    head_dim: int = 32  # query / key head size
    v_head_dim: int = 32
    float32: bool = False  # computes in float32
    self_attention: bool = True  # queries and keys are the same tokens (not a cache)


def _refusal(impl: AttentionImpl, a: AttnShape) -> Optional[str]:
    """Why impl cannot run `a` (whatever the platform), or None when it can."""
    fix = "use arch.attention_impl=auto, xla or blocked"
    if impl is AttentionImpl.cudnn:
        if a.blocks:
            return f"arch.attention_impl=cudnn cannot express block diffusion's block-causal mask; {fix}"
        if a.window and not a.causal:
            return (f"arch.attention_impl=cudnn has no bidirectional sliding window (cuDNN windows are causal); "
                    f"{fix}")
        if a.head_dim != a.v_head_dim:
            return f"arch.attention_impl=cudnn needs equal query and value head sizes (not MLA's); {fix}"
        if a.head_dim % 8 or a.head_dim > 256:
            return f"arch.attention_impl=cudnn needs a head size that is a multiple of 8 and <= 256; {fix}"
        if a.float32:
            return "arch.attention_impl=cudnn runs in bfloat16 / float16 only; set arch.dtype=auto or bfloat16"
    if impl is AttentionImpl.pallas:
        if a.window:
            return f"arch.attention_impl=pallas has no sliding window (S layers); {fix}"
        if a.blocks:
            return f"arch.attention_impl=pallas cannot express block diffusion's block-causal mask; {fix}"
        if a.head_dim != a.v_head_dim:
            return f"arch.attention_impl=pallas needs equal query and value head sizes (not MLA's); {fix}"
        if not a.self_attention:
            return f"arch.attention_impl=pallas runs self-attention over one window only; {fix}"
    return None


def parse_attention_impl(impl) -> AttentionImpl:
    try:
        return AttentionImpl(impl)
    except ValueError:
        raise ConfigError(f"arch.attention_impl={impl!r} is not one of "
                          f"{'|'.join(m.value for m in AttentionImpl)}") from None


def resolve_attention_impl(impl, a: AttnShape, *, q_len: int = 0, kv_len: int = 0,
                           platform: Optional[str] = None) -> AttentionImpl:
    """arch.attention_impl -> the concrete xla | blocked | cudnn | pallas for one call on `platform`
    (auto by the module docstring's rule; q_len, kv_len: 0 when not known yet). An explicit choice
    that cannot run is a ConfigError."""
    impl = parse_attention_impl(impl)
    backend = pallas_backend(platform)
    if impl is AttentionImpl.auto:
        if backend == "gpu" and _refusal(AttentionImpl.cudnn, a) is None:
            return AttentionImpl.cudnn
        if backend == "tpu" and _refusal(AttentionImpl.pallas, a) is None:
            return AttentionImpl.pallas
        if backend == "interpret" and q_len * kv_len >= BLOCKED_MIN_PAIRS:
            return AttentionImpl.blocked
        return AttentionImpl.xla
    why = _refusal(impl, a)
    if why:
        raise ConfigError(why)
    if impl is AttentionImpl.cudnn and backend != "gpu":
        raise ConfigError(f"arch.attention_impl=cudnn needs a GPU (this backend is {jax.default_backend()!r} "
                          "if not told otherwise); use arch.attention_impl=auto, xla or blocked")
    return impl


def check_attention_impl(cfg: ModelConfig) -> None:
    """The config-time part of resolve_attention_impl for every attention layer of the pattern
    (cfg resolved: head sizes known); the platform and lengths are checked later."""
    impl = parse_attention_impl(cfg.attention_impl)
    if impl in (AttentionImpl.auto, AttentionImpl.xla, AttentionImpl.blocked):
        return
    common = dict(causal=cfg.causal, blocks=cfg.objective == "block_diffusion", float32=cfg.dtype == "float32")
    shapes = {"A": AttnShape(head_dim=cfg.head_dim, v_head_dim=cfg.head_dim, **common),
              "S": AttnShape(window=cfg.window, head_dim=cfg.head_dim, v_head_dim=cfg.head_dim, **common),
              "L": AttnShape(head_dim=cfg.head_dim + cfg.mla.rope_dim, v_head_dim=cfg.head_dim, **common)}
    for letter in dict.fromkeys(cfg.pattern):
        if letter in shapes:
            why = _refusal(impl, shapes[letter])
            if why:
                raise ConfigError(why)


def attention(q_bthd, k_bshd, v_bshd, spec: MaskSpec, *, impl, platform: Optional[str] = None):
    """Softmax attention of q over k, v under the mask of `spec`, by the implementation
    arch.attention_impl selects for this call (resolve_attention_impl)."""
    a = AttnShape(causal=spec.causal, window=spec.window, blocks=spec.q_blocks is not None,
                  head_dim=q_bthd.shape[-1], v_head_dim=v_bshd.shape[-1], float32=q_bthd.dtype == jnp.float32,
                  self_attention=q_bthd.shape[1] == k_bshd.shape[1])
    chosen = resolve_attention_impl(impl, a, q_len=q_bthd.shape[1], kv_len=k_bshd.shape[1], platform=platform)
    if chosen is AttentionImpl.blocked:
        return attend_blocked(q_bthd, k_bshd, v_bshd, spec)
    if chosen is AttentionImpl.cudnn:
        return attend_cudnn(q_bthd, k_bshd, v_bshd, spec)
    if chosen is AttentionImpl.pallas:
        return attend_pallas(q_bthd, k_bshd, v_bshd, spec, backend=pallas_backend(platform))
    return attend(q_bthd, k_bshd, v_bshd, spec.dense())


def warn_if_interpreted(impl, platform: Optional[str] = None) -> None:
    if parse_attention_impl(impl) is AttentionImpl.pallas and pallas_backend(platform) == "interpret":
        warnings.warn("arch.attention_impl=pallas on a CPU runs the Pallas GPU kernel in interpret mode (exact, "
                      "slow: for tests); arch.attention_impl=auto picks xla or blocked here", stacklevel=3)


__all__ = ["BLOCKED_MIN_PAIRS", "AttnShape", "MaskSpec", "attend", "attend_blocked", "attend_cudnn", "attend_pallas",
           "attention", "attention_mask", "check_attention_impl", "resolve_attention_impl",
           "warn_if_interpreted"]
