"""arch.attention_impl: every implementation that runs on a CPU (xla, blocked, pallas in interpret
mode) against an independent float64 numpy reference, forward and gradients; blocked's memory at a
long sequence; a whole model on blocked vs xla; the refusals of impossible combinations."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import archs.attention_ops as ops
from archs.attention_ops import AttnShape, MaskSpec, attend, attend_blocked, attend_pallas, resolve_attention_impl
from archs.config import AttentionImpl, ModelConfig
from archs.context import BlockSpec, Ctx
from archs.errors import ConfigError
from archs.model import Model
from archs.sizes import resolve
from conftest import compile_fast

# --- the float64 reference ----------------------------------------------------------------------


def ref_mask(q_pos, k_pos, *, causal, window, q_seg=None, k_seg=None, q_blk=None, k_blk=None):
    """[B, T, S] by explicit loops over the rules (not archs' code)."""
    b, t = q_pos.shape
    s = k_pos.shape[1]
    m = np.zeros((b, t, s), bool)
    for bi in range(b):
        for i in range(t):
            for j in range(s):
                d = q_pos[bi, i] - k_pos[bi, j]
                ok = d >= 0 if causal else True
                if window:
                    ok &= (d < window) if causal else (abs(d) < window)
                if q_seg is not None:
                    ok &= q_seg[bi, i] == k_seg[bi, j]
                if q_blk is not None:
                    (qb, qc), (kb, kc) = (q_blk[0][bi, i], q_blk[1][bi, i]), (k_blk[0][bi, j], k_blk[1][bi, j])
                    ok &= (kc and kb <= qb) if qc else ((kb < qb) if kc else (not kc and kb == qb))
                m[bi, i, j] = ok
    return m


def ref_attention(q, k, v, mask, dout):
    """(out, dq, dk, dv) of softmax attention in float64 with GQA; dout is the output cotangent."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out, dq = np.zeros((b, t, h, v.shape[3])), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            kh = hi // g
            s = q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(d)
            s = np.where(mask[bi], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, hi] = p @ v[bi, :, kh]
            dp = dout[bi, :, hi] @ v[bi, :, kh].T
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            dq[bi, :, hi] = ds @ k[bi, :, kh] / np.sqrt(d)
            dk[bi, :, kh] += ds.T @ q[bi, :, hi] / np.sqrt(d)
            dv[bi, :, kh] += p.T @ dout[bi, :, hi]
    return out, dq, dk, dv


# --- cases ----------------------------------------------------------------------------------------

# name: (causal, window, heads, kv heads, packed segments, T)
CASES = {
    "causal": (True, 0, 2, 2, False, 24),
    "bidirectional": (False, 0, 2, 2, False, 24),
    "sliding_causal": (True, 5, 2, 2, False, 24),
    "sliding_bidirectional": (False, 4, 2, 2, False, 24),
    "gqa": (True, 0, 4, 1, False, 24),
    "segments": (False, 0, 4, 2, True, 24),
    "ragged_tail": (True, 6, 4, 2, True, 29),  # 29 keys: not a multiple of the block of 8
}
PALLAS_OK = {"causal", "bidirectional", "gqa", "segments"}  # pallas refuses windows (test_refusals)
BLOCK = 8  # keys per block of attend_blocked here: several blocks per sequence


def _inputs(case, seed=0):
    causal, window, h, kv, packed, t = CASES[case]
    r = np.random.default_rng(seed)
    b, d = 2, 8
    q = r.normal(size=(b, t, h, d)).astype(np.float32)
    k = r.normal(size=(b, t, kv, d)).astype(np.float32)
    v = r.normal(size=(b, t, kv, d)).astype(np.float32)
    dout = r.normal(size=(b, t, h, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t), (b, t))
    seg = np.cumsum(r.random((b, t)) < 0.15, axis=1).astype(np.int32) if packed else None
    seg_j = None if seg is None else jnp.asarray(seg)
    spec = MaskSpec(jnp.asarray(pos), jnp.asarray(pos), causal=causal, window=window, q_seg_bt=seg_j, k_seg_bs=seg_j)
    mask = ref_mask(pos, pos, causal=causal, window=window, q_seg=seg, k_seg=seg)
    return (q, k, v, dout), spec, mask


def _check(fn, arrays, mask):
    q, k, v, dout = arrays

    def fwd_bwd(q, k, v, dout):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, *vjp(dout)

    out, *grads = compile_fast(fwd_bwd, q, k, v, dout)(q, k, v, dout)
    want = ref_attention(q, k, v, mask, dout)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-4, atol=2e-5, err_msg=name)


IMPLS = {
    "xla": lambda spec: lambda q, k, v: attend(q, k, v, spec.dense()),
    "blocked": lambda spec: lambda q, k, v: attend_blocked(q, k, v, spec, block_k=BLOCK),
    "pallas": lambda spec: lambda q, k, v: attend_pallas(q, k, v, spec, backend="interpret"),
}


@pytest.mark.parametrize("impl,case", [(i, c) for i in IMPLS for c in CASES if i != "pallas" or c in PALLAS_OK])
def test_impl_matches_float64_reference(impl, case):
    arrays, spec, mask = _inputs(case)
    _check(IMPLS[impl](spec), arrays, mask)


def test_blocked_block_diffusion_mask_matches_reference():
    """BD3-LM's [noisy; clean] pass: block / clean arrays of 2T tokens, positions repeated, with a
    window and 2 blocks per key block of 8 (10 keys a side: the tail block is partial)."""
    b, t, blk, h, kv, d = 2, 10, 3, 2, 1, 8
    r = np.random.default_rng(1)
    pos = np.broadcast_to(np.concatenate([np.arange(t), np.arange(t)]), (b, 2 * t))
    block = pos // blk
    clean = np.broadcast_to(np.arange(2 * t) >= t, (b, 2 * t))
    spec_blocks = BlockSpec(block_bt=jnp.asarray(block), clean_bt=jnp.asarray(clean))
    for window in (0, 4):
        spec = MaskSpec(jnp.asarray(pos), jnp.asarray(pos), causal=False, window=window,
                        q_blocks=spec_blocks, k_blocks=spec_blocks)
        mask = ref_mask(pos, pos, causal=False, window=window, q_blk=(block, clean), k_blk=(block, clean))
        arrays = tuple(r.normal(size=s).astype(np.float32) for s in
                       ((b, 2 * t, h, d), (b, 2 * t, kv, d), (b, 2 * t, kv, d), (b, 2 * t, h, d)))
        _check(IMPLS["blocked"](spec), arrays, mask)  # xla: test_model_block_diffusion_forward_blocked_equals_xla


# --- memory ---------------------------------------------------------------------------------------


def test_blocked_compiles_without_a_t_by_t_array():
    """Loss + gradients at T = 8192 (batch 1, one head of 32): the compiled temporaries of blocked
    stay far below the dense path's and below one fp32 [T, T] matrix."""
    t = 8192
    pos = jnp.broadcast_to(jnp.arange(t), (1, t))
    spec = MaskSpec(pos, pos, causal=True)
    x = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)

    def temp_bytes(attn):
        loss = lambda q, k, v: (attn(q, k, v) ** 2).sum()  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blocked = temp_bytes(lambda q, k, v: attend_blocked(q, k, v, spec))
    dense = temp_bytes(lambda q, k, v: attend(q, k, v, spec.dense()))
    print(f"T={t}: compiled temp blocked {blocked / 2**20:.1f} MiB, xla {dense / 2**20:.1f} MiB")
    assert blocked < dense / 4
    assert blocked < t * t * 4


# --- the whole model ------------------------------------------------------------------------------

TINY = ModelConfig(name="t", pattern="AS", size="xxs", d_model=32, n_layers=2, n_heads=4, gqa_ratio=2,
                   window=5, vocab_size=259, doc_mask=True)


def _loss_and_grads(cfg, tokens):
    model = Model(cfg, rngs=nnx.Rngs(0))
    gdef, params = nnx.split(model)

    def loss(p):
        logits = nnx.merge(gdef, p)(tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    return compile_fast(jax.value_and_grad(loss), params)(params)


def test_model_blocked_equals_xla(monkeypatch):
    """A causal sliding-window + global GQA model with packed documents: same loss and gradients."""
    monkeypatch.setattr(ops, "BLOCK_K", 8)  # several key blocks over the 30 tokens (the last one partial)
    tokens = jax.random.randint(jax.random.key(0), (2, 30), 0, 256).at[:, 11].set(256)  # an EOD: 2 documents
    loss_x, g_x = _loss_and_grads(dataclasses.replace(TINY, attention_impl="xla"), tokens)
    loss_b, g_b = _loss_and_grads(dataclasses.replace(TINY, attention_impl="blocked"), tokens)
    np.testing.assert_allclose(float(loss_b), float(loss_x), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5),
                 g_x, g_b)


def test_model_block_diffusion_forward_blocked_equals_xla(monkeypatch):
    monkeypatch.setattr(ops, "BLOCK_K", 8)
    t, blk = 12, 4
    tokens = jax.random.randint(jax.random.key(1), (2, 2 * t), 0, 256)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(t), jnp.arange(t)]), (2, 2 * t))
    clean = jnp.broadcast_to(jnp.arange(2 * t) >= t, (2, 2 * t))
    cfg = dataclasses.replace(TINY, pattern="A", objective="block_diffusion", causal=False, block_size=blk)
    outs = []
    for impl in ("xla", "blocked"):
        gdef, params = nnx.split(Model(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0)))

        def forward(p, tokens, pos, clean, gdef=gdef):
            ctx = Ctx(positions=pos, segment_ids=None, blocks=BlockSpec(block_bt=pos // blk, clean_bt=clean))
            return nnx.merge(gdef, p).forward(tokens, ctx)

        outs.append(compile_fast(forward, params, tokens, pos, clean)(params, tokens, pos, clean))
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), rtol=1e-4, atol=1e-5)


def test_model_pallas_interpret_equals_xla():
    """Global attention only (pallas has no window); GQA heads repeated; packed documents."""
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256).at[:, 6].set(256)
    cfg = dataclasses.replace(TINY, pattern="A")
    outs = []
    for impl in ("xla", "pallas"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pallas on CPU warns that it interprets
            gdef, params = nnx.split(Model(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0)))
        outs.append(compile_fast(lambda p, x, gdef=gdef: nnx.merge(gdef, p)(x), params, tokens)(params, tokens))
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), rtol=1e-4, atol=1e-5)


def test_pallas_gpu_traces_and_checks_tiles():
    """The Triton kernel's shapes trace on any host (lowering needs a GPU); lengths the tiles cannot
    cover are refused before compiling."""
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    spec = MaskSpec(pos, pos, causal=True, q_seg_bt=pos // 8, k_seg_bs=pos // 8)
    q, kv = jax.ShapeDtypeStruct((2, 32, 4, 16), jnp.bfloat16), jax.ShapeDtypeStruct((2, 32, 2, 16), jnp.bfloat16)
    out = jax.eval_shape(lambda q, k, v: attend_pallas(q, k, v, spec, backend="gpu"), q, kv, kv)
    assert out.shape == (2, 32, 4, 16)
    short = spec._replace(q_pos_bt=pos[:, :24], k_pos_bs=pos[:, :24], q_seg_bt=None, k_seg_bs=None)
    q24, kv24 = (jax.ShapeDtypeStruct((2, 24, *x.shape[2:]), x.dtype) for x in (q, kv))
    _one_line_error(lambda: jax.eval_shape(lambda q, k, v: attend_pallas(q, k, v, short, backend="gpu"),
                                           q24, kv24, kv24), "divisible by 16")


# --- selection and refusals ------------------------------------------------------------------------


def _one_line_error(fn, match):
    with pytest.raises(ConfigError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_auto_selection():
    a = AttnShape(causal=True, head_dim=64, v_head_dim=64)
    assert resolve_attention_impl("auto", a, q_len=512, kv_len=512, platform="cpu") is AttentionImpl.xla
    assert resolve_attention_impl("auto", a, q_len=2048, kv_len=2048, platform="cpu") is AttentionImpl.blocked
    assert resolve_attention_impl("auto", a, platform="gpu") is AttentionImpl.cudnn
    assert resolve_attention_impl("auto", a, platform="tpu") is AttentionImpl.pallas
    bidir_window = a._replace(causal=False, window=8)
    assert resolve_attention_impl("auto", bidir_window, platform="gpu") is AttentionImpl.xla
    assert resolve_attention_impl("auto", a._replace(window=8), platform="tpu") is AttentionImpl.xla
    assert resolve_attention_impl("auto", a._replace(float32=True), platform="gpu") is AttentionImpl.xla
    assert resolve_attention_impl("auto", a._replace(blocks=True), platform="gpu") is AttentionImpl.xla
    assert resolve_attention_impl("blocked", a._replace(blocks=True), platform="gpu") is AttentionImpl.blocked


def test_refusals():
    _one_line_error(lambda: resolve(dataclasses.replace(TINY, attention_impl="flash")),
                    r"arch.attention_impl='flash' is not one of auto\|xla\|blocked\|cudnn\|pallas")
    _one_line_error(lambda: resolve(dataclasses.replace(TINY, attention_impl="pallas")),
                    "pallas has no sliding window.*use arch.attention_impl=auto, xla or blocked")
    _one_line_error(lambda: resolve(dataclasses.replace(TINY, pattern="A", objective="block_diffusion",
                                                        causal=False, block_size=4, attention_impl="cudnn")),
                    "cudnn cannot express block diffusion")
    _one_line_error(lambda: resolve(dataclasses.replace(TINY, attention_impl="cudnn", dtype="float32")),
                    "cudnn runs in bfloat16 / float16 only")
    _one_line_error(lambda: resolve(dataclasses.replace(TINY, pattern="L", attention_impl="pallas")),
                    "pallas needs equal query and value head sizes")
    if jax.default_backend() != "gpu":
        cfg = dataclasses.replace(TINY, pattern="A", attention_impl="cudnn", dtype="bfloat16")
        _one_line_error(lambda: nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0))), "cudnn needs a GPU")


def test_hydra_key():
    from conftest import compose

    cfg = compose(["+arch=ar", "arch.attention_impl=blocked"])
    assert cfg.arch.attention_impl is AttentionImpl.blocked
