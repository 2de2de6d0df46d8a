"""Mixture-of-experts MLP: every token uses the shared experts plus its top_k of n routed experts.

Router (archs.config.MoEConfig.router):
- sigmoid (DeepSeek-V3): affinities s_i = sigmoid(x . w_i) per expert, independent of each other;
- softmax (Switch, Mixtral): s = softmax(x W) over the experts.
Router logits are computed in fp32 whatever the compute dtype. A token's experts are the top_k
of s + b, where b is the loss-free balancing bias (balance=bias; zero otherwise). The gate
weights come from s alone, so b steers selection and never the output (it needs no gradient);
with norm_topk they are the chosen affinities divided by their sum (DeepSeek-V3), so a top-1
router with norm_topk has gate 1 and learns only through the balance loss.

Compute:
- dropless (capacity_factor = 0): the N * top_k token-expert assignments are sorted by expert
  and each of the gate, up and down projections is one grouped GEMM over the sorted rows
  (jax.lax.ragged_dot). No token is dropped, whatever the routing.
- capacity (capacity_factor = cf > 0): each expert gets a buffer of C = ceil(cf * N * top_k /
  experts) rows, filled in GShard's priority order (every token's first choice in token order,
  then every second choice, ...); assignments past C are dropped (the token keeps its other
  experts and the residual) and the dropped fraction is reported. N is every token of the call
  (the whole batch), so capacity is a training-time comparison: decoding one token at a time
  sees other buffers than the full forward pass.

Balancing:
- aux: Switch/GShard loss  n_experts * sum_i f_i P_i  with f_i the fraction of the N * top_k
  assignments routed to expert i (chosen before any capacity drop, no gradient) and P_i the mean
  over tokens of the router's probability of i (softmax: s_i; sigmoid: s_i / sum_j s_j). It is 1
  for a perfectly balanced router. The training step adds aux_weight x its mean over MoE layers.
- bias (DeepSeek-V3, auxiliary-loss-free): after every step, b_i += bias_step * sign(mean_j
  load_j - load_i) per layer (update_router_bias), outside the gradient. b lives in a
  RouterBias variable, not an nnx.Param, so an optimizer over nnx.Param never touches it.

Router statistics leave the layer as nnx intermediates: run the forward pass under
nnx.capture(fn, nnx.Intermediate) and pass the captured State to router_stats (outside a
capture nothing is recorded and the module is left unchanged).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from archs.config import ModelConfig
from archs.layers import SwiGLU, compute_dtype

STATS = "router_stats"  # name of the sown intermediate


class RouterBias(nnx.Variable):
    """Per-expert selection bias of loss-free balancing: state, not a parameter."""


def route(logits_ne, bias_e, cfg: ModelConfig):
    """(expert ids [N, k], gate weights [N, k], router probabilities [N, E]) from fp32 logits."""
    m = cfg.moe
    if m.router == "sigmoid":
        s = jax.nn.sigmoid(logits_ne)
        probs = s / jnp.sum(s, axis=-1, keepdims=True)
    else:
        s = probs = jax.nn.softmax(logits_ne, axis=-1)
    sel = s if bias_e is None else s + bias_e
    _, idx = jax.lax.top_k(sel, m.top_k)
    gates = jnp.take_along_axis(s, idx, axis=-1)
    if m.norm_topk:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return idx, gates, probs


def capacity(cfg: ModelConfig, n_tokens: int) -> int:
    """Rows per expert buffer in the capacity variant for a call over n_tokens tokens."""
    m = cfg.moe
    return max(1, math.ceil(m.capacity_factor * n_tokens * m.top_k / m.experts))


def _inverse_permutation(order):
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


class MoE(nnx.Module):
    """Shared experts + top_k routed SwiGLU experts; a drop-in for the dense SwiGLU of a block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        m = cfg.moe
        d, e, f = cfg.d_model, m.experts, m.expert_width
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # residual-branch scaling, as the dense MLP

        def param(shape, axes, std):
            value = nnx.initializers.normal(std)(rngs.params(), shape, jnp.float32)
            return nnx.Param(value, out_sharding=axes, eager_sharding=False)

        self.router = param((d, e), ("embed", "router"), cfg.init_std)
        self.w_gate = param((e, d, f), ("experts", "embed", "mlp"), cfg.init_std)
        self.w_up = param((e, d, f), ("experts", "embed", "mlp"), cfg.init_std)
        self.w_down = param((e, f, d), ("experts", "mlp", "embed"), out_std)
        if m.balance == "bias":
            self.bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=("router",), eager_sharding=False)
        if m.shared_experts:
            # s shared experts of width f are one SwiGLU of width s * f (the sum splits over the hidden units)
            self.shared = SwiGLU(cfg, hidden=m.shared_experts * f, rngs=rngs)

    def __call__(self, x_btd):
        cfg, m = self.cfg, self.cfg.moe
        b, t, d = x_btd.shape
        x_nd = x_btd.reshape(b * t, d)
        logits = jnp.dot(x_nd.astype(jnp.float32), self.router[...])
        bias = self.bias[...] if m.balance == "bias" else None
        idx_nk, gates_nk, probs_ne = route(logits, bias, cfg)
        if m.capacity_factor > 0:
            y_nd, dropped = self._capacity(x_nd, idx_nk, gates_nk)
        else:
            y_nd, dropped = self._dropless(x_nd, idx_nk, gates_nk), jnp.zeros((), jnp.float32)
        if m.shared_experts:
            y_nd = y_nd + self.shared(x_nd)
        if hasattr(self, "__captures__"):  # inside nnx.capture; a bare sow would mutate the module
            load_e = jnp.bincount(idx_nk.reshape(-1), length=m.experts).astype(jnp.float32) / idx_nk.size
            aux = m.experts * jnp.sum(load_e * jnp.mean(probs_ne, axis=0))
            self.sow(nnx.Intermediate, STATS, {"aux": aux, "load": load_e, "dropped": dropped})
        return y_nd.reshape(b, t, d)

    def _weights(self):
        dt = compute_dtype(self.cfg)
        return self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt)

    def _dropless(self, x_nd, idx_nk, gates_nk):
        n, k = idx_nk.shape
        wg, wu, wd = self._weights()
        expert_a = idx_nk.reshape(-1)  # assignment a = token * k + slot
        order = jnp.argsort(expert_a, stable=True)  # assignments grouped by expert
        sizes_e = jnp.bincount(expert_a, length=wg.shape[0]).astype(jnp.int32)
        xs = x_nd[order // k]
        h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, sizes_e)) * jax.lax.ragged_dot(xs, wu, sizes_e)
        ys = jax.lax.ragged_dot(h, wd, sizes_e)
        y_nkd = ys[_inverse_permutation(order)].reshape(n, k, -1)
        return jnp.einsum("nkd,nk->nd", y_nkd, gates_nk.astype(y_nkd.dtype))

    def _capacity(self, x_nd, idx_nk, gates_nk):
        n, k = idx_nk.shape
        e = self.cfg.moe.experts
        c = capacity(self.cfg, n)
        wg, wu, wd = self._weights()
        # Priority order: slot-major (all first choices in token order, then all second choices).
        expert_p = idx_nk.T.reshape(-1)
        token_p = jnp.tile(jnp.arange(n), k)
        order = jnp.argsort(expert_p, stable=True)
        sizes_e = jnp.bincount(expert_p, length=e)
        starts_e = jnp.cumsum(sizes_e) - sizes_e
        pos_sorted = jnp.arange(n * k) - starts_e[expert_p[order]]
        pos_p = pos_sorted[_inverse_permutation(order)]  # rank of each assignment inside its expert
        kept_p = pos_p < c
        slot_p = jnp.where(kept_p, pos_p, c)  # out of range: dropped by the scatter below
        buf_ecd = jnp.zeros((e, c, x_nd.shape[1]), x_nd.dtype).at[expert_p, slot_p].set(x_nd[token_p], mode="drop")
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ecd, wg)) * jnp.einsum("ecd,edf->ecf", buf_ecd, wu)
        out_ecd = jnp.einsum("ecf,efd->ecd", h, wd)
        y_p = out_ecd[expert_p, jnp.minimum(pos_p, c - 1)]
        w_p = jnp.where(kept_p, gates_nk.T.reshape(-1), 0.0).astype(y_p.dtype)
        y_nd = jnp.sum((y_p * w_p[:, None]).reshape(k, n, -1), axis=0)
        return y_nd, 1.0 - jnp.mean(kept_p.astype(jnp.float32))


# --- what the training step calls --------------------------------------------------------------


def router_stats(intermediates: nnx.State) -> dict | None:
    """Router statistics of one forward pass from what nnx.capture(fn, nnx.Intermediate) returned.

    None when the model has no MoE layer. Otherwise a dict (a pytree, safe to return from a
    jitted or differentiated function):
      aux_loss  scalar, the balance loss n_experts * sum_i f_i P_i averaged over MoE layers (and
                over forward calls, if fn called the model more than once); differentiable
      dropped   scalar, fraction of token-expert assignments dropped (0 when dropless)
      load      nested dict shaped like the RouterBias state, {path: [experts]} with every MoE
                layer's fraction of assignments per expert (the f_i, no gradient); for the bias
                update its keys end in 'bias' like nnx.to_pure_dict(nnx.state(model, RouterBias))
    """
    aux, dropped, load = [], [], {}
    for path, var in nnx.to_flat_state(intermediates):
        if not path or path[-1] != STATS:
            continue
        calls = var.get_value()
        aux += [c["aux"] for c in calls]
        dropped += [c["dropped"] for c in calls]
        node = load
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node["bias"] = jax.lax.stop_gradient(jnp.mean(jnp.stack([c["load"] for c in calls]), axis=0))
    if not aux:
        return None
    return {"aux_loss": jnp.mean(jnp.stack(aux)), "dropped": jnp.mean(jnp.stack(dropped)), "load": load}


def balance_loss(stats: dict | None, cfg: ModelConfig):
    """What the training objective adds: aux_weight x aux_loss for balance=aux, else 0.

    Raises when an MoE model's forward pass left no statistics (not run under nnx.capture, or
    its blocks wrapped in a transform that drops them, e.g. jax.checkpoint over nnx.split /
    merge; nnx.remat keeps them), rather than training silently without balancing."""
    if cfg.mlp == "moe" and stats is None:
        raise ValueError(
            "an MoE model's forward pass recorded no router statistics: call it under "
            "nnx.capture(fn, nnx.Intermediate) and wrap blocks with nnx transforms (nnx.remat), not raw jax ones"
        )
    if cfg.mlp != "moe" or cfg.moe.balance != "aux":
        return jnp.zeros((), jnp.float32)
    return cfg.moe.aux_weight * stats["aux_loss"]


def router_metrics(stats: dict | None) -> dict:
    """Scalars to log: balance loss, dropped fraction, and the most / least loaded expert relative
    to a perfect balance (experts x load; 1.0 each when balanced), extremes over the MoE layers."""
    if stats is None:
        return {}
    loads = jnp.stack(jax.tree.leaves(stats["load"]))  # [layers, experts]
    rel = loads * loads.shape[-1]
    return {"moe_aux_loss": stats["aux_loss"], "moe_dropped": stats["dropped"],
            "moe_load_max": jnp.max(rel), "moe_load_min": jnp.min(rel)}


def update_router_bias(bias, load, cfg: ModelConfig):
    """Loss-free balancing step (DeepSeek-V3): b_i += bias_step * sign(mean_j load_j - load_i).

    `bias` and `load` are nested dicts of the same structure (nnx.to_pure_dict of the RouterBias
    state, and router_stats(...)['load']); returns the updated bias. Pure: call it inside the
    jitted step after the gradient, with the load of the same forward pass. Without bias
    balancing (no RouterBias state) it returns `bias` unchanged."""
    if cfg.mlp != "moe" or cfg.moe.balance != "bias" or not jax.tree.leaves(bias):
        return bias
    step = cfg.moe.bias_step

    def one(b_e, load_e):
        return b_e + step * jnp.sign(jnp.mean(load_e) - load_e)

    return jax.tree.map(one, bias, load)


# --- FLOPs (conventions in archs/flops.py) ------------------------------------------------------


def moe_flops(cfg: ModelConfig, seq_len: int, *, executed: bool = False) -> float:
    """Forward FLOPs of one MoE MLP for one sequence: router + shared experts + routed experts.

    The count (executed=False) is the active one: each token's top_k routed experts, whatever the
    capacity variant drops, so an MoE model sits on the compute axis by what it activates.
    executed=True counts what the kernels compute: capacity buffers of capacity_factor x the
    active rows; for dropless, ragged_dot's portable lowering (XLA:CPU, and any backend without a
    native grouped GEMM), which multiplies every sorted row by every expert and masks, i.e.
    experts x the active routed work. A native grouped GEMM (TPU) computes only the active rows.
    """
    m = cfg.moe
    d, f, t = cfg.d_model, m.expert_width, seq_len
    router = 2 * t * d * m.experts
    shared = 2 * t * 3 * d * f * m.shared_experts
    routed = 2 * t * m.top_k * 3 * d * f
    if executed:
        routed *= m.capacity_factor if m.capacity_factor > 0 else m.experts
    return router + shared + routed
