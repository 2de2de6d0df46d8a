"""Gated DeltaNet, chunked, with the per-chunk work in Pallas kernels (GPU: Triton; TPU: Mosaic;
CPU: interpret mode, for tests).

Same contract as ``ssm.gated_delta_rule`` (shapes, segment resets, ragged T, fp32 accumulation,
``(o in v.dtype, final_state fp32)``), and the same algorithm (see the notes above
``ssm.gated_delta._chunked_forward``). What runs where, per chunk of L steps, head h, sequence b:

forward
  ``_prepare_kernel``  Pallas, grid (B, H, n): decays of the chunk from its gates (segment-aware),
                A = strict_tril(beta D (k k^T)), the UT transform T = (I + A)^-1 by forward
                substitution in registers, u~ = T (beta v), w = T (beta a k), and the chunk's state
                map  S' = M S + C  with M = gamma I - (e k)^T w, C = (e k)^T u~.
                Writes u~, w [L, V|K], M [K, K], C [K, V] (and T^T when a backward will follow).
  scan          XLA ``lax.scan`` over chunks, batched over (B, H): S_{c+1} = M_c S_c + C_c, one
                [K, K] x [K, V] matmul per chunk. Writes the state entering each chunk.
  ``_output_kernel``   Pallas, grid (B, H, n): u = u~ - w S, o = scale ((a q) S + ((q k^T) D) u).
backward
  ``_state_source_kernel``  Pallas, grid (B, H, n): G = (a q)^T dO' - w^T (P^T dO'), the chunk's direct
                contribution to the cotangent of its entering state (dO' = scale dO, P = (q k^T) D).
  scan          XLA, reversed: dS_c = M_c^T dS_{c+1} + G_c (one matmul per chunk).
  ``_bwd_output_kernel``  Pallas, grid (B, H, n): the output/state path. From dO, S, dS_out: u, du, dw,
                dq, k's cotangent through q k^T and e k, the gates' cotangent through P, a, e, gamma.
  ``_bwd_ut_kernel``  Pallas, grid (B, H, n): the UT-transform path. From du, dw and the saved T^T:
                [X | Y] = T^T [du | dw], dA = -(X u~^T + Y w^T), then dv, dbeta, k's cotangent
                through k k^T and beta a k, the gates' cotangent through A and a.
  XLA adds the two partial cotangents of k and g.
The two per-chunk backward kernels keep fewer [L, L] tiles live than one fused kernel would (the
split follows flash-linear-attention's chunked backward), which matters for register pressure on
a GPU.

Sizes. Every value a kernel holds is an [L, L], [L, K|V] or [K, K|V] tile or an [L, 1] column,
all fp32. At L = 64, K = V = 64 a tile is 16 KiB and the largest kernel (``_bwd_output_kernel``) keeps
about a dozen live at once, ~200 KiB: the register file of one Hopper SM (256 KiB) at 8 warps,
which is why the GPU launch asks for 8; one TPU core's VMEM holds that many times over. At
K = V = 128 the [K, V] state tiles alone are 64 KiB and the GPU kernels would spill; the remedy
is flash-linear-attention's: split V over the grid, with the dq / dk contributions summed over
V blocks. Untuned and unmeasured on hardware (no accelerator here): the numbers above are
footprint arithmetic, not timings. The Triton backend needs power-of-two tiles of at least 16
(L, K, V); the chunk is raised to 16 for short inputs, and other head sizes are refused on GPU
(``arch.gdn_impl=auto`` falls back to xla for them).

Backends. GPU: Pallas's Triton backend (``jax.experimental.pallas.triton.CompilerParams``),
because the kernels are plain block programs (loads, dots, element-wise math, a loop) that the
Triton lowering maps directly and that lower unchanged for TPU; Mosaic GPU would give Hopper's
wgmma / TMA but needs warpgroup-level code of its own. TPU: Mosaic, grid axes marked parallel.
CPU: interpret mode (the kernels run as ordinary XLA ops; slow, for tests).

Precision: inputs are upcast to fp32 inside the kernels and every product accumulates in fp32.
The decay sums that feed exp() use HIGHEST precision (IEEE fp32 on GPU tensor cores, full fp32
passes on TPU); the other dots use the backend's default fp32 matmul (TF32 on NVIDIA, one bf16
pass on TPU: what XLA's own einsums get there), so on accelerators results match the XLA path
to matmul precision, not bit-wise. In interpret mode everything is exact fp32.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from archs.backends import pallas_backend
from archs.config import GdnImpl
from archs.errors import ConfigError

from .gated_delta import _chunk_len, _pad_time, _resets, gated_delta_rule

__all__ = ["gated_delta_kernel", "gated_delta_rule_pallas", "resolve_gdn_impl"]

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
_MIN_TILE = 16  # smallest dot dimension the Triton backend accepts


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------


def _triton_tiles(*sizes: int) -> bool:
    return all(x >= _MIN_TILE and x & (x - 1) == 0 for x in sizes)


def _check_tiles(backend: str, key_dim: int, value_dim: int, chunk_size: int) -> None:
    """Triton tiles: powers of two >= 16 (the chunk is raised to 16 anyway)."""
    if backend == "gpu" and not _triton_tiles(key_dim, value_dim, max(chunk_size, _MIN_TILE)):
        raise ConfigError(
            f"arch.gdn_impl=pallas on GPU needs powers of two >= {_MIN_TILE} for the key ({key_dim}) "
            f"and value ({value_dim}) head sizes and arch.chunk_size ({chunk_size}) (Triton tiles); "
            "use arch.gdn_impl=xla or auto"
        )


def resolve_gdn_impl(impl, dims: Optional[tuple[int, int, int]] = None,
                     platform: Optional[str] = None) -> GdnImpl:
    """``arch.gdn_impl`` -> xla | pallas on ``platform`` (default: the default JAX backend).

    auto is pallas on GPU and TPU and xla elsewhere; with ``dims = (key head dim, value head dim,
    chunk size)`` auto also falls back to xla where the Triton tiles do not fit, and an explicit
    pallas that cannot run is a ConfigError (so is a value outside auto|xla|pallas)."""
    try:
        impl = GdnImpl(impl)
    except ValueError:
        raise ConfigError(
            f"arch.gdn_impl={impl!r} is not one of {'|'.join(m.value for m in GdnImpl)}"
        ) from None
    backend = pallas_backend(platform)
    if impl is GdnImpl.auto:
        fits = dims is None or backend != "gpu" or _triton_tiles(*dims[:2], max(dims[2], _MIN_TILE))
        return GdnImpl.pallas if backend != "interpret" and fits else GdnImpl.xla
    if impl is GdnImpl.pallas and dims is not None:
        _check_tiles(backend, *dims)
    return impl


def gated_delta_kernel(impl, dims: Optional[tuple[int, int, int]] = None,
                       platform: Optional[str] = None) -> Callable:
    """The chunked Gated DeltaNet that ``arch.gdn_impl`` selects (``resolve_gdn_impl``), with
    ``ssm.gated_delta_rule``'s signature. ``pallas`` on a CPU runs the kernels in interpret mode:
    exact, but far slower than xla (meant for tests), and warns so."""
    if resolve_gdn_impl(impl, dims, platform) is GdnImpl.xla:
        return gated_delta_rule
    backend = pallas_backend(platform)
    if backend == "interpret":
        warnings.warn(
            "arch.gdn_impl=pallas on a CPU runs the Pallas kernels in interpret mode (exact, slow: "
            "for tests); arch.gdn_impl=auto picks the XLA kernel here",
            stacklevel=2,
        )
    return functools.partial(gated_delta_rule_pallas, backend=backend)


class _Cfg(NamedTuple):
    """Static configuration of one call (hashable: passed as a non-differentiable argument)."""

    backend: str  # gpu | tpu | interpret
    scale: float
    L: int
    segments: bool


def _compiler_params(backend: str, n_grid: int):
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=8, num_stages=1)  # register room: see Sizes
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)
    return None


def _pallas(cfg: _Cfg, kernel, grid, in_specs, out_specs, out_shape):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.backend == "interpret",
        compiler_params=_compiler_params(cfg.backend, len(grid)),
    )


# Block specs over the grid (b, h, c). Sequence tensors are head-major [B, H, T, D] (one chunk is a
# contiguous [L, D] tile); gates are columns [B, H, T, 1]; per-chunk states are chunk-major
# [n, B, H, K, V] so that the XLA scan walks their leading axis without a transpose.


def _seq(L: int, d: int):
    return pl.BlockSpec((None, None, L, d), lambda b, h, c: (b, h, c, 0))


def _state(k: int, v: int):
    return pl.BlockSpec((None, None, None, k, v), lambda b, h, c: (c, b, h, 0, 0))


def _seg(L: int):
    return pl.BlockSpec((None, L, 1), lambda b, h, c: (b, c, 0))


# ----------------------------------------------------------------------------------------------
# In-kernel helpers: 2-D values only (no slicing of values, no 1-D vectors), so that the same
# code lowers for Triton and Mosaic.
# ----------------------------------------------------------------------------------------------


def _mm(a, b, *, ta: bool = False, tb: bool = False, precision=None):
    """a @ b with fp32 accumulation; ``ta`` / ``tb`` contract over a's rows / b's columns (a^T b,
    a b^T) without materialising a transpose."""
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _iota(L: int):
    return lax.broadcasted_iota(jnp.int32, (L, L), 0), lax.broadcasted_iota(jnp.int32, (L, L), 1)


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _col_to_row(x_col, eye):
    """[L, 1] -> [1, L] (a transpose by masked reduction: cheap at L <= 128, and portable)."""
    return jnp.sum(jnp.where(eye, x_col, 0.0), axis=0, keepdims=True)


def _masked_exp(x, mask):
    return jnp.exp(x) if mask is None else jnp.exp(jnp.where(mask, x, -jnp.inf))


class _Gates(NamedTuple):
    """Decay factors of one chunk (as ``ssm.gated_delta._intra_chunk_decay``)."""

    decay: jax.Array  # [L, L] exp(sum_{j<s<=i} g_s), i >= j in one segment, else 0
    init: jax.Array  # [L, 1] exp(sum_{s<=i} g_s) while in the segment entering the chunk
    last: jax.Array  # [L, 1] exp(sum_{s>j} g_s) for j in the segment leaving the chunk
    carry: jax.Array  # [1, 1] exp(sum_s g_s) when no segment starts inside the chunk


def _gates(g_col, seg_col) -> _Gates:
    L = g_col.shape[0]
    r, c = _iota(L)
    eye = r == c
    g_row = _col_to_row(g_col, eye)
    # ss[i, j] = sum_{j<s<=i} g_s as (ones on and below the diagonal) @ (g_s where s > j): a sum
    # of the terms themselves, never a difference of cumulative sums (gates of -1e3 stay exact).
    ss = _mm((r >= c).astype(_F32), jnp.where(r > c, g_col, 0.0), precision=_HIGHEST)
    cum_col = _rowsum(jnp.where(c <= r, g_row, 0.0))  # sum_{s<=i} g_s
    after_col = _rowsum(jnp.where(c > r, g_row, 0.0))  # sum_{s>j} g_s
    total = jnp.sum(g_col, axis=0, keepdims=True)
    live = r >= c
    sees_init = in_last = carries = None
    if seg_col is not None:
        # seg_col: index of the segment within the chunk (0 = the one open when it started).
        live = live & (seg_col == _col_to_row(seg_col, eye))
        last = jnp.max(seg_col, axis=0, keepdims=True)
        sees_init, in_last, carries = seg_col == 0.0, seg_col == last, last == 0.0
    return _Gates(
        decay=_masked_exp(ss, live),
        init=_masked_exp(cum_col, sees_init),
        last=_masked_exp(after_col, in_last),
        carry=_masked_exp(total, carries),
    )


def _unit_lower_inverse_t(a):
    """(I + a)^-T for strictly lower-triangular ``a [L, L]``, by forward substitution.

    Column i of the result is row i of the inverse: e_i - sum_{j<i} a[i, j] (row j), which only
    needs rows already final. Each step is element-wise work over one [L, L] tile (the row of a is
    picked by a masked reduction), so the loop runs in registers / VMEM."""
    L = a.shape[0]
    r, c = _iota(L)
    r_col = lax.broadcasted_iota(jnp.int32, (L, 1), 0)

    def row(i, tt):
        a_row = jnp.sum(jnp.where(r == i, a, 0.0), axis=0, keepdims=True)  # a[i, :] as [1, L]
        col = (r_col == i).astype(_F32) - _rowsum(tt * a_row)
        return jnp.where(c == i, col, tt)

    return lax.fori_loop(1, L, row, (r == c).astype(_F32))


def _gate_cotangent(z, x_init, x_last, x_carry):
    """dg [L, 1] from the decays' cotangents times the decays (see
    ``ssm.gated_delta._gate_cotangent``): z [L, L], x_init / x_last [L, 1], x_carry [1, 1]."""
    L = z.shape[0]
    r, c = _iota(L)
    eye = r == c
    r_sj = _mm((c >= r).astype(_F32), z, precision=_HIGHEST)  # sum_{i>=s} z_ij
    dg = _rowsum(jnp.where(c < r, r_sj, 0.0))  # ... over j < s
    dg = dg + _rowsum(jnp.where(c >= r, _col_to_row(x_init, eye), 0.0))  # sum_{i>=s} x_i
    dg = dg + _rowsum(jnp.where(c < r, _col_to_row(x_last, eye), 0.0))  # sum_{j<s} x_j
    return dg + x_carry


def _load(ref):
    return ref[...].astype(_F32)


def _store(ref, x):
    ref[...] = x.astype(ref.dtype)


def _split_seg(refs, segments: bool):
    """Kernel refs are (inputs..., [seg], outputs...): pop the optional segment column."""
    if not segments:
        return refs, None
    return refs[:-1], refs[-1]


# ----------------------------------------------------------------------------------------------
# Kernels (one chunk of one head of one sequence per program)
# ----------------------------------------------------------------------------------------------


def _prepare_kernel(*refs, segments: bool, save_t: bool):
    n_out = 5 if save_t else 4
    ins, outs = refs[: len(refs) - n_out], refs[len(refs) - n_out:]
    (k_ref, v_ref, g_ref, beta_ref), seg_ref = _split_seg(ins, segments)
    k, v, beta = _load(k_ref), _load(v_ref), _load(beta_ref)
    gt = _gates(_load(g_ref), None if seg_ref is None else _load(seg_ref))
    L, K = k.shape
    r, c = _iota(L)
    a = jnp.where(r > c, beta * gt.decay * _mm(k, k, tb=True), 0.0)
    tt = _unit_lower_inverse_t(a)
    u_tilde = _mm(tt, beta * v, ta=True)
    w = _mm(tt, (beta * gt.init) * k, ta=True)
    k_last = gt.last * k
    rk, ck = _iota(K)
    _store(outs[0], u_tilde)
    _store(outs[1], w)
    _store(outs[2], jnp.where(rk == ck, gt.carry, 0.0) - _mm(k_last, w, ta=True))  # M
    _store(outs[3], _mm(k_last, u_tilde, ta=True))  # C
    if save_t:
        _store(outs[4], tt)


def _output_kernel(*refs, segments: bool, scale: float):
    ins, (o_ref,) = refs[:-1], refs[-1:]
    (q_ref, k_ref, g_ref, u_ref, w_ref, s_ref), seg_ref = _split_seg(ins, segments)
    q, k, s = _load(q_ref), _load(k_ref), _load(s_ref)
    gt = _gates(_load(g_ref), None if seg_ref is None else _load(seg_ref))
    u = _load(u_ref) - _mm(_load(w_ref), s)
    p = _mm(q, k, tb=True) * gt.decay
    _store(o_ref, scale * (_mm(gt.init * q, s) + _mm(p, u)))


def _state_source_kernel(*refs, segments: bool, scale: float):
    ins, (g_out,) = refs[:-1], refs[-1:]
    (q_ref, k_ref, g_ref, w_ref, do_ref), seg_ref = _split_seg(ins, segments)
    q, k = _load(q_ref), _load(k_ref)
    gt = _gates(_load(g_ref), None if seg_ref is None else _load(seg_ref))
    do = scale * _load(do_ref)
    du_o = _mm(_mm(q, k, tb=True) * gt.decay, do, ta=True)  # P^T dO'
    _store(g_out, _mm(gt.init * q, do, ta=True) - _mm(_load(w_ref), du_o, ta=True))


def _bwd_output_kernel(*refs, segments: bool, scale: float):
    ins, outs = refs[:-5], refs[-5:]
    (q_ref, k_ref, g_ref, u_ref, w_ref, s_ref, dso_ref, do_ref), seg_ref = _split_seg(ins, segments)
    dq_ref, dk_ref, du_ref, dw_ref, dg_ref = outs
    q, k, s, dso = _load(q_ref), _load(k_ref), _load(s_ref), _load(dso_ref)
    gt = _gates(_load(g_ref), None if seg_ref is None else _load(seg_ref))
    do = scale * _load(do_ref)
    p = _mm(q, k, tb=True) * gt.decay
    u = _load(u_ref) - _mm(_load(w_ref), s)
    k_last = gt.last * k
    du = _mm(p, do, ta=True) + _mm(k_last, dso)
    dq_init = _mm(do, s, tb=True)
    dk_last = _mm(u, dso, tb=True)
    dp = _mm(do, u, tb=True)
    dqk = dp * gt.decay
    _store(dq_ref, _mm(dqk, k) + gt.init * dq_init)
    _store(dk_ref, _mm(dqk, q, ta=True) + gt.last * dk_last)
    _store(du_ref, du)
    _store(dw_ref, -_mm(du, s, tb=True))
    d_carry = jnp.sum(_rowsum(s * dso), axis=0, keepdims=True)
    _store(dg_ref, _gate_cotangent(
        dp * p, _rowsum(q * dq_init) * gt.init, _rowsum(k * dk_last) * gt.last, d_carry * gt.carry
    ))


def _bwd_ut_kernel(*refs, segments: bool):
    ins, outs = refs[:-4], refs[-4:]
    (k_ref, v_ref, g_ref, beta_ref, t_ref, u_ref, w_ref, du_ref, dw_ref), seg_ref = _split_seg(
        ins, segments
    )
    dk_ref, dv_ref, dg_ref, dbeta_ref = outs
    k, v, beta, tt = _load(k_ref), _load(v_ref), _load(beta_ref), _load(t_ref)
    gt = _gates(_load(g_ref), None if seg_ref is None else _load(seg_ref))
    L = k.shape[0]
    r, c = _iota(L)
    dbv = _mm(tt, _load(du_ref))  # T^T du: cotangent of beta v
    dbk = _mm(tt, _load(dw_ref))  # T^T dw: cotangent of beta a k
    da = -(_mm(dbv, _load(u_ref), tb=True) + _mm(dbk, _load(w_ref), tb=True))
    da = jnp.where(r > c, da * gt.decay, 0.0)  # dA_ij D_ij on A's support
    kk = _mm(k, k, tb=True)
    dkk = beta * da
    _store(dk_ref, _mm(dkk, k) + _mm(dkk, k, ta=True) + (beta * gt.init) * dbk)
    _store(dv_ref, beta * dbv)
    k_dbk = _rowsum(k * dbk)
    _store(dbeta_ref, _rowsum(da * kk) + _rowsum(v * dbv) + gt.init * k_dbk)
    zero = jnp.zeros((1, 1), _F32)
    _store(dg_ref, _gate_cotangent(dkk * kk, beta * k_dbk * gt.init, jnp.zeros_like(k_dbk), zero))


# ----------------------------------------------------------------------------------------------
# Forward / backward on kernel layouts
# ----------------------------------------------------------------------------------------------


def _sds(shape, dtype=_F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _with_seg(cfg: _Cfg, args, specs, seg):
    if cfg.segments:
        return args + [seg], specs + [_seg(cfg.L)]
    return args, specs


def _forward(cfg: _Cfg, q, k, v, g, beta, S0, seg, save_t: bool):
    B, H, T_pad, K = q.shape
    V = v.shape[-1]
    L, n = cfg.L, T_pad // cfg.L
    grid = (B, H, n)
    args, specs = _with_seg(cfg, [k, v, g, beta], [_seq(L, K), _seq(L, V), _seq(L, 1), _seq(L, 1)], seg)
    out_specs = [_seq(L, V), _seq(L, K), _state(K, K), _state(K, V)]
    out_shape = [_sds((B, H, T_pad, V)), _sds((B, H, T_pad, K)), _sds((n, B, H, K, K)),
                 _sds((n, B, H, K, V))]
    if save_t:
        out_specs.append(_seq(L, L))
        out_shape.append(_sds((B, H, T_pad, L)))
    kernel = functools.partial(_prepare_kernel, segments=cfg.segments, save_t=save_t)
    outs = _pallas(cfg, kernel, grid, specs, out_specs, out_shape)(*args)
    u_tilde, w, m_kk, c_kv = outs[:4]
    tt = outs[4] if save_t else None

    def step(S_bhkv, xs):
        m_c, c_c = xs
        return jnp.einsum("bhkj,bhjv->bhkv", m_c, S_bhkv) + c_c, S_bhkv

    S_final, S_in = lax.scan(step, S0, (m_kk, c_kv))  # S_in [n, B, H, K, V]

    args, specs = _with_seg(
        cfg, [q, k, g, u_tilde, w, S_in],
        [_seq(L, K), _seq(L, K), _seq(L, 1), _seq(L, V), _seq(L, K), _state(K, V)], seg)
    kernel = functools.partial(_output_kernel, segments=cfg.segments, scale=cfg.scale)
    o = _pallas(cfg, kernel, grid, specs, _seq(L, V), _sds((B, H, T_pad, V), v.dtype))(*args)
    return o, S_final, (u_tilde, w, m_kk, tt, S_in)


def _backward(cfg: _Cfg, inputs, saved, do, dS_final):
    q, k, v, g, beta, seg = inputs
    u_tilde, w, m_kk, tt, S_in = saved
    B, H, T_pad, K = q.shape
    V = v.shape[-1]
    L, n = cfg.L, T_pad // cfg.L
    grid = (B, H, n)

    args, specs = _with_seg(cfg, [q, k, g, w, do],
                            [_seq(L, K), _seq(L, K), _seq(L, 1), _seq(L, K), _seq(L, V)], seg)
    kernel = functools.partial(_state_source_kernel, segments=cfg.segments, scale=cfg.scale)
    g_kv = _pallas(cfg, kernel, grid, specs, _state(K, V), _sds((n, B, H, K, V)))(*args)

    def step(dS_bhkv, xs):
        m_c, g_c = xs
        return jnp.einsum("bhjk,bhjv->bhkv", m_c, dS_bhkv) + g_c, dS_bhkv

    dS0, dS_out = lax.scan(step, dS_final, (m_kk, g_kv), reverse=True)

    args, specs = _with_seg(
        cfg, [q, k, g, u_tilde, w, S_in, dS_out, do],
        [_seq(L, K), _seq(L, K), _seq(L, 1), _seq(L, V), _seq(L, K), _state(K, V), _state(K, V),
         _seq(L, V)], seg)
    out_specs = [_seq(L, K), _seq(L, K), _seq(L, V), _seq(L, K), _seq(L, 1)]
    out_shape = [_sds(q.shape, q.dtype), _sds((B, H, T_pad, K)), _sds((B, H, T_pad, V)),
                 _sds((B, H, T_pad, K)), _sds((B, H, T_pad, 1))]
    kernel = functools.partial(_bwd_output_kernel, segments=cfg.segments, scale=cfg.scale)
    dq, dk_o, du, dw, dg_o = _pallas(cfg, kernel, grid, specs, out_specs, out_shape)(*args)

    args, specs = _with_seg(
        cfg, [k, v, g, beta, tt, u_tilde, w, du, dw],
        [_seq(L, K), _seq(L, V), _seq(L, 1), _seq(L, 1), _seq(L, L), _seq(L, V), _seq(L, K),
         _seq(L, V), _seq(L, K)], seg)
    out_specs = [_seq(L, K), _seq(L, V), _seq(L, 1), _seq(L, 1)]
    out_shape = [_sds((B, H, T_pad, K)), _sds(v.shape, v.dtype), _sds((B, H, T_pad, 1)),
                 _sds((B, H, T_pad, 1))]
    kernel = functools.partial(_bwd_ut_kernel, segments=cfg.segments)
    dk_u, dv, dg_u, dbeta = _pallas(cfg, kernel, grid, specs, out_specs, out_shape)(*args)
    dk = (dk_o + dk_u).astype(k.dtype)
    return dq, dk, dv, dg_o + dg_u, dbeta, dS0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gdn(q, k, v, g, beta, S0, seg, cfg: _Cfg):
    o, S_final, _ = _forward(cfg, q, k, v, g, beta, S0, seg, save_t=False)
    return o, S_final


def _gdn_fwd(q, k, v, g, beta, S0, seg, cfg: _Cfg):
    o, S_final, saved = _forward(cfg, q, k, v, g, beta, S0, seg, save_t=True)
    return (o, S_final), ((q, k, v, g, beta, seg), saved)


def _gdn_bwd(cfg: _Cfg, res, cotangents):
    inputs, saved = res
    do, dS_final = cotangents
    dq, dk, dv, dg, dbeta, dS0 = _backward(cfg, inputs, saved, do, dS_final)
    return dq, dk, dv, dg, dbeta, dS0, None


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def gated_delta_rule_pallas(
    q, k, v, g, beta, *, scale=None, chunk_size=64, initial_state=None, segment_ids=None,
    backend: Optional[str] = None,
):
    """``ssm.gated_delta_rule`` with the per-chunk work in Pallas kernels (module docstring).

    ``backend``: 'gpu' (Triton), 'tpu' (Mosaic) or 'interpret'; default from the default JAX
    backend, so on CPU this runs in interpret mode (correct, slow: for tests). Differentiable in
    reverse mode (custom VJP with Pallas backward kernels); forward mode (jvp) is not defined."""
    backend = pallas_backend() if backend is None else backend
    if backend not in ("gpu", "tpu", "interpret"):
        raise ValueError(f"backend={backend!r}: use 'gpu', 'tpu' or 'interpret'")
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    scale = K ** -0.5 if scale is None else scale
    L = _chunk_len(T, chunk_size)
    if backend != "interpret":
        L = max(L, _MIN_TILE)
    _check_tiles(backend, K, V, L)
    n = -(-T // L)
    pad = n * L - T

    def heads_first(x):  # [B, T, H, D] -> [B, H, T_pad, D]; pads are identity steps (g = beta = 0)
        return jnp.swapaxes(_pad_time(x, pad), 1, 2)

    g_col = heads_first(g.astype(_F32)[..., None])
    beta_col = heads_first(beta.astype(_F32)[..., None])
    seg = None
    if segment_ids is not None:
        # Index of the segment within its chunk: resets counted from the chunk's start.
        reset = _pad_time(_resets(segment_ids), pad).reshape(B, n, L).astype(jnp.int32)
        seg = jnp.cumsum(reset, axis=-1).reshape(B, n * L, 1).astype(_F32)
    S0 = jnp.zeros((B, H, K, V), _F32) if initial_state is None else initial_state.astype(_F32)
    cfg = _Cfg(backend=backend, scale=float(scale), L=L, segments=seg is not None)
    o, S_final = _gdn(heads_first(q), heads_first(k), heads_first(v), g_col, beta_col, S0, seg, cfg)
    return jnp.swapaxes(o, 1, 2)[:, :T].astype(out_dtype), S_final
