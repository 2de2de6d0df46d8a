"""Gated DeltaNet linear recurrence: chunked (WY / UT-transform) kernel, reference scan, decode step.

Recurrence per head, state ``S [K, V]``::

    S   = exp(g_t) * S
    u_t = beta_t * (v_t - S^T k_t)
    S   = S + k_t u_t^T
    o_t = scale * S^T q_t

Also holds the chunking helpers shared with ``ssm.ssd`` (padding, segment-sum, segment masks).
Layout inside the chunked kernels is ``[n, b, h, l, d]`` (chunk index first) so that ``lax.scan``
walks chunks without transposes and every other op is one batched einsum.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from einops import rearrange

__all__ = ["gated_delta_rule", "gated_delta_rule_reference", "gated_delta_step"]

_F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Shared chunking helpers (also used by ssm.ssd)
# ----------------------------------------------------------------------------------------------


def _chunk_len(T: int, chunk_size: int) -> int:
    """Chunk length: ``chunk_size``, shrunk to the next power of two >= T for short inputs
    (avoids padding a 1-token call to 64)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    p = 1
    while p < T:
        p *= 2
    return max(1, min(chunk_size, p))


def _pad_time(x: jax.Array, pad: int) -> jax.Array:
    """Zero-pad axis 1 (time) at the end."""
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def _resets(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` bool, True at t > 0 where the segment id changes (state is zeroed before step t)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(change, ((0, 0), (1, 0)))


class _SegMasks(NamedTuple):
    """Per-chunk segment masks, with broadcastable head axes: ``[n, b, 1, ...]``."""

    same: jax.Array  # [n b 1 L L] positions i, j in the same segment
    sees_init: jax.Array  # [n b 1 L] position still in the segment that entered the chunk
    in_last: jax.Array  # [n b 1 L] position in the segment that leaves the chunk
    carries: jax.Array  # [n b 1] no boundary inside the chunk: incoming state flows through


def _segment_masks(
    segment_ids: Optional[jax.Array], T_pad: int, L: int, head_axes: int = 1
) -> Optional[_SegMasks]:
    """Masks for chunks of length L; ``head_axes`` singleton axes are inserted after the batch
    axis so the masks broadcast against ``[n, b, <heads...>, l]`` tensors."""
    if segment_ids is None:
        return None
    reset_bt = _pad_time(_resets(segment_ids), T_pad - segment_ids.shape[1])  # pads never reset
    reset_nbl = rearrange(reset_bt, "b (n l) -> n b l", l=L)
    # Index of the segment within the chunk (0 = the one that was open when the chunk started).
    # Counting resets (rather than comparing raw ids) is robust to ids that repeat non-contiguously.
    seg = jnp.cumsum(reset_nbl.astype(jnp.int32), axis=-1)
    seg = seg.reshape(seg.shape[:2] + (1,) * head_axes + seg.shape[2:])
    return _SegMasks(
        same=seg[..., :, None] == seg[..., None, :],
        sees_init=seg == 0,
        in_last=seg == seg[..., -1:],
        carries=seg[..., -1] == 0,
    )


def _segsum(a: jax.Array) -> jax.Array:
    """``out[..., i, j] = sum_{j < s <= i} a[..., s]`` for i >= j (entries with i < j are junk).

    Summing only the relevant terms (instead of ``cumsum_i - cumsum_j``) keeps fp32 precision when
    a very negative gate sits earlier in the chunk (cancellation of two large cumulative sums).
    The running sum over s is a matmul with a lower-triangular ones matrix: on CPU XLA lowers
    ``cumsum`` to a slow reduce-window, while this is one batched GEMM (and so is its transpose)."""
    L = a.shape[-1]
    s_gt_j = jnp.tril(jnp.ones((L, L), dtype=bool), -1)  # [s, j]: s > j
    terms = jnp.where(s_gt_j, a[..., :, None], 0.0)  # terms[..., s, j] = a_s if s > j
    return jnp.einsum("is,...sj->...ij", jnp.tril(jnp.ones((L, L), a.dtype)), terms)


def _unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + a)^-1 for strictly lower-triangular ``a [..., L, L]``, by forward substitution.

    Row i of T = (I + a)^-1 is e_i - a[i, :] T (rows j >= i of T still hold e_j, which a[i, j]
    zeroes), so a ``fori_loop`` over rows computes all chunks' inverses at once. Measured on CPU
    against ``solve_triangular`` (LAPACK trsm per matrix: several times slower), recursive block
    doubling and blocked forward substitution over 8- or 16-row diagonal blocks (at best ~25%
    faster on this ~3% share of a forward+backward, for 3-8x longer XLA compiles).
    Never differentiated: the chunked kernel's backward uses T itself (see _chunked_backward)."""
    L = a.shape[-1]
    eye = jnp.eye(L, dtype=a.dtype)

    def row(i, t):
        a_i = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)  # [..., L]
        t_i = eye[i] - jnp.einsum("...j,...jk->...k", a_i, t)
        return jax.lax.dynamic_update_index_in_dim(t, t_i, i, axis=-2)

    return jax.lax.fori_loop(1, L, row, jnp.broadcast_to(eye, a.shape))


def _masked_exp(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """exp(x) with the mask applied BEFORE exp, so masked-out (possibly positive, huge) exponents
    never overflow and their gradients are exactly zero."""
    if mask is None:
        return jnp.exp(x)
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def _intra_chunk_decay(log_a_nbhl: jax.Array, masks: Optional[_SegMasks]):
    """Decay factors of one chunk from per-step log decays ``la`` (all <= 0).

    Returns ``(decay_ij [.. L L], decay_init [.. L], decay_last [.. L], carry [..])``:
      decay_ij[i, j] = exp(sum_{j<s<=i} la_s) for i >= j within one segment, else 0;
      decay_init[i]  = exp(sum_{s<=i} la_s)  (weight of the incoming state at i, 0 after a reset);
      decay_last[j]  = exp(sum_{j<s<L} la_s) (weight of step j in the outgoing state, 0 if a reset
                       follows j inside the chunk);
      carry          = exp(sum_{s<L} la_s)   (weight of the incoming state in the outgoing one)."""
    L = log_a_nbhl.shape[-1]
    ss = _segsum(log_a_nbhl)
    causal = jnp.tril(jnp.ones((L, L), dtype=bool))
    cum = ss[..., :, 0] + log_a_nbhl[..., :1]  # sum_{s<=i} la_s: la_0 plus column 0 of the segsum
    if masks is None:
        decay_ij = _masked_exp(ss, causal)
        decay_init = jnp.exp(cum)
        decay_last = jnp.exp(ss[..., -1, :])
        carry = decay_init[..., -1]
    else:
        decay_ij = _masked_exp(ss, causal & masks.same)
        decay_init = _masked_exp(cum, masks.sees_init)
        decay_last = _masked_exp(ss[..., -1, :], masks.in_last)
        carry = _masked_exp(cum[..., -1], masks.carries)
    return decay_ij, decay_init, decay_last, carry


# ----------------------------------------------------------------------------------------------
# Gated DeltaNet
# ----------------------------------------------------------------------------------------------


def gated_delta_step(state, q, k, v, g, beta, *, scale=None):
    """One decode step. q, k ``[B,H,K]``, v ``[B,H,V]``, g, beta ``[B,H]``, state ``[B,H,K,V]``.

    Returns ``(o [B,H,V] in v.dtype, new_state fp32)``."""
    out_dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = state.astype(_F32) * jnp.exp(g.astype(_F32))[..., None, None]
    q, k, v, beta = (x.astype(_F32) for x in (q, k, v, beta))
    u = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, S))
    S = S + k[..., :, None] * u[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, S)
    return o.astype(out_dtype), S


def gated_delta_rule_reference(
    q, k, v, g, beta, *, scale=None, chunk_size=64, initial_state=None, segment_ids=None
):
    """Step-by-step ``lax.scan`` over time (ground truth for the chunked kernel).

    ``chunk_size`` is accepted for signature parity and ignored."""
    del chunk_size
    B, T, H, K = q.shape
    V = v.shape[-1]
    S0 = jnp.zeros((B, H, K, V), _F32) if initial_state is None else initial_state.astype(_F32)
    reset_bt = jnp.zeros((B, T), bool) if segment_ids is None else _resets(segment_ids)

    def body(S, xs):
        q_t, k_t, v_t, g_t, b_t, r_t = xs
        S = jnp.where(r_t[:, None, None, None], 0.0, S)
        o_t, S = gated_delta_step(S, q_t, k_t, v_t, g_t, b_t, scale=scale)
        return S, o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, reset_bt)]
    S, o_tbhv = jax.lax.scan(body, S0, time_major)
    return jnp.moveaxis(o_tbhv, 0, 1), S


def gated_delta_rule(
    q, k, v, g, beta, *, scale=None, chunk_size=64, initial_state=None, segment_ids=None
):
    """Chunked Gated DeltaNet (WY representation). Shapes as in ``gated_delta_rule_reference``:
    q, k ``[B,T,H,K]``, v ``[B,T,H,V]``, g (log decay <= 0), beta ``[B,T,H]``,
    initial_state ``[B,H,K,V]``, segment_ids ``[B,T]`` int.

    Returns ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] fp32)``. All math in fp32.
    Differentiable in reverse mode (a hand-written VJP, below); forward mode (jvp) is not defined."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    scale = K ** -0.5 if scale is None else scale
    L = _chunk_len(T, chunk_size)
    n = -(-T // L)
    pad = n * L - T

    # Pads use g = 0, beta = 0 (and zero q/k/v): an identity step, so the final state is unchanged.
    def chunks(x, pattern):
        return rearrange(_pad_time(x.astype(_F32), pad), pattern, l=L)

    q_nbhlk = chunks(q, "b (n l) h k -> n b h l k")
    k_nbhlk = chunks(k, "b (n l) h k -> n b h l k")
    v_nbhlv = chunks(v, "b (n l) h v -> n b h l v")
    g_nbhl = chunks(g, "b (n l) h -> n b h l")
    beta_nbhl = chunks(beta, "b (n l) h -> n b h l")
    masks = _segment_masks(segment_ids, n * L, L)
    S0 = jnp.zeros((B, H, K, V), _F32) if initial_state is None else initial_state.astype(_F32)

    o_nbhlv, S_final = _chunked(q_nbhlk, k_nbhlk, v_nbhlv, g_nbhl, beta_nbhl, S0, masks)
    o = rearrange(scale * o_nbhlv, "n b h l v -> b (n l) h v")[:, :T]
    return o.astype(out_dtype), S_final


# ----------------------------------------------------------------------------------------------
# The chunked kernel on [n, b, h, l, d] fp32 tensors, with a hand-written backward
# ----------------------------------------------------------------------------------------------
#
# Per chunk (index c dropped), with D, a, e, gamma from ``_intra_chunk_decay`` and S the state
# entering the chunk:
#
#   A  = strict_tril(beta_i D_ij k_i.k_j)          T = (I + A)^-1
#   [U~ | W] = T [beta v | beta a k]                 (UT transform)
#   U  = U~ - W S                                    (pseudo-values)
#   O  = (a q) S + P U,   P = (q k^T) * D            (unscaled output; the caller scales)
#   S' = gamma S + (e k)^T U
#
# Only S -> S' is sequential. The backward runs the transposed recurrence
#   dS = M^T dS' + G,   M = gamma I - (e k)^T W,   G = (a q)^T dO - W^T P^T dO
# (one matmul per chunk instead of two), everything else batched over all chunks at once. The
# UT transform's cotangent needs no L x L x L product: with [X | Y] = T^T [dU | dW],
#   dA = -strict_tril(X U~^T + Y W^T)        (= -T^T dT T^T)
# and the gate's cotangent reaches g through the same triangular sums as the forward's segsum.


def _tri_ones(L: int, k: int, upper: bool = False) -> jax.Array:
    """``[L, L]`` fp32 ones on and below (``upper``: on and above) diagonal ``k``."""
    ones = jnp.ones((L, L), _F32)
    return jnp.triu(ones, k) if upper else jnp.tril(ones, k)


def _rowdot(x, y):
    """``sum(x * y, -1)`` as a dot_general: XLA:CPU emits the fused multiply-reduce several times
    slower than the equivalent contraction (measured: ~10x on [32, 1, 4, 64, 64])."""
    return jnp.einsum("...d,...d->...", x, y)


def _chunked_forward(q, k, v, g, beta, S0, masks):
    """Unscaled output [n b h l v], final state [b h k v], and what the backward reuses."""
    L = q.shape[-2]
    decay_ij, decay_init, decay_last, carry_nbh = _intra_chunk_decay(g, masks)

    # UT transform. With S0 the state entering the chunk, the pseudo-values u satisfy
    #   u_i = beta_i (v_i - decay_init_i S0^T k_i) - sum_{j<i} beta_i decay_ij (k_i.k_j) u_j,
    # i.e. (I + A) u = beta v - beta decay_init k S0 with A strictly lower triangular, so
    # u = u_tilde - w S0 where [u_tilde, w] = (I + A)^-1 [beta v, beta decay_init k].
    strict = jnp.tril(jnp.ones((L, L), dtype=bool), -1)
    kk_nbhll = jnp.einsum("...ik,...jk->...ij", k, k)
    a_nbhll = jnp.where(strict, beta[..., :, None] * kk_nbhll * decay_ij, 0.0)
    t_nbhll = _unit_lower_inverse(a_nbhll)
    # Two products rather than one with [beta v | beta decay_init k] concatenated: XLA:CPU runs
    # the [L, L] x [L, 2d] batched dot several times slower than two [L, L] x [L, d] ones.
    u_tilde = jnp.einsum("...ij,...jd->...id", t_nbhll, beta[..., None] * v)
    w = jnp.einsum("...ij,...jd->...id", t_nbhll, (beta * decay_init)[..., None] * k)
    k_last = k * decay_last[..., None]  # outgoing state = carry * S0 + sum_j k_last_j u_j^T

    def step(S_bhkv, xs):
        u_tilde_c, w_c, k_last_c, carry_c = xs
        u_c = u_tilde_c - jnp.einsum("bhlk,bhkv->bhlv", w_c, S_bhkv)
        S_next = carry_c[..., None, None] * S_bhkv + jnp.einsum("bhlk,bhlv->bhkv", k_last_c, u_c)
        return S_next, (S_bhkv, u_c)

    # Only the state recurrence is sequential; outputs are computed for all chunks at once below.
    S_final, (S_in_nbhkv, u_nbhlv) = jax.lax.scan(step, S0, (u_tilde, w, k_last, carry_nbh))

    p_nbhll = jnp.einsum("...ik,...jk->...ij", q, k) * decay_ij
    o_nbhlv = jnp.einsum("...lk,...kv->...lv", q * decay_init[..., None], S_in_nbhkv)
    o_nbhlv = o_nbhlv + jnp.einsum("...ij,...jv->...iv", p_nbhll, u_nbhlv)
    res = (q, k, v, beta, decay_ij, decay_init, decay_last, carry_nbh, kk_nbhll, p_nbhll, t_nbhll,
           u_tilde, w, S_in_nbhkv, u_nbhlv)
    return o_nbhlv, S_final, res


def _gate_cotangent(z_ll, x_init, x_last, x_carry):
    """Cotangent of the per-step log decays g [.., L] from the decay factors' cotangents, each
    already multiplied by the factor (d exp(s) = exp(s) ds):
      z_ll   [.., L, L] for decay_ij = exp(sum_{j<s<=i} g_s):  dg_s += sum_{i>=s>j} z_ij
      x_init [.., L]    for decay_init_i = exp(sum_{s<=i} g_s): dg_s += sum_{i>=s} x_i
      x_last [.., L]    for decay_last_j = exp(sum_{s>j} g_s):  dg_s += sum_{j<s} x_j
      x_carry [..]      for carry = exp(sum_s g_s):             dg_s += x_carry
    Sums run over the terms that contain g_s only (no difference of cumulative sums), as
    ``_segsum`` does, for the same fp32 reason."""
    L = z_ll.shape[-1]
    r_sj = jnp.einsum("si,...ij->...sj", _tri_ones(L, 0, upper=True), z_ll)  # sum_{i>=s} z_ij
    dg = jnp.einsum("...sj,sj->...s", r_sj, _tri_ones(L, -1))  # ... over j < s
    dg = dg + jnp.einsum("...i,si->...s", x_init, _tri_ones(L, 0, upper=True))
    dg = dg + jnp.einsum("...j,sj->...s", x_last, _tri_ones(L, -1))
    return dg + x_carry[..., None]


def _chunked_backward(res, do_nbhlv, dS_final):
    (q, k, v, beta, decay_ij, decay_init, decay_last, carry, kk, p, t, u_tilde, w, S_in, u) = res
    K = q.shape[-1]
    q_init = q * decay_init[..., None]
    k_last = k * decay_last[..., None]

    # Transposed state recurrence: dS_in = M^T dS_out + G (dS_out: cotangent of the state
    # leaving the chunk).
    du_o = jnp.einsum("...ij,...iv->...jv", p, do_nbhlv)  # P^T dO: U's cotangent from O
    g_kv = (jnp.einsum("...lk,...lv->...kv", q_init, do_nbhlv)
            - jnp.einsum("...lk,...lv->...kv", w, du_o))
    m_kk = (carry[..., None, None] * jnp.eye(K, dtype=_F32)
            - jnp.einsum("...lk,...lj->...kj", k_last, w))

    def step(dS_bhkv, xs):
        m_c, g_c = xs
        return jnp.einsum("bhjk,bhjv->bhkv", m_c, dS_bhkv) + g_c, dS_bhkv

    dS0, dS_out = jax.lax.scan(step, dS_final, (m_kk, g_kv), reverse=True)

    du = du_o + jnp.einsum("...lk,...kv->...lv", k_last, dS_out)
    dw = -jnp.einsum("...lv,...kv->...lk", du, S_in)
    dq_init = jnp.einsum("...lv,...kv->...lk", do_nbhlv, S_in)
    dk_last = jnp.einsum("...lv,...kv->...lk", u, dS_out)
    dp = jnp.einsum("...iv,...jv->...ij", do_nbhlv, u)
    dcarry = jnp.einsum("...kv,...kv->...", S_in, dS_out)

    # UT transform: [X | Y] = T^T [dU | dW] are the cotangents of [beta v | beta a k];
    # dA = -(X U~^T + Y W^T) on A's strictly lower support.
    dbv = jnp.einsum("...ji,...jd->...id", t, du)
    dbk = jnp.einsum("...ji,...jd->...id", t, dw)
    L = q.shape[-2]
    decay_strict = decay_ij * _tri_ones(L, -1)
    da = jnp.einsum("...id,...jd->...ij", dbv, u_tilde) + jnp.einsum("...id,...jd->...ij", dbk, w)
    da_masked = -da * decay_strict  # dA_ij D_ij
    dkk = beta[..., :, None] * da_masked
    dqk = dp * decay_ij

    dq = jnp.einsum("...ij,...jk->...ik", dqk, k) + decay_init[..., None] * dq_init
    dk = (jnp.einsum("...ij,...ik->...jk", dqk, q)
          + jnp.einsum("...ij,...jk->...ik", dkk + jnp.swapaxes(dkk, -1, -2), k)
          + decay_last[..., None] * dk_last + (beta * decay_init)[..., None] * dbk)
    dv = beta[..., None] * dbv
    k_dbk = _rowdot(k, dbk)
    dbeta = _rowdot(da_masked, kk) + _rowdot(v, dbv) + decay_init * k_dbk
    d_init = _rowdot(q, dq_init) + beta * k_dbk
    d_last = _rowdot(k, dk_last)
    # dD * D: P = (q k^T) D gives dP * P; A = beta D (k k^T) gives dA * A = dkk * kk.
    dg = _gate_cotangent(dp * p + dkk * kk, d_init * decay_init, d_last * decay_last,
                         dcarry * carry)
    return dq, dk, dv, dg, dbeta, dS0


@jax.custom_vjp
def _chunked(q, k, v, g, beta, S0, masks):
    o, S_final, _ = _chunked_forward(q, k, v, g, beta, S0, masks)
    return o, S_final


def _chunked_fwd(q, k, v, g, beta, S0, masks):
    o, S_final, res = _chunked_forward(q, k, v, g, beta, S0, masks)
    return (o, S_final), res


def _chunked_bwd(res, cotangents):
    do, dS_final = cotangents
    return (*_chunked_backward(res, do, dS_final), None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
