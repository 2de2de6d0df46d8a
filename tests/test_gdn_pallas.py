"""Pallas Gated DeltaNet (interpret mode on CPU) vs the step-by-step reference; kernel selection.

Every comparison is against ``ssm.gated_delta_rule_reference`` (a ``lax.scan`` over time), values
and gradients. Interpret mode runs the kernels as exact fp32 XLA ops, so fp32 results must agree
to rounding. Shapes are tiny (chunk 16, K = V = 16) and few, because each one costs an
interpret-mode compile of five kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssm
from archs.config import GdnImpl, ModelConfig
from archs.context import Ctx
from archs.errors import ConfigError
from archs.sizes import resolve
from ssm.gated_delta_pallas import gated_delta_kernel, gated_delta_rule_pallas, resolve_gdn_impl
from ssm.layers import GatedDeltaNet

jax.config.update("jax_enable_x64", False)

B, H, K, V = 2, 2, 16, 16
CHUNK = 16
T_RAGGED = 37  # two full chunks and a padded tail of 5
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn):
    return jax.jit(fn, compiler_options=_FAST_COMPILE)


def _raw(pallas: bool):
    fn = gated_delta_rule_pallas if pallas else ssm.gated_delta_rule_reference
    return lambda args, s0, seg: fn(*args, chunk_size=CHUNK, initial_state=s0, segment_ids=seg)


@functools.lru_cache(maxsize=None)
def forward(pallas: bool):
    return _jit(_raw(pallas))


@functools.lru_cache(maxsize=None)
def grads(pallas: bool):
    """Gradients of <w_o, o> + <w_s, final state> w.r.t. (q, k, v, g, beta) and the state."""
    fn = _raw(pallas)

    def loss(args, s0, seg, w_o, w_s):
        o, s = fn(args, s0, seg)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)

    return _jit(jax.grad(loss, argnums=(0, 1)))


def inputs(T, seed, gates="mixed"):
    """L2-normalised keys, beta in (0, 1), a random initial state for batch element 0 and zeros for
    element 1. gates: mixed (ordinary decays, exact zeros, -30, -1e3), one (g = 0: no decay) or
    hard (half the steps at -1e3: the state is wiped there, gradients must stay exact)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = -rng.exponential(0.3, (B, T, H)).astype(np.float32)
    u = rng.uniform(size=g.shape)
    if gates == "mixed":
        g[u < 0.15] = 0.0
        g[(u >= 0.15) & (u < 0.18)] = -30.0
        g[(u >= 0.18) & (u < 0.20)] = -1e3
    elif gates == "one":
        g[:] = 0.0
    elif gates == "hard":
        g[u < 0.5] = -1e3
    beta = rng.uniform(0.0, 1.0, (B, T, H)).astype(np.float32)
    s0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
    s0[1] = 0.0
    return tuple(jnp.asarray(t) for t in (q, k, v, g, beta)), jnp.asarray(s0)


def packed_ids(T, seed):
    """Many short documents (some of length 1) with one boundary exactly on a chunk boundary."""
    rng = np.random.default_rng(seed)
    ids = np.cumsum(rng.uniform(size=(B, T)) < 0.15, axis=1)
    ids[:, CHUNK:] += 1  # a new document starts at t = CHUNK
    return jnp.asarray(ids.astype(np.int32))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_close(a, b, rel, what):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{what}: not finite"
    err = rel_err(a, b)
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def check_grads(args, s0, seg, seed, rel=1e-5):
    rng = np.random.default_rng(seed)
    o, s = jax.eval_shape(_raw(False), args, s0, seg)
    w_o = jnp.asarray(rng.standard_normal(o.shape).astype(np.float32))
    w_s = jnp.asarray(rng.standard_normal(s.shape).astype(np.float32))
    g_args, g_s0 = grads(True)(args, s0, seg, w_o, w_s)
    r_args, r_s0 = grads(False)(tuple(a.astype(jnp.float32) for a in args), s0, seg, w_o, w_s)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), g_args + (g_s0,), r_args + (r_s0,)):
        primal = dict(zip(("q", "k", "v", "g", "beta"), args)).get(name, s0)
        assert a.dtype == primal.dtype, f"d{name}: dtype {a.dtype} != {primal.dtype}"
        assert_close(a, b, rel, f"d{name}")


# ------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, CHUNK, T_RAGGED])
def test_forward_matches_reference(T):
    """One step (chunk shrunk to the minimum), exactly one chunk, and a ragged length."""
    args, s0 = inputs(T, seed=T)
    o, s = forward(True)(args, s0, None)
    o_ref, s_ref = forward(False)(args, s0, None)
    assert o.shape == (B, T, H, V) and o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(s, s_ref, 1e-5, "final state")


@pytest.mark.parametrize("gates", ["mixed", "one", "hard"])
def test_gradients_match_reference(gates):
    """q, k, v, g, beta and the initial state, over a ragged length (padded tail)."""
    args, s0 = inputs(T_RAGGED, seed=11, gates=gates)
    o, s = forward(True)(args, s0, None)
    o_ref, s_ref = forward(False)(args, s0, None)
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(s, s_ref, 1e-5, "final state")
    check_grads(args, s0, None, seed=11)


def test_segments_match_reference():
    """Packed documents: the state resets at every boundary (mid-chunk, on a chunk boundary, and
    documents of one token); the initial state reaches only the first document."""
    args, s0 = inputs(T_RAGGED, seed=12)
    args = args[:3] + (jnp.maximum(args[3], -0.02),) + args[4:]  # mild decay: leaks stay visible
    seg = packed_ids(T_RAGGED, seed=12)
    o, s = forward(True)(args, s0, seg)
    o_ref, s_ref = forward(False)(args, s0, seg)
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(s, s_ref, 1e-5, "final state")
    # Sensitivity: ignoring the boundaries changes the answer (the test above could not pass
    # with the resets dropped).
    o_leak, _ = forward(False)(args, s0, None)
    assert rel_err(o_leak, o_ref) > 1e-2
    check_grads(args, s0, seg, seed=12)


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 q, k, v: output in bf16, state fp32, math in fp32 (only the output's final rounding
    differs from the fp32 reference on the same bf16-rounded inputs); cotangents come back in the
    inputs' dtypes."""
    args, s0 = inputs(T_RAGGED, seed=13)
    args16 = tuple(a.astype(jnp.bfloat16) if i < 3 else a for i, a in enumerate(args))
    o16, s16 = forward(True)(args16, s0, None)
    assert o16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    o_ref, s_ref = forward(False)(tuple(a.astype(jnp.float32) for a in args16), s0, None)
    assert_close(o16, o_ref, 1e-2, "output")
    assert_close(s16, s_ref, 1e-5, "final state")
    check_grads(args16, s0, None, seed=13, rel=1e-2)


# ------------------------------------------------------------------------------------------------
# Accelerator lowering (the compile itself needs the device; this checks every op the kernels
# use has a Triton / Mosaic lowering, at the shapes an accelerator run uses)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform,marker", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
def test_forward_and_backward_lower_for_accelerators(platform, marker):
    T, Kd = 200, 64  # L = 64, K = V = 64, ragged, bf16 activations, packed documents
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    backend = "gpu" if platform == "cuda" else "tpu"

    def loss(q, k, v, g, beta, s0, seg):
        o, s = gated_delta_rule_pallas(q, k, v, g, beta, initial_state=s0, segment_ids=seg, backend=backend)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(
        bf16(1, T, 2, Kd), bf16(1, T, 2, Kd), bf16(1, T, 2, Kd), f32(1, T, 2), f32(1, T, 2),
        f32(1, 2, Kd, Kd), jax.ShapeDtypeStruct((1, T), jnp.int32),
    ).lower(lowering_platforms=(platform,))
    # prepare + output (forward), state source + two per-chunk backward kernels
    assert lowered.as_text().count(f"@{marker}(") == 5


def test_gpu_refuses_tiles_triton_cannot_hold():
    args = [jax.ShapeDtypeStruct((1, 64, 2, d), jnp.float32) for d in (48, 48, 48)]
    args += [jax.ShapeDtypeStruct((1, 64, 2), jnp.float32)] * 2
    with pytest.raises(ConfigError, match="powers of two"):
        jax.eval_shape(functools.partial(gated_delta_rule_pallas, backend="gpu"), *args)


# ------------------------------------------------------------------------------------------------
# arch.gdn_impl
# ------------------------------------------------------------------------------------------------


def test_impl_resolution():
    assert resolve_gdn_impl("auto", platform="cpu") is GdnImpl.xla
    assert resolve_gdn_impl("auto", (64, 64, 64), platform="gpu") is GdnImpl.pallas
    assert resolve_gdn_impl("auto", (64, 64, 64), platform="tpu") is GdnImpl.pallas
    assert resolve_gdn_impl("auto", (96, 96, 64), platform="gpu") is GdnImpl.xla  # Triton tiles
    assert resolve_gdn_impl("pallas", platform="cpu") is GdnImpl.pallas
    assert gated_delta_kernel("xla", platform="gpu") is ssm.gated_delta_rule
    with pytest.raises(ConfigError, match="arch.gdn_impl='cudnn' is not one of auto|xla|pallas"):
        resolve_gdn_impl("cudnn")
    with pytest.raises(ConfigError, match="use arch.gdn_impl=xla"):
        resolve_gdn_impl("pallas", (96, 96, 64), platform="gpu")


def _layer_cfg(impl):
    return resolve(ModelConfig(name="t", pattern="G", size="xxs", d_model=32, n_heads=2,
                               chunk_size=CHUNK, gdn_impl=impl))


def test_layer_bad_impl_fails_at_construction():
    with pytest.raises(ConfigError, match="gdn_impl"):
        nnx.eval_shape(lambda: GatedDeltaNet(_layer_cfg("fast"), rngs=nnx.Rngs(0)))


def test_layer_pallas_equals_xla():
    """The Gated DeltaNet layer with arch.gdn_impl=pallas (interpret mode here) gives the xla
    layer's outputs and parameter gradients, with packed documents."""
    cfg_x, cfg_p = _layer_cfg("xla"), _layer_cfg("pallas")
    gdef_x, abstract = nnx.split(nnx.eval_shape(lambda: GatedDeltaNet(cfg_x, rngs=nnx.Rngs(0))))
    gdef_p, _ = nnx.split(nnx.eval_shape(lambda: GatedDeltaNet(cfg_p, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(14)
    # Parameters drawn in numpy (eager init would compile one program per shape): matrices at
    # fan-in scale, vectors near their init (A = exp(A_log) in [1, 16], norm scales near 1).
    state = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0, a.shape[0] ** -0.5, a.shape) if a.ndim >= 2
                              else 1.0 + rng.uniform(0, 1.5, a.shape), a.dtype), abstract)
    x = jnp.asarray(rng.standard_normal((B, T_RAGGED, cfg_x.d_model)).astype(np.float32))
    seg = packed_ids(T_RAGGED, seed=14)
    ctx = Ctx(positions=jnp.broadcast_to(jnp.arange(T_RAGGED), (B, T_RAGGED)), segment_ids=seg)
    w = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))

    def run(gdef):
        def loss(st):
            y = nnx.merge(gdef, st)(x, ctx)
            return jnp.sum(y * w), y
        return _jit(jax.value_and_grad(loss, has_aux=True))(state)

    (_, y_x), g_x = run(gdef_x)
    with pytest.warns(UserWarning, match="interpret mode"):
        (_, y_p), g_p = run(gdef_p)
    assert_close(y_p, y_x, 1e-5, "layer output")
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree_util.tree_leaves_with_path(g_x)):
        assert_close(a, b, 1e-4, f"d{jax.tree_util.keystr(path)}")
