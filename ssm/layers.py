"""Linear-recurrent token mixers for the shared block builder: Gated DeltaNet and Mamba-2.

Both follow the mixer interface of ``archs.attention.Attention``:

    y = mixer(x_btd, ctx)                       # whole window (training, scoring)
    y, cache = mixer(x_btd, ctx, cache)         # incremental decoding (prefill or one token)
    cache = mixer.init_cache(batch, max_len, dtype)

Documents packed into one window (``ctx.segment_ids``) never see each other: the recurrent
state is reset where the segment id changes (inside the kernels), and the short causal
convolutions zero every tap that reaches into an earlier document. The decode cache carries the
recurrent state, the last ``conv_kernel - 1`` conv inputs with their segment ids, and the
segment id of the last token, so decoding token by token equals the full forward pass.

Both register with ``archs.mixers`` (letters G and M) when this module is imported, which
``import ssm`` does.

Bidirectional mode (``arch.causal=false``: a masked-diffusion denoiser on a recurrent or hybrid
stack). The mixer scans the window forward and the time-reversed window (reversed segment ids, so
the state resets at the same document boundaries from either side), both in one call of the
chunked kernel over 2B rows [forward; reversed], and adds the two outputs, the backward one
flipped back, before its output path (GDN: per-head norm, gate, W_o; Mamba-2: gated norm,
out_proj).

- Shared by the directions: the input projections (GDN q, k, v and the output gate; Mamba-2
  z, x, B, C), the per-head decay scale A and the output path: nearly all parameters and
  projection FLOPs.
- Per direction: the short convolutions and the data-dependent gates with their biases (GDN:
  the a and beta heads, dt_bias; Mamba-2: the dt head, dt_bias and the D skip), so each
  direction sets its own decay (g = -A softplus(a + dt_bias), dt A) and write strength.

What each conv sees: the forward conv is causal (taps t-k+1 .. t), the backward one is the same
conv over reversed time (taps t .. t+k-1); both zero every tap in another document, as both
scans reset at document starts (forward) and ends (backward). A masked-diffusion denoiser may
see its whole corrupted input, so within a document nothing else is hidden; both directions see
token t itself (its input is [MASK] or, under SUBS, a token whose prediction is a copy anyway).

Why this form: Caduceus (Schiff et al. 2024) shares the in/out projections of its forward and
reverse Mamba ("BiMamba") so bidirectionality does not double the parameters; Hydra (Hwang et
al. 2024) makes the same sharing a quasiseparable matrix mixer (forward and backward shifted off
the diagonal plus a diagonal term) and reports it ahead of adding, concatenating or multiplying
two directions. We add the directions with the diagonal in both: the kernels' readout at t
includes the write at t (GDN o_t = S_t^T q_t), so Hydra's strict halves would need new kernels;
the per-direction convs and gates let each direction weight its own writes. Sharing A keeps the
two directions one kernel call (A is a per-head kernel argument of SSD), which also compiles
about twice as fast as two calls. Cost against the causal layer (k = conv_kernel): parameters
+ k (2 H K + H V) + 2 d H + H (GDN) and + (k + 1)(d_inner + 2 G N) + d H + 2 H (Mamba-2), about
1-2 % of the layer; FLOPs: the projections once (plus the backward gate heads), the convs and the
chunked kernel twice (``recurrent_flops_breakdown``). Bidirectional mixers have no decode cache
(init_cache refuses with one line).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from archs.config import ModelConfig
from archs.context import Ctx
from archs.errors import ConfigError
from archs.layers import RMSNorm, compute_dtype, linear
from archs.mixers import MixerKind, register
from archs.sizes import resolve

from .gated_delta import _chunk_len, gated_delta_step
from .gated_delta_pallas import gated_delta_kernel, resolve_gdn_impl
from .ssd import ssd, ssd_step

__all__ = ["GatedDeltaNet", "Mamba2", "recurrent_flops_breakdown", "recurrent_layer_flops", "recurrent_state_bytes"]

_DT_MIN, _DT_MAX, _DT_FLOOR = 1e-3, 0.1, 1e-4
_A_MIN, _A_MAX = 1.0, 16.0


# ----------------------------------------------------------------------------------------------
# Shared pieces: parameter inits, the short causal convolution, gated RMSNorm
# ----------------------------------------------------------------------------------------------


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """Inverse softplus of dt ~ log-uniform[1e-3, 0.1], so softplus(dt_bias) starts at dt."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(_DT_MAX) - math.log(_DT_MIN)) + math.log(_DT_MIN))
    dt = jnp.maximum(dt, _DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1(dt) = log(exp(dt) - 1)


def _a_log_init(key, shape, dtype=jnp.float32):
    """log of A ~ U(1, 16): per-head decay rates A = -exp(A_log)."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, _A_MIN, _A_MAX)).astype(dtype)


def _conv_init(kernel: int):
    """Depthwise conv weights ~ U(-1/sqrt(k), 1/sqrt(k)) (fan-in of one channel = kernel size)."""
    bound = 1.0 / math.sqrt(kernel)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _param(rngs: nnx.Rngs, init, shape, axes):
    # Created unsharded (placed later by archs.sharding), like archs.layers.partitioned.
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes, eager_sharding=False)


class ShortConv(nnx.Module):
    """Causal depthwise convolution over time, kernel ``k``: ``y_t = sum_i w_i x_{t-k+1+i}``.

    Taps reaching into an earlier document (different segment id) are zeroed; the previous
    call's last ``k - 1`` inputs (and their segment ids) come in as ``prefix``.
    """

    def __init__(self, channels: int, kernel: int, axis: str, *, bias: bool, rngs: nnx.Rngs):
        self.kernel = kernel
        self.w = _param(rngs, _conv_init(kernel), (kernel, channels), ("conv", axis))
        self.b = _param(rngs, nnx.initializers.zeros_init(), (channels,), (axis,)) if bias else None

    def __call__(self, x_btc, seg_bt=None, prefix_bkc=None, prefix_seg_bk=None):
        """Returns (y [B, T, C], new prefix [B, k-1, C], new prefix segment ids [B, k-1] or None)."""
        b, t, c = x_btc.shape
        k = self.kernel
        if prefix_bkc is None:
            prefix_bkc = jnp.zeros((b, k - 1, c), x_btc.dtype)
        xx = jnp.concatenate([prefix_bkc.astype(x_btc.dtype), x_btc], axis=1)  # [B, k-1+T, C]
        w = self.w[...].astype(x_btc.dtype)
        ss = None
        if seg_bt is not None:
            if prefix_seg_bk is None:  # zero prefix: its segment ids do not matter
                prefix_seg_bk = jnp.broadcast_to(seg_bt[:, :1], (b, k - 1))
            ss = jnp.concatenate([prefix_seg_bk.astype(seg_bt.dtype), seg_bt], axis=1)
        y = None
        for s in range(k):  # s: how far back the tap reaches
            tap = xx[:, k - 1 - s: k - 1 - s + t] * w[k - 1 - s]
            if ss is not None and s:
                tap = jnp.where((ss[:, k - 1 - s: k - 1 - s + t] == seg_bt)[..., None], tap, 0)
            y = tap if y is None else y + tap
        if self.b is not None:
            y = y + self.b[...].astype(y.dtype)
        new_prefix = xx[:, t:]  # the last k-1 inputs
        new_seg = ss[:, t:] if ss is not None else None
        return y, new_prefix, new_seg


class GatedRMSNorm(nnx.Module):
    """Mamba-2's gated norm: RMSNorm(y * SiLU(z)) over groups of ``dim // groups`` channels."""

    def __init__(self, dim: int, groups: int = 1, *, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("heads",), eager_sharding=False)
        self.groups, self.eps = groups, eps

    def __call__(self, y, z):
        h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        hg = rearrange(h, "... (g c) -> ... g c", g=self.groups)
        hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + self.eps)
        return (rearrange(hg, "... g c -> ... (g c)") * self.scale[...]).astype(y.dtype)


def _l2norm(x, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _no_decode_cache(what: str):
    raise ConfigError(f"{what} with arch.causal=false is bidirectional and has no decode cache (it needs the "
                      "whole window); sample it with the diffusion samplers, not token-by-token decoding")


def _flip(x):
    """Reverse time (axis 1); None passes through (no segment ids)."""
    return None if x is None else jnp.flip(x, axis=1)


def _stack_directions(fwd, bwd):
    """[forward; reversed] rows along the batch axis, for one kernel call over both directions
    (tuples elementwise; None stays None)."""
    if isinstance(fwd, tuple):
        return tuple(_stack_directions(f, r) for f, r in zip(fwd, bwd))
    return None if fwd is None else jnp.concatenate([fwd, bwd], axis=0)


def _sum_directions(y):
    """Forward rows plus the reversed rows flipped back to forward time."""
    b = y.shape[0] // 2
    return y[:b] + _flip(y[b:])


def _entry_state(state, seg_bt, last_seg_b):
    """Zero the carried state of sequences whose first new token opens a new document."""
    if seg_bt is None:
        return state
    keep = seg_bt[:, 0] == last_seg_b
    return jnp.where(keep[:, None, None, None], state, 0.0)


def _conv_cache(batch: int, kernel: int, channels: int, dtype):
    return jnp.zeros((batch, kernel - 1, channels), dtype)


# ----------------------------------------------------------------------------------------------
# Gated DeltaNet
# ----------------------------------------------------------------------------------------------


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet mixer (Yang et al. 2024): gated delta rule over per-head [K, V] states.

    q, k, v: projection -> short causal conv -> SiLU; q, k L2-normalised per head.
    beta = sigmoid(W_b x); g = -exp(A_log) * softplus(W_a x + dt_bias) (log decay, <= 0).
    Output: RMSNorm(o) * SiLU(W_gate x) per head, then W_o.
    With cfg.causal false, a backward direction (``*_bwd``: convs, W_a, W_b, dt_bias; A_log
    shared) scans the reversed window and its output is added to the forward one (module
    docstring).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = cfg.d_model, cfg.n_heads
        self.h, self.dk = h, cfg.gdn_head_dim
        self.dv = int(round(cfg.gdn_expand_v * cfg.gdn_head_dim))
        if self.dv < 1:
            raise ConfigError(
                f"arch.gdn_expand_v={cfg.gdn_expand_v} gives an empty value head; use a value >= 1 / head_dim"
            )
        kc = cfg.conv_kernel
        if kc < 1:
            raise ConfigError(f"arch.conv_kernel={kc} must be >= 1")
        resolve_gdn_impl(cfg.gdn_impl, self._kernel_dims())  # fails here, before anything compiles
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wq = linear(cfg, d, h * self.dk, ("embed", "heads"), rngs=rngs)
        self.wk = linear(cfg, d, h * self.dk, ("embed", "heads"), rngs=rngs)
        self.wv = linear(cfg, d, h * self.dv, ("embed", "heads"), rngs=rngs)
        self.wa = linear(cfg, d, h, ("embed", "heads"), rngs=rngs)
        self.wb = linear(cfg, d, h, ("embed", "heads"), rngs=rngs)
        self.wg = linear(cfg, d, h * self.dv, ("embed", "heads"), rngs=rngs)
        self.wo = linear(cfg, h * self.dv, d, ("heads", "embed"), rngs=rngs, std=out_std)
        self.conv_q = ShortConv(h * self.dk, kc, "heads", bias=False, rngs=rngs)
        self.conv_k = ShortConv(h * self.dk, kc, "heads", bias=False, rngs=rngs)
        self.conv_v = ShortConv(h * self.dv, kc, "heads", bias=False, rngs=rngs)
        self.A_log = _param(rngs, _a_log_init, (h,), ("heads",))
        self.dt_bias = _param(rngs, _dt_bias_init, (h,), ("heads",))
        self.o_norm = RMSNorm(self.dv)  # per head, one scale vector shared by the heads
        if not cfg.causal:
            self.wa_bwd = linear(cfg, d, h, ("embed", "heads"), rngs=rngs)
            self.wb_bwd = linear(cfg, d, h, ("embed", "heads"), rngs=rngs)
            self.conv_q_bwd = ShortConv(h * self.dk, kc, "heads", bias=False, rngs=rngs)
            self.conv_k_bwd = ShortConv(h * self.dk, kc, "heads", bias=False, rngs=rngs)
            self.conv_v_bwd = ShortConv(h * self.dv, kc, "heads", bias=False, rngs=rngs)
            self.dt_bias_bwd = _param(rngs, _dt_bias_init, (h,), ("heads",))

    def _kernel_dims(self):
        return self.dk, self.dv, self.cfg.chunk_size


    def _direction(self, bwd: bool):
        """(convs q, k, v, W_a, W_b, A_log, dt_bias) of one scan direction (A_log is shared)."""
        sfx = "_bwd" if bwd else ""
        return (*(getattr(self, n + sfx) for n in ("conv_q", "conv_k", "conv_v", "wa", "wb")), self.A_log,
                getattr(self, "dt_bias" + sfx))

    def _heads(self, raw, x_btd, seg, cache, direction):
        """q, k, v (conv + SiLU), g, beta of one direction from the raw projections (q, k, v),
        and the new conv caches. For the backward direction raw, seg and the gates arrive reversed."""
        conv_q, conv_k, conv_v, wa, wb, A_log, dt_bias = direction
        c = cache or {}
        seg_prefix = c.get("conv_seg")
        q, cq, cseg = conv_q(raw[0], seg, c.get("conv_q"), seg_prefix)
        k, ck, _ = conv_k(raw[1], seg, c.get("conv_k"), seg_prefix)
        v, cv, _ = conv_v(raw[2], seg, c.get("conv_v"), seg_prefix)
        q = _l2norm(rearrange(jax.nn.silu(q), "b t (h k) -> b t h k", h=self.h))
        k = _l2norm(rearrange(jax.nn.silu(k), "b t (h k) -> b t h k", h=self.h))
        v = rearrange(jax.nn.silu(v), "b t (h v) -> b t h v", h=self.h)
        beta = jax.nn.sigmoid(wb(x_btd).astype(jnp.float32))
        a = wa(x_btd).astype(jnp.float32) + dt_bias[...]
        g = -jnp.exp(A_log[...]) * jax.nn.softplus(a)
        return q, k, v, g, beta, {"conv_q": cq, "conv_k": ck, "conv_v": cv, "conv_seg": cseg}

    def _project(self, x_btd, seg, cache):
        """q, k, v (after conv + SiLU), g, beta and the new conv caches (forward direction)."""
        raw = (self.wq(x_btd), self.wk(x_btd), self.wv(x_btd))
        return self._heads(raw, x_btd, seg, cache, self._direction(False))

    def _output(self, o_bthv, x_btd):
        gate = rearrange(self.wg(x_btd), "b t (h v) -> b t h v", h=self.h)
        o = self.o_norm(o_bthv) * jax.nn.silu(gate)
        return self.wo(rearrange(o, "b t h v -> b t (h v)"))

    def _bidirectional(self, x_btd, seg):
        """Forward scan + scan of the reversed window (flipped back), summed per head. Both
        directions run as one kernel call over 2B rows [forward; reversed]."""
        raw = (self.wq(x_btd), self.wk(x_btd), self.wv(x_btd))
        fwd = self._heads(raw, x_btd, seg, None, self._direction(False))[:5]
        bwd = self._heads(tuple(map(_flip, raw)), _flip(x_btd), _flip(seg), None, self._direction(True))[:5]
        kernel = gated_delta_kernel(self.cfg.gdn_impl, self._kernel_dims())  # xla | pallas
        o, _ = kernel(*_stack_directions(fwd, bwd), chunk_size=self.cfg.chunk_size,
                      segment_ids=_stack_directions(seg, _flip(seg)))
        return self._output(_sum_directions(o), x_btd)

    def __call__(self, x_btd, ctx: Ctx, cache=None):
        seg = ctx.segment_ids
        if not self.cfg.causal:
            if cache is not None:
                _no_decode_cache("Gated DeltaNet")
            return self._bidirectional(x_btd, seg)
        q, k, v, g, beta, conv = self._project(x_btd, seg, cache)
        gated_delta_rule = gated_delta_kernel(self.cfg.gdn_impl, self._kernel_dims())  # xla | pallas
        if cache is None:
            o, _ = gated_delta_rule(q, k, v, g, beta, chunk_size=self.cfg.chunk_size, segment_ids=seg)
            return self._output(o, x_btd)
        state = _entry_state(cache["state"], seg, cache["seg"])
        if x_btd.shape[1] == 1:
            o, state = gated_delta_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
            o = o[:, None]
        else:
            o, state = gated_delta_rule(q, k, v, g, beta, chunk_size=self.cfg.chunk_size,
                                        initial_state=state, segment_ids=seg)
        new_cache = {"state": state, "seg": seg[:, -1] if seg is not None else cache["seg"], **conv}
        if conv["conv_seg"] is None:
            new_cache["conv_seg"] = cache["conv_seg"]
        return self._output(o, x_btd), new_cache

    def init_cache(self, batch: int, max_len: int, dtype):
        del max_len  # constant-size state
        if not self.cfg.causal:
            _no_decode_cache("Gated DeltaNet")
        kc = self.cfg.conv_kernel
        return {
            "state": jnp.zeros((batch, self.h, self.dk, self.dv), jnp.float32),
            "seg": jnp.zeros((batch,), jnp.int32),
            "conv_q": _conv_cache(batch, kc, self.h * self.dk, dtype),
            "conv_k": _conv_cache(batch, kc, self.h * self.dk, dtype),
            "conv_v": _conv_cache(batch, kc, self.h * self.dv, dtype),
            "conv_seg": jnp.zeros((batch, kc - 1), jnp.int32),
        }


# ----------------------------------------------------------------------------------------------
# Mamba-2
# ----------------------------------------------------------------------------------------------


def mamba_dims(cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    """(d_inner, heads, head_dim P, groups G, state N) of a resolved config."""
    d_inner = cfg.mamba_expand * cfg.d_model
    p = cfg.mamba_head_dim
    return d_inner, d_inner // p, p, cfg.mamba_groups, cfg.mamba_d_state


class Mamba2(nnx.Module):
    """Mamba-2 mixer (Dao & Gu 2024): in_proj -> [z, x, B, C, dt]; conv + SiLU over x, B, C;
    dt = softplus(dt_raw + dt_bias); A = -exp(A_log); y = SSD(x, dt, A, B, C) + D x;
    out_proj(RMSNorm(y * SiLU(z))) with the norm taken per B/C group.

    The in-projection is kept as one linear per output (z, x, B, C, dt): the same matmul work as
    one fused matrix, but each piece carries its own logical axis for tensor parallelism.
    With cfg.causal false, a backward direction (``*_bwd``: convs, dt head, dt_bias, D; A_log
    shared) scans the reversed window and its y is added to the forward one (module docstring).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        d_inner, h, p, g, n = mamba_dims(cfg)
        if h < 1 or d_inner % p:
            raise ConfigError(f"Mamba-2 inner width {d_inner} is not a multiple of arch.mamba_head_dim={p}")
        if g < 1 or h % g:
            raise ConfigError(f"arch.mamba_groups={g} must divide the {h} Mamba-2 heads")
        self.d_inner, self.h, self.p, self.g, self.n = d_inner, h, p, g, n
        kc = cfg.conv_kernel
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.in_z = linear(cfg, d, d_inner, ("embed", "heads"), rngs=rngs)
        self.in_x = linear(cfg, d, d_inner, ("embed", "heads"), rngs=rngs)
        self.in_B = linear(cfg, d, g * n, ("embed", "state"), rngs=rngs)
        self.in_C = linear(cfg, d, g * n, ("embed", "state"), rngs=rngs)
        self.in_dt = linear(cfg, d, h, ("embed", "heads"), rngs=rngs)
        self.conv_x = ShortConv(d_inner, kc, "heads", bias=True, rngs=rngs)
        self.conv_B = ShortConv(g * n, kc, "state", bias=True, rngs=rngs)
        self.conv_C = ShortConv(g * n, kc, "state", bias=True, rngs=rngs)
        self.A_log = _param(rngs, _a_log_init, (h,), ("heads",))
        self.dt_bias = _param(rngs, _dt_bias_init, (h,), ("heads",))
        self.D = _param(rngs, nnx.initializers.ones_init(), (h,), ("heads",))
        self.norm = GatedRMSNorm(d_inner, g)
        self.out = linear(cfg, d_inner, d, ("heads", "embed"), rngs=rngs, std=out_std)
        if not cfg.causal:
            self.in_dt_bwd = linear(cfg, d, h, ("embed", "heads"), rngs=rngs)
            self.conv_x_bwd = ShortConv(d_inner, kc, "heads", bias=True, rngs=rngs)
            self.conv_B_bwd = ShortConv(g * n, kc, "state", bias=True, rngs=rngs)
            self.conv_C_bwd = ShortConv(g * n, kc, "state", bias=True, rngs=rngs)
            self.dt_bias_bwd = _param(rngs, _dt_bias_init, (h,), ("heads",))
            self.D_bwd = _param(rngs, nnx.initializers.ones_init(), (h,), ("heads",))

    def _direction(self, bwd: bool):
        """(convs x, B, C, dt head, dt_bias, D) of one scan direction."""
        sfx = "_bwd" if bwd else ""
        return tuple(getattr(self, n + sfx) for n in ("conv_x", "conv_B", "conv_C", "in_dt", "dt_bias", "D"))

    def _conv_heads(self, raw, x_btd, seg, cache, direction):
        """x, B, C (conv + SiLU, split into heads / groups) and dt of one direction from the raw
        projections, and the new conv caches. For the backward direction everything that arrives
        (raw, x_btd, seg) is time-reversed."""
        conv_x, conv_B, conv_C, in_dt, dt_bias, _ = direction
        c = cache or {}
        seg_prefix = c.get("conv_seg")
        xs, cx, cseg = conv_x(raw[0], seg, c.get("conv_x"), seg_prefix)
        Bs, cB, _ = conv_B(raw[1], seg, c.get("conv_B"), seg_prefix)
        Cs, cC, _ = conv_C(raw[2], seg, c.get("conv_C"), seg_prefix)
        xs = rearrange(jax.nn.silu(xs), "b t (h p) -> b t h p", p=self.p)
        Bs = rearrange(jax.nn.silu(Bs), "b t (g n) -> b t g n", g=self.g)
        Cs = rearrange(jax.nn.silu(Cs), "b t (g n) -> b t g n", g=self.g)
        dt = jax.nn.softplus(in_dt(x_btd).astype(jnp.float32) + dt_bias[...])
        return (xs, dt, Bs, Cs), {"conv_x": cx, "conv_B": cB, "conv_C": cC, "conv_seg": cseg}

    @staticmethod
    def _skip(y, xs, D):
        return y.astype(jnp.float32) + D[...][:, None] * xs.astype(jnp.float32)  # D skip in fp32

    def _output(self, y_bthp, x_btd):
        z = self.in_z(x_btd)
        return self.out(self.norm(rearrange(y_bthp, "b t h p -> b t (h p)"), z).astype(x_btd.dtype))

    def __call__(self, x_btd, ctx: Ctx, cache=None):
        seg = ctx.segment_ids
        raw = (self.in_x(x_btd), self.in_B(x_btd), self.in_C(x_btd))
        A = -jnp.exp(self.A_log[...])
        if not self.cfg.causal:
            if cache is not None:
                _no_decode_cache("Mamba-2")
            # Both directions in one kernel call over 2B rows [forward; reversed] (A is shared).
            fwd, _ = self._conv_heads(raw, x_btd, seg, None, self._direction(False))
            bwd, _ = self._conv_heads(tuple(map(_flip, raw)), _flip(x_btd), _flip(seg), None, self._direction(True))
            xs, dt, Bs, Cs = _stack_directions(fwd, bwd)
            y, _ = ssd(xs, dt, A, Bs, Cs, chunk_size=self.cfg.chunk_size,
                       segment_ids=_stack_directions(seg, _flip(seg)))
            b = x_btd.shape[0]
            y = self._skip(y[:b], fwd[0], self.D) + _flip(self._skip(y[b:], bwd[0], self.D_bwd))
            return self._output(y, x_btd)
        (xs, dt, Bs, Cs), conv = self._conv_heads(raw, x_btd, seg, cache, self._direction(False))
        if cache is None:
            y, _ = ssd(xs, dt, A, Bs, Cs, chunk_size=self.cfg.chunk_size, segment_ids=seg)
            return self._output(self._skip(y, xs, self.D), x_btd)
        state = _entry_state(cache["state"], seg, cache["seg"])
        if x_btd.shape[1] == 1:
            y, state = ssd_step(state, xs[:, 0], dt[:, 0], A, Bs[:, 0], Cs[:, 0])
            y = y[:, None]
        else:
            y, state = ssd(xs, dt, A, Bs, Cs, chunk_size=self.cfg.chunk_size, initial_state=state, segment_ids=seg)
        new_cache = {
            "state": state, "seg": seg[:, -1] if seg is not None else cache["seg"],
            "conv_x": conv["conv_x"], "conv_B": conv["conv_B"], "conv_C": conv["conv_C"],
            "conv_seg": conv["conv_seg"] if conv["conv_seg"] is not None else cache["conv_seg"],
        }
        return self._output(self._skip(y, xs, self.D), x_btd), new_cache

    def init_cache(self, batch: int, max_len: int, dtype):
        del max_len
        if not self.cfg.causal:
            _no_decode_cache("Mamba-2")
        kc = self.cfg.conv_kernel
        return {
            "state": jnp.zeros((batch, self.h, self.p, self.n), jnp.float32),
            "seg": jnp.zeros((batch,), jnp.int32),
            "conv_x": _conv_cache(batch, kc, self.d_inner, dtype),
            "conv_B": _conv_cache(batch, kc, self.g * self.n, dtype),
            "conv_C": _conv_cache(batch, kc, self.g * self.n, dtype),
            "conv_seg": jnp.zeros((batch, kc - 1), jnp.int32),
        }


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def _unit_lower_inverse_flops(L: int) -> int:
    """Matmul FLOPs of one (I + A)^-1 as ssm.gated_delta computes it: forward substitution over
    rows, row i = e_i - A[i, :] T as a dense [L] x [L, L] product, for rows 1 .. L-1.
    (The algorithmic minimum, exploiting T's triangle, is about L^3 / 3.)"""
    return 2 * L * L * (L - 1)


def recurrent_flops_breakdown(cfg: ModelConfig, kind: str, seq_len: int) -> dict:
    """Forward FLOPs of one recurrent mixer for one sequence, by part (conventions of archs.flops:
    a multiply-add is 2 FLOPs, element-wise work is not counted). It follows the matmuls the
    chunked kernels in ssm.gated_delta / ssm.ssd actually execute.

    Parts:
      proj    every parameter matmul (in/out projections, gates, dt / beta / a heads)
      conv    the depthwise short convolutions (2 * T * channels * kernel)
      decay   the per-chunk segment sums of log decays, which the kernels run as a GEMM with a
              triangular ones matrix: 2 L^3 per chunk per head
      chunk   per-chunk parallel matmuls: intra-chunk quadratic terms (q k^T, k k^T, C B^T, the
              masked "attention" times values), chunk-local states and the readout of the state
              entering each chunk
      ut      Gated DeltaNet's UT transform: (I + A)^-1 by row-wise forward substitution
              (2 L^2 (L - 1), `ut_inverse`), then applied to [beta v, beta k] (2 L^2 (K + V)),
              per chunk per head
      scan    the sequential inter-chunk state recurrence (GDN: w S and k^T u, 4 L K V per chunk
              per head; SSD's recurrence is element-wise and is not counted); `scan_per_chunk` is
              one chunk's share
    The chunk length is what the kernels use: cfg.chunk_size, shrunk to a power of two >= T for
    short inputs, with T padded to whole chunks.

    Bidirectional (cfg.causal false): conv, decay, chunk, ut and scan run once per direction
    (`directions` = 2; ut_inverse and scan_per_chunk stay per direction), proj adds the backward
    gate heads (GDN W_a, W_b: 4 T d H; Mamba-2 dt: 2 T d H); the q, k, v / x, B, C, z
    projections and the output path are shared.

    XLA's cost analysis counts a while loop's body once, not once per trip. Two parts run in
    loops: the chunk scan (n_chunks trips) and the forward substitution (L - 1 trips, one row
    each), so for the compiled forward XLA reports about
    total - (n_chunks - 1) * scan_per_chunk - ut_inverse * (L - 2) / (L - 1)   (`xla_visible`),
    per direction, plus the element-wise work this count leaves out.
    """
    cfg = resolve(cfg)
    dirs = 1 if cfg.causal else 2
    t = seq_len
    kc = cfg.conv_kernel
    L = _chunk_len(t, cfg.chunk_size)
    n = -(-t // L)
    d = cfg.d_model
    if kind == "G":
        h, dk = cfg.n_heads, cfg.gdn_head_dim
        dv = int(round(cfg.gdn_expand_v * dk))
        proj = 2 * t * d * (2 * h * dk + 2 * h * dv + 2 * h * dirs) + 2 * t * h * dv * d
        conv = 2 * t * (2 * h * dk + h * dv) * kc
        decay = n * h * 2 * L ** 3
        # per chunk and head: k k^T, q k^T (2 L^2 K each), attn @ u (2 L^2 V), q S_in (2 L K V)
        chunk = n * h * (4 * L * L * dk + 2 * L * L * dv + 2 * L * dk * dv)
        ut_inverse = n * h * _unit_lower_inverse_flops(L)
        ut = ut_inverse + n * h * 2 * L * L * (dk + dv)
        scan_per_chunk = h * 4 * L * dk * dv  # u = u~ - w S; S += k_last^T u
    elif kind == "M":
        d_inner, h, p, g, nst = mamba_dims(cfg)
        proj = 2 * t * d * (2 * d_inner + 2 * g * nst + h * dirs) + 2 * t * d_inner * d
        conv = 2 * t * (d_inner + 2 * g * nst) * kc
        decay = n * h * 2 * L ** 3
        # per chunk: C B^T per group (2 L^2 N); per head: scores @ x (2 L^2 P),
        # chunk-local state (2 L P N), readout of the entering state (2 L N P)
        chunk = n * (g * 2 * L * L * nst + h * (2 * L * L * p + 4 * L * p * nst))
        ut = ut_inverse = 0
        scan_per_chunk = 0
    else:
        raise ValueError(f"no recurrent FLOP count for layer kind {kind!r}")
    scan = n * scan_per_chunk
    loop_hidden = (n - 1) * scan_per_chunk + (ut_inverse * (L - 2) / (L - 1) if L > 1 else 0)
    conv, decay, chunk, ut, scan, loop_hidden = (dirs * x for x in (conv, decay, chunk, ut, scan, loop_hidden))
    total = proj + conv + decay + chunk + ut + scan
    return {
        "proj": float(proj), "conv": float(conv), "decay": float(decay), "chunk": float(chunk),
        "ut": float(ut), "ut_inverse": float(ut_inverse), "scan": float(scan),
        "scan_per_chunk": float(scan_per_chunk), "n_chunks": n, "chunk_len": L, "directions": dirs,
        "total": float(total), "xla_visible": float(total - loop_hidden),
    }


def recurrent_layer_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs of one Gated DeltaNet ('G') or Mamba-2 ('M') mixer for one sequence."""
    return recurrent_flops_breakdown(cfg, kind, seq_len)["total"]


def recurrent_state_bytes(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """Bytes of decode state per sequence, whatever seq_len: what init_cache holds per sequence
    for Gated DeltaNet ('G', state [H, K, V]) or Mamba-2 ('M', state [H, P, N]), both fp32, plus
    the conv windows (conv_kernel - 1 past inputs of every conv channel, compute dtype). The
    segment-id bookkeeping of the cache is not model state and is not counted. A bidirectional
    mixer holds one state and one set of conv windows per direction (a denoiser carries context
    both ways), so it counts twice."""
    del seq_len  # constant in the context length
    cfg = resolve(cfg)
    itemsize = jnp.dtype(compute_dtype(cfg)).itemsize
    if kind == "G":
        h, dk = cfg.n_heads, cfg.gdn_head_dim
        dv = int(round(cfg.gdn_expand_v * dk))
        state, conv_channels = h * dk * dv, 2 * h * dk + h * dv
    elif kind == "M":
        d_inner, h, p, g, nst = mamba_dims(cfg)
        state, conv_channels = h * p * nst, d_inner + 2 * g * nst
    else:
        raise ValueError(f"no recurrent state size for layer kind {kind!r}")
    per_direction = 4 * state + (cfg.conv_kernel - 1) * conv_channels * itemsize
    return float(per_direction * (1 if cfg.causal else 2))


register(MixerKind("G", lambda cfg, rngs: GatedDeltaNet(cfg, rngs=rngs),
                   lambda cfg, t, executed: recurrent_layer_flops(cfg, "G", t),
                   lambda cfg, t: recurrent_state_bytes(cfg, "G", t)))
register(MixerKind("M", lambda cfg, rngs: Mamba2(cfg, rngs=rngs),
                   lambda cfg, t, executed: recurrent_layer_flops(cfg, "M", t),
                   lambda cfg, t: recurrent_state_bytes(cfg, "M", t)))
