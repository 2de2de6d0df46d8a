"""Chunked Gated DeltaNet / SSD kernels vs step-by-step references, decode steps, segments, bf16.

Compilation dominates the cost of these tests, so every call goes through a cached jit and the
tests reuse a small set of shapes (the lengths in LENGTHS, always with an initial state unless a
test is about its absence).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm

jax.config.update("jax_enable_x64", False)

B, H, K, V = 2, 2, 16, 16  # Gated DeltaNet
SB, SH, SG, SP, SN = 2, 4, 2, 8, 8  # SSD: batch, heads, groups (2 heads each), head dim, state
LENGTHS = [1, 15, 63, 64, 65, 300]
CHUNK = 64

# Backend optimisation level 0 halves XLA:CPU compile time at the same run time for these sizes.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn):
    return jax.jit(fn, compiler_options=_FAST_COMPILE)


def _raw_fn(kernel, chunked=True, chunk_size=CHUNK):
    """``fn(args, initial_state, segment_ids) -> (out, state)``."""
    if kernel == "gdn":
        fn = ssm.gated_delta_rule if chunked else ssm.gated_delta_rule_reference
    else:
        fn = ssm.ssd if chunked else ssm.ssd_reference
    return lambda args, s0=None, seg=None: fn(*args, chunk_size=chunk_size, initial_state=s0,
                                              segment_ids=seg)


@functools.lru_cache(maxsize=None)
def kernel_fn(kernel, chunked=True, chunk_size=CHUNK):
    """Jitted ``_raw_fn``, cached per static config (jit then caches per shape)."""
    return _jit(_raw_fn(kernel, chunked, chunk_size))


@functools.lru_cache(maxsize=None)
def grad_fn(kernel, chunked=True):
    """Jitted gradients of <w_o, out> + <w_s, state> w.r.t. (args, initial_state)."""
    fn = _raw_fn(kernel, chunked)

    def loss(args, s0, seg, w_o, w_s):
        o, s = fn(args, s0, seg)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    return _jit(jax.grad(loss, argnums=(0, 1)))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_close(a, b, rel=1e-4, atol=1e-5, rtol=1e-3, what=""):
    err = rel_err(a, b)
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=atol, rtol=rtol, err_msg=what)


def gdn_inputs(T, seed=0):
    """L2-normalised keys (as in Gated DeltaNet), beta in (0, 1), gates mixing ordinary decays
    with exact zeros and very negative values (-30, -1e3)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = -rng.exponential(0.3, (B, T, H)).astype(np.float32)
    u = rng.uniform(size=g.shape)
    g[u < 0.15] = 0.0
    g[(u >= 0.15) & (u < 0.18)] = -30.0
    g[(u >= 0.18) & (u < 0.20)] = -1e3
    beta = rng.uniform(0.0, 1.0, (B, T, H)).astype(np.float32)
    s0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
    return tuple(jnp.asarray(t) for t in (q, k, v, g, beta)), jnp.asarray(s0)


def ssd_inputs(T, seed=0):
    """dt mostly small, sometimes huge (dt * A down to ~ -1e3, i.e. a full reset)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SB, T, SH, SP)).astype(np.float32)
    dt = rng.uniform(0.01, 0.5, (SB, T, SH)).astype(np.float32)
    dt[rng.uniform(size=dt.shape) < 0.03] = 100.0
    A = -rng.uniform(0.5, 10.0, (SH,)).astype(np.float32)
    Bm = rng.standard_normal((SB, T, SG, SN)).astype(np.float32)
    Cm = rng.standard_normal((SB, T, SG, SN)).astype(np.float32)
    s0 = rng.standard_normal((SB, SH, SP, SN)).astype(np.float32)
    return tuple(jnp.asarray(t) for t in (x, dt, A, Bm, Cm)), jnp.asarray(s0)


MAKE = {"gdn": gdn_inputs, "ssd": ssd_inputs}
KERNELS = list(MAKE)


def mild_decay(kernel, args):
    """Decays close to 1 (log decay per step >= -0.02), so that any leak of state across a
    document boundary stays visible instead of being decayed away."""
    if kernel == "gdn":
        q, k, v, g, beta = args
        return q, k, v, jnp.maximum(g, -0.02), beta
    x, dt, A, Bm, Cm = args
    return x, jnp.minimum(dt, 0.02 / jnp.max(-A)), A, Bm, Cm


def time_slice(args, lo, hi):
    """Slice every time-major input (SSD's A [H] has no time axis)."""
    return tuple(a[:, lo:hi] if a.ndim > 1 else a for a in args)


# ------------------------------------------------------------------------------------------------
# Chunked vs reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("T", LENGTHS)
def test_chunked_matches_reference(kernel, T):
    """Batch element 0 starts from a random state, element 1 from zeros."""
    args, s0 = MAKE[kernel](T, seed=T)
    s0 = s0.at[1].set(0.0)
    o, s = kernel_fn(kernel)(args, s0)
    o_ref, s_ref = kernel_fn(kernel, chunked=False)(args, s0)
    assert o.shape == o_ref.shape == args[2 if kernel == "gdn" else 0].shape
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("T", [63, 65])
def test_without_initial_state(kernel, T):
    args, s0 = MAKE[kernel](T, seed=T)
    o, s = kernel_fn(kernel)(args)
    o_ref, s_ref = kernel_fn(kernel, chunked=False)(args)
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")
    o0, s0_ = kernel_fn(kernel)(args, jnp.zeros_like(s0))
    assert_close(o, o0, what="None == zeros")


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_power_of_two_chunk(kernel):
    """chunk_size=48: 7 chunks with a padded tail."""
    args, s0 = MAKE[kernel](300, seed=1)
    o, s = kernel_fn(kernel, chunk_size=48)(args, s0)
    o_ref, s_ref = kernel_fn(kernel, chunked=False)(args, s0)
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")


def _check_grads(kernel, args, s0, seg, seed):
    rng = np.random.default_rng(seed)
    o, s = jax.eval_shape(_raw_fn(kernel), args, s0, seg)
    w_o = jnp.asarray(rng.standard_normal(o.shape).astype(np.float32))
    w_s = jnp.asarray(rng.standard_normal(s.shape).astype(np.float32))
    g_args, g_s0 = grad_fn(kernel)(args, s0, seg, w_o, w_s)
    r_args, r_s0 = grad_fn(kernel, chunked=False)(args, s0, seg, w_o, w_s)
    names = ("q", "k", "v", "g", "beta") if kernel == "gdn" else ("x", "dt", "A", "B", "C")
    for name, a, b in zip(names + ("initial_state",), g_args + (g_s0,), r_args + (r_s0,)):
        assert np.all(np.isfinite(np.asarray(a))), f"d{name} not finite"
        err = rel_err(a, b)
        assert err <= 1e-3, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_match_reference(kernel):
    """T=300: several chunks, padded tail, gates at 0 / -30 / -1e3."""
    args, s0 = MAKE[kernel](300, seed=12)
    _check_grads(kernel, args, s0, None, seed=12)


# ------------------------------------------------------------------------------------------------
# State passing, decoding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_two_halves_equal_whole(kernel):
    args, s0 = MAKE[kernel](300, seed=3)
    o, s = kernel_fn(kernel)(args, s0)
    o1, s1 = kernel_fn(kernel)(time_slice(args, 0, 65), s0)
    o2, s2 = kernel_fn(kernel)(time_slice(args, 65, 300), s1)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, what="output")
    assert_close(s2, s, what="final state")


@pytest.mark.parametrize("kernel", KERNELS)
def test_step_decoding_matches_chunked(kernel):
    T = 65
    args, s0 = MAKE[kernel](T, seed=4)
    o, s = kernel_fn(kernel)(args, s0)
    if kernel == "gdn":
        step = jax.jit(ssm.gated_delta_step)
        call = lambda state, t: step(state, *(a[:, t] for a in args))
    else:
        x, dt, A, Bm, Cm = args
        step = jax.jit(ssm.ssd_step)
        call = lambda state, t: step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])
    state, outs = s0, []
    for t in range(T):
        o_t, state = call(state, t)
        outs.append(o_t)
    assert_close(jnp.stack(outs, axis=1), o, what="output")
    assert_close(state, s, what="final state")


# ------------------------------------------------------------------------------------------------
# Packed documents (segment_ids)
# ------------------------------------------------------------------------------------------------

# Three documents: the first boundary falls exactly on a chunk boundary (t=64), the second one
# mid-chunk (t=129). Ids repeat non-contiguously on purpose: only changes between neighbours count.
DOCS = (64, 65, 63)
DOC_IDS = (7, 3, 7)


def _packed_ids(batch):
    ids = np.concatenate([np.full(n, i) for n, i in zip(DOCS, DOC_IDS)]).astype(np.int32)
    return jnp.asarray(np.broadcast_to(ids, (batch, ids.size)))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunked", [True, False])
def test_segments_isolate_documents(kernel, chunked):
    """Each document inside a packed window == that document alone; the initial state only
    reaches document 1; the final state is that of the last document alone."""
    args, s0 = MAKE[kernel](sum(DOCS), seed=5)
    args = mild_decay(kernel, args)
    seg = _packed_ids(args[0].shape[0])
    fn = kernel_fn(kernel, chunked)
    o, s = fn(args, s0, seg)
    bounds = np.cumsum((0,) + DOCS)
    for d, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_doc, s_doc = fn(time_slice(args, lo, hi), s0 if d == 0 else None)
        assert_close(o[:, lo:hi], o_doc, what=f"document {d + 1}")
    assert_close(s, s_doc, what="final state")


@pytest.mark.parametrize("kernel", KERNELS)
def test_segments_chunked_matches_reference(kernel):
    """Random packing (many short documents, some of length 1, boundaries anywhere), forward and
    gradients."""
    args, s0 = MAKE[kernel](sum(DOCS), seed=6)
    rng = np.random.default_rng(6)
    ids = np.cumsum(rng.uniform(size=(args[0].shape[0], sum(DOCS))) < 0.1, axis=1)
    ids[:, 64] = ids[:, 63] + 1  # make sure one boundary sits exactly on a chunk boundary
    ids[:, 65:] += 1
    seg = jnp.asarray(ids.astype(np.int32))
    o, s = kernel_fn(kernel)(args, s0, seg)
    o_ref, s_ref = kernel_fn(kernel, chunked=False)(args, s0, seg)
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")
    _check_grads(kernel, args, s0, seg, seed=6)


# ------------------------------------------------------------------------------------------------
# Precision and closed forms
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_inputs_accumulate_in_fp32(kernel):
    args, s0 = MAKE[kernel](300, seed=7)
    args16 = tuple(a.astype(jnp.bfloat16) for a in args)
    o16, s16 = kernel_fn(kernel)(args16, s0)
    assert o16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    # Ground truth: the same bf16-rounded inputs through the fp32 step-by-step reference.
    o_ref, s_ref = kernel_fn(kernel, chunked=False)(tuple(a.astype(jnp.float32) for a in args16), s0)
    assert rel_err(o16, o_ref) <= 2e-2
    assert rel_err(s16, s_ref) <= 2e-2


def test_gdn_beta_zero_reads_decayed_initial_state():
    """beta = 0: nothing is written, so o_t = K^-1/2 exp(sum_{s<=t} g_s) S0^T q_t (numpy, f64)."""
    (q, k, v, g, _), s0 = gdn_inputs(300, seed=8)
    g = jnp.maximum(g, -0.05)  # keep the readout visible over 300 steps
    o, s = kernel_fn("gdn")((q, k, v, g, jnp.zeros_like(g)), s0)
    G = np.cumsum(np.asarray(g, np.float64), axis=1)  # [B T H]
    want = K ** -0.5 * np.exp(G)[..., None] * np.einsum(
        "bthk,bhkv->bthv", np.asarray(q, np.float64), np.asarray(s0, np.float64))
    assert_close(o, want, what="output")
    assert_close(s, np.exp(G[:, -1])[..., None, None] * np.asarray(s0, np.float64),
                 what="final state")


def test_gdn_single_step_by_hand():
    (q, k, v, g, beta), s0 = gdn_inputs(1, seed=9)
    q, k, v, g, beta, s0 = (np.asarray(t, np.float64) for t in (q, k, v, g, beta, s0))
    g = np.maximum(g, -2.0)
    want_o = np.zeros((B, 1, H, V))
    want_s = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            S = np.exp(g[b, 0, h]) * s0[b, h]
            u = beta[b, 0, h] * (v[b, 0, h] - S.T @ k[b, 0, h])
            S = S + np.outer(k[b, 0, h], u)
            want_o[b, 0, h] = K ** -0.5 * S.T @ q[b, 0, h]
            want_s[b, h] = S
    inputs = tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v, g, beta))
    for chunked in (True, False):
        o, s = kernel_fn("gdn", chunked)(inputs, jnp.asarray(s0, jnp.float32))
        assert_close(o, want_o, rel=1e-5, what="output")
        assert_close(s, want_s, rel=1e-5, what="state")


def test_ssd_zero_input_reads_decayed_initial_state():
    """x = 0: y_t = exp(A_h sum_{s<=t} dt_s) S0 C_t (numpy, f64); head h reads group h // 2."""
    (x, dt, A, Bm, Cm), s0 = ssd_inputs(300, seed=10)
    dt = jnp.minimum(dt, 0.01)
    y, s = kernel_fn("ssd")((jnp.zeros_like(x), dt, A, Bm, Cm), s0)
    decay = np.exp(np.cumsum(np.asarray(dt, np.float64), axis=1) * np.asarray(A, np.float64))
    C_heads = np.repeat(np.asarray(Cm, np.float64), SH // SG, axis=2)  # [b T H N]
    want = decay[..., None] * np.einsum("bhpn,bthn->bthp", np.asarray(s0, np.float64), C_heads)
    assert_close(y, want, what="output")
    assert_close(s, decay[:, -1, :, None, None] * np.asarray(s0, np.float64), what="final state")


def test_ssd_single_step_by_hand():
    (x, dt, A, Bm, Cm), s0 = ssd_inputs(1, seed=11)
    x, dt, A, Bm, Cm, s0 = (np.asarray(t, np.float64) for t in (x, dt, A, Bm, Cm, s0))
    dt = np.minimum(dt, 1.0)
    want_y = np.zeros((SB, 1, SH, SP))
    want_s = np.zeros((SB, SH, SP, SN))
    for b in range(SB):
        for h in range(SH):
            grp = h // (SH // SG)
            S = np.exp(dt[b, 0, h] * A[h]) * s0[b, h] + dt[b, 0, h] * np.outer(x[b, 0, h], Bm[b, 0, grp])
            want_s[b, h] = S
            want_y[b, 0, h] = S @ Cm[b, 0, grp]
    inputs = tuple(jnp.asarray(t, jnp.float32) for t in (x, dt, A, Bm, Cm))
    for chunked in (True, False):
        y, s = kernel_fn("ssd", chunked)(inputs, jnp.asarray(s0, jnp.float32))
        assert_close(y, want_y, rel=1e-5, what="output")
        assert_close(s, want_s, rel=1e-5, what="state")
