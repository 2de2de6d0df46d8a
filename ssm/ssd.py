"""Mamba-2 state-space duality (SSD): chunked kernel, reference scan, decode step.

Recurrence per head h (group g = h // (H // G)), state ``h [P, N]``::

    h   = exp(dt_t * A) * h + dt_t * x_t B_t^T
    y_t = h C_t

No D skip connection here (the layer adds it). Heads are kept split as ``(g r)`` inside the
chunked kernel so that ``C B^T`` is computed once per group and shared by its heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from .gated_delta import _chunk_len, _intra_chunk_decay, _pad_time, _resets, _segment_masks

__all__ = ["ssd", "ssd_reference", "ssd_step"]

_F32 = jnp.float32


def ssd_step(state, x, dt, A, B, C):
    """One decode step. x ``[b,H,P]``, dt ``[b,H]``, A ``[H]``, B, C ``[b,G,N]``,
    state ``[b,H,P,N]``. Returns ``(y [b,H,P] in x.dtype, new_state fp32)``."""
    out_dtype = x.dtype
    H, G = x.shape[1], B.shape[1]
    x, dt, A, B, C = (t.astype(_F32) for t in (x, dt, A, B, C))
    B_bhn = jnp.repeat(B, H // G, axis=1)
    C_bhn = jnp.repeat(C, H // G, axis=1)
    decay_bh = jnp.exp(dt * A)
    S = decay_bh[..., None, None] * state.astype(_F32)
    S = S + (dt[..., None] * x)[..., :, None] * B_bhn[..., None, :]
    y = jnp.einsum("bhpn,bhn->bhp", S, C_bhn)
    return y.astype(out_dtype), S


def ssd_reference(x, dt, A, B, C, *, chunk_size=64, initial_state=None, segment_ids=None):
    """Step-by-step ``lax.scan`` over time (ground truth). ``chunk_size`` is ignored."""
    del chunk_size
    b, T, H, P = x.shape
    N = B.shape[-1]
    S0 = jnp.zeros((b, H, P, N), _F32) if initial_state is None else initial_state.astype(_F32)
    reset_bt = jnp.zeros((b, T), bool) if segment_ids is None else _resets(segment_ids)

    def body(S, xs):
        x_t, dt_t, B_t, C_t, r_t = xs
        S = jnp.where(r_t[:, None, None, None], 0.0, S)
        y_t, S = ssd_step(S, x_t, dt_t, A, B_t, C_t)
        return S, y_t

    time_major = [jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C, reset_bt)]
    S, y_tbhp = jax.lax.scan(body, S0, time_major)
    return jnp.moveaxis(y_tbhp, 0, 1), S


def ssd(x, dt, A, B, C, *, chunk_size=64, initial_state=None, segment_ids=None):
    """Chunked SSD. x ``[b,T,H,P]``, dt ``[b,T,H]`` (> 0), A ``[H]`` (< 0), B, C ``[b,T,G,N]``,
    initial_state ``[b,H,P,N]``, segment_ids ``[b,T]`` int.

    Returns ``(y [b,T,H,P] in x.dtype, final_state [b,H,P,N] fp32)``. All math in fp32."""
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    if H % G:
        raise ValueError(f"H={H} must be divisible by G={G}")
    out_dtype = x.dtype
    L = _chunk_len(T, chunk_size)
    n = -(-T // L)
    pad = n * L - T

    # Pads use dt = 0 (decay 1, no input): the state passes through unchanged.
    def chunks(t, pattern, **sizes):
        return rearrange(_pad_time(t.astype(_F32), pad), pattern, l=L, **sizes)

    x_nbgrlp = chunks(x, "b (n l) (g r) p -> n b g r l p", g=G)
    dt_nbgrl = chunks(dt, "b (n l) (g r) -> n b g r l", g=G)
    B_nbgln = chunks(B, "b (n l) g d -> n b g l d")
    C_nbgln = chunks(C, "b (n l) g d -> n b g l d")
    A_gr1 = rearrange(A.astype(_F32), "(g r) -> g r 1", g=G)
    masks = _segment_masks(segment_ids, n * L, L, head_axes=2)

    decay_ij, decay_init, decay_last, carry_nbgr = _intra_chunk_decay(dt_nbgrl * A_gr1, masks)
    xdt_nbgrlp = x_nbgrlp * dt_nbgrl[..., None]

    # Intra-chunk (quadratic, attention-like) term; C B^T is shared by the heads of a group.
    cb_nbgll = jnp.einsum("...id,...jd->...ij", C_nbgln, B_nbgln)
    scores_nbgrll = cb_nbgll[:, :, :, None] * decay_ij
    y_nbgrlp = jnp.einsum("...ij,...jp->...ip", scores_nbgrll, xdt_nbgrlp)

    # State contributed by each chunk on its own, then the (diagonal) inter-chunk recurrence.
    local_nbgrpd = jnp.einsum(
        "nbgrlp,nbgld->nbgrpd", xdt_nbgrlp * decay_last[..., None], B_nbgln
    )
    if initial_state is None:
        S0 = jnp.zeros((b, G, H // G, P, N), _F32)
    else:
        S0 = rearrange(initial_state.astype(_F32), "b (g r) p d -> b g r p d", g=G)

    def step(S, xs):
        carry, local = xs
        return carry[..., None, None] * S + local, S

    S_final, S_in_nbgrpd = jax.lax.scan(step, S0, (carry_nbgr, local_nbgrpd))

    # Contribution of the state entering each chunk, decayed to each position.
    y_nbgrlp = y_nbgrlp + decay_init[..., None] * jnp.einsum(
        "nbgld,nbgrpd->nbgrlp", C_nbgln, S_in_nbgrpd
    )
    y = rearrange(y_nbgrlp, "n b g r l p -> b (n l) (g r) p")[:, :T]
    return y.astype(out_dtype), rearrange(S_final, "b g r p d -> b (g r) p d")
