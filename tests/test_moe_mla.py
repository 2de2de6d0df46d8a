"""Mixture-of-experts MLPs, multi-head latent attention and gated attention against independent
references: numpy loops over tokens and heads, hand-computed routings, XLA's FLOP count, a
single-device step."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from archs.attention import Attention
from archs.config import MLAConfig, ModelConfig, MoEConfig
from archs.context import Ctx
from archs.flops import forward_flops, mlp_flops
from archs.layers import SwiGLU
from archs.mixers import mixer_kind
from archs.mla import MLA
from archs.model import Model, count_active_params, count_params
from archs.moe import MoE, RouterBias, balance_loss, capacity, router_metrics, router_stats, update_router_bias
from archs.objective import AutoregressiveObjective
from archs.sizes import mlp_hidden, resolve
from archs.tokens import BYTES
from conftest import compile_fast as _compile, full_and_decoded, run_cli, train_step_flops, xla_flops as _xla_flops



def _cfg(**kw) -> ModelConfig:
    base = dict(size="xxs", d_model=32, n_layers=1, n_heads=2)
    return resolve(ModelConfig(**{**base, **kw}))


def _moe_cfg(**moe) -> ModelConfig:
    return _cfg(mlp="moe", moe=MoEConfig(**moe))


def _build(make, seed: int = 0):
    """(graphdef, state) with random parameters drawn in numpy (no per-initializer compiles):
    matrices N(0, 1 / fan_in), norm scales 1 + N(0, 0.1), selection biases 0."""
    gdef, abstract = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = str(path[-2].key if hasattr(path[-2], "key") else path[-2]) if len(path) > 1 else ""
        if len(a.shape) >= 2:
            x = rng.normal(0, a.shape[-2] ** -0.5, a.shape)
        elif name == "scale":
            x = 1 + 0.1 * rng.standard_normal(a.shape)
        else:
            x = np.zeros(a.shape)
        return jnp.asarray(x, a.dtype)

    return gdef, jax.tree_util.tree_map_with_path(fill, abstract)


def _pure(state):
    return jax.tree.map(np.array, nnx.to_pure_dict(state))


def _with(state, pure):
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return state


def _run_captured(gdef, state, x):
    return _compile(_captured(gdef), state, x)(state, x)


def _captured(gdef):
    """f(state, x) -> (layer output, router_stats) of a bare MoE layer."""
    def f(state, x):
        y, inter = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(nnx.merge(gdef, state), x)
        return y, router_stats(inter)

    return f


# --- numpy references ---------------------------------------------------------------------------


def _silu(x):
    return x / (1 + np.exp(-x))


def _swiglu(x, wg, wu, wd):
    return (_silu(x @ wg) * (x @ wu)) @ wd


def _moe_reference(p, x_nd, cfg, keep=None):
    """Token by token: route, then apply each chosen expert with its gate weight (float64).
    keep[t, j] False drops token t's j-th choice (capacity reference)."""
    m = cfg.moe
    x = np.asarray(x_nd, np.float64)
    logits = x @ p["router"].astype(np.float64)
    if m.router == "sigmoid":
        s = 1 / (1 + np.exp(-logits))
    else:
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
    sel = s + (p["bias"] if "bias" in p else 0.0)
    out = np.zeros_like(x)
    chosen_all = []
    for t in range(x.shape[0]):
        chosen = np.argsort(-sel[t], kind="stable")[: m.top_k]
        chosen_all.append(chosen)
        g = s[t, chosen]
        if m.norm_topk:
            g = g / g.sum()
        for j, (e, w) in enumerate(zip(chosen, g)):
            if keep is None or keep[t, j]:
                out[t] += w * _swiglu(x[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
        if m.shared_experts:
            sh = p["shared"]
            out[t] += _swiglu(x[t], sh["w_gate"]["kernel"], sh["w_up"]["kernel"], sh["w_down"]["kernel"])
    return out, np.array(chosen_all)


def _rope_np(x, pos, theta):
    """Rotate-half RoPE of x [..., T, D] at positions pos [T], in numpy."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _rms_np(x, scale, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _softmax_attend(q, k, v, allowed):
    s = q @ k.T / math.sqrt(q.shape[-1])
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def _naive_mla(p, x_btd, cfg, allowed):
    """Unabsorbed MLA written out head by head (per-head keys/values from the latent)."""
    m, h, dh = cfg.mla, cfg.n_heads, cfg.head_dim
    r, dr = m.kv_rank, m.rope_dim
    x = np.asarray(x_btd, np.float64)
    b, t, _ = x.shape
    pos = np.arange(t, dtype=np.float64)
    out = np.zeros((b, t, cfg.d_model))
    for bi in range(b):
        ckr = x[bi] @ p["wkv_down"]["kernel"]
        c = _rms_np(ckr[:, :r], p["kv_norm"]["scale"])
        kr = _rope_np(ckr[:, r:], pos, cfg.rope_theta)
        src = _rms_np(x[bi] @ p["wq_down"]["kernel"], p["q_norm"]["scale"]) if m.q_rank else x[bi]
        q_all = src @ p["wq"]["kernel"]
        heads = []
        for hi in range(h):
            qh = q_all[:, hi * (dh + dr):(hi + 1) * (dh + dr)]
            q = np.concatenate([qh[:, :dh], _rope_np(qh[:, dh:], pos, cfg.rope_theta)], -1)
            k = np.concatenate([c @ p["wk_up"]["kernel"][:, hi * dh:(hi + 1) * dh], kr], -1)
            v = c @ p["wv_up"]["kernel"][:, hi * dh:(hi + 1) * dh]
            heads.append(_softmax_attend(q, k, v, allowed))
        o = np.concatenate(heads, -1)
        if cfg.attn_gate:
            o = o / (1 + np.exp(-(x[bi] @ p["w_gate"]["kernel"])))
        out[bi] = o @ p["wo"]["kernel"]
    return out


def _ctx(b, t, seg=None):
    return Ctx(positions=jnp.broadcast_to(jnp.arange(t), (b, t)), segment_ids=seg)


# --- MoE: numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_one_expert_top1_is_the_dense_swiglu(capacity_factor):
    """1 expert, top-1 (gate 1), no shared expert, the dense weights copied in: the dense MLP."""
    cfg = _moe_cfg(experts=1, top_k=1, shared_experts=0, capacity_factor=capacity_factor)
    assert cfg.moe.expert_width == mlp_hidden(cfg)  # the width rule gives the dense width here
    dgdef, dstate = _build(lambda r: SwiGLU(cfg, rngs=r), seed=1)
    mgdef, mstate = _build(lambda r: MoE(cfg, rngs=r), seed=2)
    d, p = _pure(dstate), _pure(mstate)
    for name in ("w_gate", "w_up", "w_down"):
        p[name] = d[name]["kernel"][None]
    mstate = _with(mstate, p)
    x = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
    dense = _compile(lambda s, x: nnx.merge(dgdef, s)(x), dstate, x)(dstate, x)
    moe, stats = _compile(_captured(mgdef), mstate, x)(mstate, x)
    np.testing.assert_allclose(np.asarray(moe), np.asarray(dense), rtol=1e-5, atol=1e-6)
    assert float(stats["dropped"]) == 0.0


@pytest.mark.parametrize("router,norm_topk,balance", [("sigmoid", True, "bias"), ("softmax", False, "aux")])
def test_dropless_equals_a_loop_over_tokens(router, norm_topk, balance):
    """Each token's chosen experts applied one by one with their gates (+ the shared expert).
    The selection bias changes which experts are chosen, never the gate weights."""
    cfg = _moe_cfg(experts=4, top_k=2, shared_experts=1, router=router, norm_topk=norm_topk, balance=balance)
    gdef, state = _build(lambda r: MoE(cfg, rngs=r), seed=3)
    p = _pure(state)
    if balance == "bias":
        p["bias"] = np.asarray([0.3, -0.2, 0.1, 0.0], np.float32)
        state = _with(state, p)
    x = jax.random.normal(jax.random.key(1), (3, 7, cfg.d_model))
    y, stats = _run_captured(gdef, state, x)
    ref, chosen = _moe_reference(p, np.asarray(x).reshape(-1, cfg.d_model), cfg)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), ref, rtol=1e-4, atol=1e-5)
    # the reported load is the fraction of assignments per expert
    np.testing.assert_allclose(np.asarray(stats["load"]["bias"]),
                               np.bincount(chosen.ravel(), minlength=4) / chosen.size, rtol=1e-6)
    if balance == "bias":  # sensitivity: the bias did change some token's experts
        no_bias, chosen0 = _moe_reference({k: v for k, v in p.items() if k != "bias"},
                                          np.asarray(x).reshape(-1, cfg.d_model), cfg)
        assert (np.sort(chosen0, 1) != np.sort(chosen, 1)).any()


def _handbuilt_router(d, rows):
    """Router weights whose logits for input e_j are rows[j] (the other rows zero)."""
    w = np.zeros((d, len(rows[0])), np.float32)
    for j, row in enumerate(rows):
        w[j] = row
    return w


def test_balance_loss_matches_its_formula_on_a_handbuilt_routing():
    """n_experts * sum_i f_i P_i on routings computed by hand, and its mean over layers."""
    d = 32
    x = np.zeros((1, 4, d), np.float32)
    x[0, :3, 0] = 1.0  # three tokens of kind A, one of kind B
    x[0, 3, 1] = 1.0
    # softmax, top-1: A has probabilities (.7, .1, .1, .1), B (.1, .7, .1, .1)
    # f = (3/4, 1/4, 0, 0), P = (.55, .25, .1, .1): 4 * (.75 * .55 + .25 * .25) = 1.9
    soft = _handbuilt_router(d, [np.log([.7, .1, .1, .1]), np.log([.1, .7, .1, .1])])
    # sigmoid, top-1: A has s = (.75, .5, .5, .5) (logits ln 3, 0, 0, 0): P_A = (1/3, 2/9, 2/9, 2/9);
    # B mirrored: P = (11/36, 1/4, 2/9, 2/9), f as above: 4 * (.75 * 11/36 + .25 / 4) = 7/6
    sig = _handbuilt_router(d, [[math.log(3), 0, 0, 0], [0, math.log(3), 0, 0]])
    for router, w, want in [("softmax", soft, 1.9), ("sigmoid", sig, 7 / 6)]:
        cfg = _moe_cfg(experts=4, top_k=1, shared_experts=0, router=router, balance="bias")
        gdef, state = _build(lambda r: MoE(cfg, rngs=r))
        p = _pure(state)
        p["router"] = w
        _, stats = _run_captured(gdef, _with(state, p), jnp.asarray(x))
        assert float(stats["aux_loss"]) == pytest.approx(want, rel=1e-5)
        np.testing.assert_allclose(np.asarray(stats["load"]["bias"]), [.75, .25, 0, 0])

    # Two layers: the hand-built softmax routing (1.9) and a zero router (uniform P, every token
    # to expert 0 by top_k's lower-index tie rule: 4 * 1 * 1/4 = 1); the loss is their mean.
    cfg = _moe_cfg(experts=4, top_k=1, shared_experts=0, router="softmax", balance="bias")

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([MoE(cfg, rngs=rngs), MoE(cfg, rngs=rngs)])

        def __call__(self, x):
            return [layer(x) for layer in self.layers]

    gdef, state = _build(Two)
    p = _pure(state)
    p["layers"][0]["router"], p["layers"][1]["router"] = soft, np.zeros_like(soft)
    state = _with(state, p)
    stats = _run_captured(gdef, state, jnp.asarray(x))[1]
    assert float(stats["aux_loss"]) == pytest.approx((1.9 + 1.0) / 2, rel=1e-5)
    # loads are keyed like the RouterBias state, so the bias update is a tree map
    bias = nnx.to_pure_dict(nnx.state(nnx.merge(gdef, state), RouterBias))
    assert jax.tree.structure(stats["load"]) == jax.tree.structure(bias)
    np.testing.assert_allclose(np.asarray(stats["load"]["layers"][1]["bias"]), [1, 0, 0, 0])
    m = router_metrics(stats)
    assert float(m["moe_load_max"]) == pytest.approx(4.0) and float(m["moe_load_min"]) == 0.0
    w_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, balance="aux", aux_weight=0.01))
    assert float(balance_loss(stats, w_cfg)) == pytest.approx(0.01 * 1.45, rel=1e-5)
    assert float(balance_loss(stats, cfg)) == 0.0  # bias balancing adds no loss
    # an MoE forward pass that recorded nothing is an error, not a silent zero; dense models add 0
    with pytest.raises(ValueError, match="nnx.capture"):
        balance_loss(None, w_cfg)
    assert float(balance_loss(None, _cfg())) == 0.0


def test_router_stats_survive_nnx_remat():
    """Blocks rematerialised with nnx.remat (what an engine's train.remat=block should use) still
    report the router statistics of the plain forward pass."""
    cfg = _moe_cfg(experts=4, top_k=2)
    gdef, state = _build(lambda r: MoE(cfg, rngs=r), seed=4)
    x = jax.random.normal(jax.random.key(5), (1, 6, cfg.d_model))

    def both(state, x):
        plain = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(nnx.merge(gdef, state), x)[1]
        remat = nnx.capture(lambda m, x: nnx.remat(lambda m, x: m(x))(m, x), nnx.Intermediate)(
            nnx.merge(gdef, state), x)[1]
        return router_stats(plain), router_stats(remat)

    plain, remat = _compile(both, state, x)(state, x)
    assert float(remat["aux_loss"]) == float(plain["aux_loss"])
    np.testing.assert_array_equal(np.asarray(remat["load"]["bias"]), np.asarray(plain["load"]["bias"]))


def _skewed_training(bias_step: float, steps: int = 120):
    """A skewed router trained as the engine will: optax on nnx.Param only, the selection bias
    carried beside the parameters and updated from the same forward's loads after each step.
    Returns the relative loads (experts x load) of every step, and whether the bias stayed out
    of the optimizer state."""
    cfg = _moe_cfg(experts=4, top_k=2, shared_experts=0, balance="bias", bias_step=bias_step)
    gdef, state = _build(lambda r: MoE(cfg, rngs=r), seed=5)
    p = _pure(state)
    p["router"][0] = [3.0, 0.0, 0.0, 0.0]  # feature 0 is always on: every token picks expert 0
    model = nnx.merge(gdef, _with(state, p))
    gdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, cfg.d_model)).astype(np.float32)
    x[..., 0] = 1.0
    target = jnp.asarray(np.tanh(x @ rng.standard_normal((cfg.d_model, cfg.d_model))), jnp.float32)
    x = jnp.asarray(x)
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    def loss_fn(params, bias):
        m = nnx.merge(gdef, params, bias)
        y, inter = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(m, x)
        stats = router_stats(inter)
        return jnp.mean((y - target) ** 2) + balance_loss(stats, cfg), stats

    def step(params, opt, bias):
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bias)
        updates, opt = tx.update(grads, opt, params)
        bias = update_router_bias(bias, stats["load"], cfg)
        return optax.apply_updates(params, updates), opt, bias, stats["load"]["bias"] * 4

    step = _compile(step, params, opt, bias)
    loads = []
    for _ in range(steps):
        params, opt, bias, load = step(params, opt, bias)
        loads.append(np.asarray(load))
    bias_in_opt = any(x.shape == (4,) for x in jax.tree.leaves(opt))
    return np.array(loads), np.asarray(bias["bias"]), bias_in_opt


def test_bias_balancing_evens_out_a_skewed_router():
    loads, bias, bias_in_opt = _skewed_training(bias_step=0.01)
    assert loads[0].max() == pytest.approx(2.0)  # expert 0 takes every token (half of all assignments)
    late = loads[-30:].mean(0)
    assert late.max() < 1.3 and late.min() > 0.7, late
    assert bias[0] < 0 and (bias[1:] > 0).all()  # pushed away from the overloaded expert
    assert not bias_in_opt  # the optimizer state holds moments of nnx.Param only
    # control: without the bias update the same training stays skewed
    still, _, _ = _skewed_training(bias_step=0.0)
    assert still[-30:].mean(0).max() > 1.9


def test_capacity_drops_exactly_the_assignments_beyond_capacity():
    d = 32
    # top-1 of 2 experts, capacity factor 1: C = ceil(1 * 6 * 1 / 2) = 3. Tokens 0-4 pick expert 0,
    # token 5 expert 1: expert 0 keeps tokens 0, 1, 2 (token order) and drops 3, 4.
    cfg = _moe_cfg(experts=2, top_k=1, shared_experts=0, capacity_factor=1.0, router="softmax")
    assert capacity(cfg, 6) == 3
    gdef, state = _build(lambda r: MoE(cfg, rngs=r), seed=7)
    p = _pure(state)
    p["router"] = np.zeros((d, 2), np.float32)
    p["router"][0] = [2.0, -2.0]
    x = np.random.default_rng(0).standard_normal((1, 6, d)).astype(np.float32)
    x[0, :, 0] = [1, 1, 1, 1, 1, -1]
    state = _with(state, p)
    y, stats = _run_captured(gdef, state, jnp.asarray(x))
    keep = np.array([[True], [True], [True], [False], [False], [True]])
    ref, chosen = _moe_reference(p, x[0], cfg, keep=keep)
    assert chosen.ravel().tolist() == [0, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(np.asarray(y[0]), ref, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(y[0, 3:5])).max() == 0.0
    assert float(stats["dropped"]) == pytest.approx(2 / 6)

    # top-2 of 2 experts, capacity factor 0.5: C = ceil(0.5 * 4 * 2 / 2) = 2. Tokens 0, 1 rank expert 0
    # first, tokens 2, 3 expert 1. GShard priority fills each buffer with first choices before any
    # second choice, so every token keeps exactly its first expert (token order would instead keep
    # tokens 0 and 1 twice and drop tokens 2 and 3 from expert 0... and from nowhere else).
    cfg = _moe_cfg(experts=2, top_k=2, shared_experts=1, capacity_factor=0.5, router="softmax")
    assert capacity(cfg, 4) == 2
    gdef, state = _build(lambda r: MoE(cfg, rngs=r), seed=8)
    p = _pure(state)
    p["router"] = np.zeros((d, 2), np.float32)
    p["router"][0] = [1.0, -1.0]
    x = np.random.default_rng(1).standard_normal((1, 4, d)).astype(np.float32)
    x[0, :, 0] = [1, 1, -1, -1]
    y, stats = _run_captured(gdef, _with(state, p), jnp.asarray(x))
    keep = np.array([[True, False]] * 4)
    ref, chosen = _moe_reference(p, x[0], cfg, keep=keep)
    assert chosen.tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]
    np.testing.assert_allclose(np.asarray(y[0]), ref, rtol=1e-4, atol=1e-6)
    assert float(stats["dropped"]) == pytest.approx(0.5)


# --- MLA and gated attention ---------------------------------------------------------------------


@pytest.mark.parametrize("causal,q_rank,gate", [(True, 0, False), (False, 12, True)])
def test_mla_matches_unabsorbed_per_head_reference(causal, q_rank, gate):
    cfg = _cfg(pattern="L", causal=causal, objective="ar" if causal else "diffusion", attn_gate=gate,
               mla=MLAConfig(kv_rank=16, rope_dim=8, q_rank=q_rank))
    gdef, state = _build(lambda r: MLA(cfg, rngs=r), seed=11)
    b, t = 2, 7
    x = jax.random.normal(jax.random.key(2), (b, t, cfg.d_model))
    got = _compile(lambda s, x: nnx.merge(gdef, s)(x, _ctx(b, t)), state, x)(state, x)
    allowed = np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)
    want = _naive_mla(_pure(state), x, cfg, allowed)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_gated_attention_matches_naive_per_head_gating():
    cfg = _cfg(n_heads=4, attn_gate=True)
    gdef, state = _build(lambda r: Attention(cfg, rngs=r), seed=12)
    p = _pure(state)
    b, t, h, hd = 2, 6, cfg.n_heads, cfg.head_dim
    x = jax.random.normal(jax.random.key(3), (b, t, cfg.d_model))
    run = _compile(lambda s, x: nnx.merge(gdef, s)(x, _ctx(b, t)), state, x)
    got = run(state, x)
    xn = np.asarray(x, np.float64)
    pos = np.arange(t, dtype=np.float64)
    want = np.zeros((b, t, cfg.d_model))
    for bi in range(b):
        heads = []
        gate = 1 / (1 + np.exp(-(xn[bi] @ p["w_gate"]["kernel"])))
        for hi in range(h):
            sl = slice(hi * hd, (hi + 1) * hd)
            q = _rope_np(xn[bi] @ p["wq"]["kernel"][:, sl], pos, cfg.rope_theta)
            k = _rope_np(xn[bi] @ p["wk"]["kernel"][:, sl], pos, cfg.rope_theta)
            o = _softmax_attend(q, k, xn[bi] @ p["wv"]["kernel"][:, sl], np.tril(np.ones((t, t), bool)))
            heads.append(gate[:, sl] * o)  # every head gated elementwise by its own slice
        want[bi] = np.concatenate(heads, -1) @ p["wo"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    # zero gate weights: sigmoid(0) = 1/2 of the ungated layer's output
    p["w_gate"]["kernel"][:] = 0
    ungated_cfg = dataclasses.replace(cfg, attn_gate=False)
    half = run(_with(state, p), x)
    ugdef, ustate = nnx.split(nnx.eval_shape(lambda: Attention(ungated_cfg, rngs=nnx.Rngs(0))))
    ustate = _with(ustate, {k: v for k, v in p.items() if k != "w_gate"})
    ungated = _compile(lambda s, x: nnx.merge(ugdef, s)(x, _ctx(b, t)), ustate, x)(ustate, x)
    np.testing.assert_allclose(np.asarray(half), 0.5 * np.asarray(ungated), rtol=1e-5, atol=1e-7)


def test_mla_cached_decode_equals_forward_and_caches_only_the_latent():
    """Prefill + token-by-token decoding through L (absorbed) and gated A layers with an MoE MLP,
    packed documents included, equals the full forward pass."""
    cfg = ModelConfig(name="t", size="xxs", d_model=32, n_layers=2, n_heads=2, pattern="LA", attn_gate=True,
                      mlp="moe", moe=MoEConfig(experts=4, top_k=2, shared_experts=1),
                      mla=MLAConfig(kv_rank=16, rope_dim=8, q_rank=12))
    gdef, state = _build(lambda r: Model(cfg, rngs=r), seed=13)
    b, t, prefill = 2, 14, 6
    toks = np.random.default_rng(0).integers(0, 256, (b, t))
    toks[0, 3] = toks[0, prefill] = toks[1, 9] = BYTES.eod
    toks = jnp.asarray(toks, jnp.int32)

    def run(state, toks):
        return full_and_decoded(gdef, state, toks, prefill)

    full, decoded, cache = _compile(run, state, toks)(state, toks)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), atol=2e-5, rtol=1e-4)
    assert {k: v.shape for k, v in cache["layers"][0].items()} == {
        "c_kv": (b, t, 16), "k_rope": (b, t, 8), "seg": (b, t)}


# --- MoE inside hybrids and diffusion -------------------------------------------------------------


@pytest.mark.parametrize("pattern,objective", [("GLA", "ar"), ("SLA", "diffusion")])
def test_moe_in_every_block_whatever_the_mixer(pattern, objective):
    """An AR Gated DeltaNet hybrid and a bidirectional diffusion denoiser with MoE MLPs: one router
    per block whatever its mixer, and the balance loss alone sends gradient to every router."""
    import ssm  # noqa: F401  (registers G)
    from diffusion.objective import MaskedDiffusionObjective

    cfg = resolve(ModelConfig(name="t", size="xxs", d_model=32, n_layers=3, n_heads=2, pattern=pattern,
                              causal=objective == "ar", objective=objective, chunk_size=8, window=4, mlp="moe",
                              moe=MoEConfig(experts=4, top_k=2)))
    gdef, params = _build(lambda r: Model(cfg, rngs=r), seed=14)
    windows = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 17)), jnp.int32)
    obj = MaskedDiffusionObjective(cfg) if objective == "diffusion" else AutoregressiveObjective(cfg)

    def aux_only(params):
        m = nnx.merge(gdef, params)
        (loss, _), inter = nnx.capture(obj.loss, nnx.Intermediate)(m, windows, jax.random.key(0))
        stats = router_stats(inter)
        return stats["aux_loss"], (loss, stats)

    grads, (loss, stats) = _compile(jax.grad(aux_only, has_aux=True), params)(params)
    assert sorted(stats["load"]["blocks"]) == [0, 1, 2] and np.isfinite(float(loss))
    for i in range(3):
        assert float(jnp.abs(grads["blocks"][i]["mlp"]["router"].get_value()).max()) > 0
    # the last block's experts feed no router: the balance loss gives them no gradient
    assert float(jnp.abs(grads["blocks"][2]["mlp"]["w_up"].get_value()).max()) == 0


# --- counts: active parameters and FLOPs ---------------------------------------------------------


def test_active_params_count_what_one_token_touches():
    cfg = resolve(ModelConfig(size="xxs", d_model=64, n_layers=2, n_heads=2, pattern="LA", attn_gate=True,
                              mlp="moe", moe=MoEConfig(experts=8, top_k=2, shared_experts=1, balance="bias"),
                              mla=MLAConfig(kv_rank=32, rope_dim=16, q_rank=24)))
    model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    d, v, h, hd, f = 64, cfg.vocab_size, 2, 32, cfg.moe.expert_width
    r, dr, qr = 32, 16, 24
    assert f == 64  # ceil(192 / 3), a multiple of 32
    mla = d * qr + qr + qr * h * (hd + dr) + d * (r + dr) + r + 2 * r * h * hd + h * hd * d + d * h * hd
    attn = 4 * d * h * hd + d * h * hd  # q, k, v, o + gate
    moe_active = d * 8 + 3 * d * f * 1 + 3 * d * f * 2  # router, shared, 2 routed experts
    per_block = 2 * d + moe_active  # two norms
    active = 2 * v * d + mla + attn + 2 * per_block + d
    assert count_active_params(model) == (active, active - 2 * v * d)
    total, _ = count_params(model)
    assert total - active == 2 * 6 * 3 * d * f  # the 6 idle experts of both layers
    dense = nnx.eval_shape(lambda: Model(dataclasses.replace(cfg, mlp="swiglu"), rngs=nnx.Rngs(0)))
    assert count_active_params(dense) == count_params(dense)


MOE_FLOPS = dict(experts=4, top_k=2, shared_experts=1, expert_width=128)


@pytest.mark.parametrize("kind,kw", [
    ("moe", dict(mlp="moe", moe=MoEConfig(**MOE_FLOPS))),
    ("moe", dict(mlp="moe", moe=MoEConfig(**MOE_FLOPS, capacity_factor=1.0))),
    ("L", dict(mla=MLAConfig(kv_rank=64, rope_dim=16))),
    ("L", dict(causal=False, objective="diffusion", attn_gate=True, mla=MLAConfig(kv_rank=64, rope_dim=16, q_rank=96))),
    ("A", dict(attn_gate=True)),
])
def test_layer_flops_match_xla(kind, kw):
    """Forward FLOPs as executed (dense masked attention; ragged_dot's portable lowering or the
    capacity buffers) against XLA's cost analysis of the layer alone."""
    cfg = resolve(ModelConfig(size="xxs", d_model=128, n_layers=1, n_heads=4, pattern="L" if kind == "L" else "A",
                              **kw))
    b, t = 2, 128
    x = jnp.ones((b, t, cfg.d_model))
    if kind == "moe":
        gdef, state = _build(lambda r: MoE(cfg, rngs=r))
        xla = _xla_flops(lambda s, x: nnx.merge(gdef, s)(x), state, x)
        analytic = b * mlp_flops(cfg, t, executed=True)
    else:
        gdef, state = _build(lambda r: mixer_kind(kind).build(cfg, r))
        xla = _xla_flops(lambda s, x: nnx.merge(gdef, s)(x, _ctx(b, t)), state, x)
        analytic = b * mixer_kind(kind).flops(cfg, t, True)
    assert xla == pytest.approx(analytic, rel=0.10), (xla, analytic)


def test_moe_mla_train_step_flops_match_xla():
    """3 x the analytic forward (as executed) against XLA's count of loss-and-gradient of a model
    with gated attention, MLA and dropless MoE MLPs; the active count is what the FLOP axis uses."""
    cfg = ModelConfig(size="xxs", d_model=128, n_layers=2, n_heads=4, pattern="LA", attn_gate=True, mlp="moe",
                      moe=MoEConfig(**MOE_FLOPS), mla=MLAConfig(kv_rank=64, rope_dim=16))
    gdef, params = _build(lambda r: Model(cfg, rngs=r))
    t = 128
    xla, analytic = train_step_flops(cfg, gdef, params, 2, t)
    assert xla == pytest.approx(analytic, rel=0.10), (xla, analytic)
    # the executed dropless count is the active count plus (experts - 1) x the routed work
    rc = resolve(cfg)
    extra = forward_flops(cfg, t, executed=True)["total"] - forward_flops(cfg, t)["total"]
    causal_gap = sum(mixer_kind(k).flops(rc, t, True) - mixer_kind(k).flops(rc, t, False) for k in "LA")
    routed = 2 * t * 2 * 3 * 128 * 128
    assert extra - causal_gap == pytest.approx(2 * (4 - 1) * routed)


# --- sharded step with an expert axis -------------------------------------------------------------


SHARDED = textwrap.dedent("""
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    from types import SimpleNamespace
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    jax.config.update("jax_compilation_cache_dir", os.environ["LAB_COMPILE_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from archs.config import ModelConfig, MoEConfig, MLAConfig
    from archs.model import Model
    from archs.moe import RouterBias, router_stats, balance_loss, update_router_bias
    from archs.objective import AutoregressiveObjective
    from archs.sharding import make_mesh, param_shardings, batch_sharding

    def run(balance, capacity_factor):
        cfg = ModelConfig(size="xxs", d_model=64, n_layers=2, n_heads=4, pattern="LA", attn_gate=True, mlp="moe",
                          moe=MoEConfig(experts=4, top_k=2, shared_experts=1, balance=balance,
                                        capacity_factor=capacity_factor, bias_step=0.01),
                          mla=MLAConfig(kv_rank=32, rope_dim=16))
        abstract = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
        gdef, params, bias = nnx.split(abstract, nnx.Param, RouterBias)
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: rng.normal(0, 0.1 if a.ndim > 1 else 0.05, a.shape).astype(np.float32) + (a.ndim == 1),
                              nnx.to_pure_dict(params))
        bias = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), nnx.to_pure_dict(bias))
        objective = AutoregressiveObjective(abstract.cfg)
        tx = optax.sgd(0.3)  # linear in the gradient: the comparison checks gradients, not Adam's noise floor
        windows = rng.integers(0, 256, (8, 33)).astype(np.int32)

        def loss_fn(params, bias, w):
            m = nnx.merge(gdef, params, bias)
            (loss, _), inter = nnx.capture(objective.loss, nnx.Intermediate)(m, w, None)
            stats = router_stats(inter)
            return loss + balance_loss(stats, m.cfg), stats

        def step(params, opt, bias, w):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bias, w)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, update_router_bias(bias, stats["load"], m_cfg), loss

        m_cfg = abstract.cfg
        out = {}
        for name, mesh_cfg, devs in [("single", SimpleNamespace(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                                     ("sharded", SimpleNamespace(data=1, fsdp=2, tensor=2, expert=2), jax.devices())]:
            mesh = make_mesh(mesh_cfg, devs)
            p = jax.device_put(params, nnx.to_pure_dict(param_shardings(nnx.state(abstract, nnx.Param), mesh)))
            b = jax.device_put(bias, nnx.to_pure_dict(param_shardings(nnx.state(abstract, RouterBias), mesh)))
            w = jax.device_put(windows, batch_sharding(mesh))
            opt = tx.init(p)
            f = jax.jit(step).lower(p, opt, b, w).compile({"xla_backend_optimization_level": 0})
            losses = []
            for s in range(3):
                p, opt, b, loss = f(p, opt, b, w)
                losses.append(float(loss))
            out[name] = (losses, [np.asarray(x) for x in jax.tree.leaves((p, b))],
                         str(p["blocks"][0]["mlp"]["w_gate"].sharding.spec))
        (l1, p1, _), (l2, p2, spec) = out["single"], out["sharded"]
        err = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p2))
        moved = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, jax.tree.leaves((params, bias))))
        return {"loss_single": l1, "loss_sharded": l2, "max_param_diff": err, "moved": moved, "expert_spec": spec}

    print(json.dumps({"bias_dropless": run("bias", 0.0), "aux_capacity": run("aux", 1.5)}))
""")


def test_sharded_step_with_expert_axis_matches_single_device():
    """fsdp 2 x tensor 2 x expert 2 on 8 simulated CPU devices: same losses, parameters and
    selection biases after three steps as one device, for dropless MoE with bias balancing and
    capacity MoE with the balance loss (both with MLA and gated attention)."""
    proc = run_cli(["-c", SHARDED], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, res in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        np.testing.assert_allclose(res["loss_sharded"], res["loss_single"], rtol=1e-5, err_msg=name)
        assert res["max_param_diff"] < 1e-5 < 1e-2 < res["moved"], (name, res)
        # routed experts split over the expert axis (their width over fsdp and tensor)
        assert res["expert_spec"] == str(jax.sharding.PartitionSpec("expert", "fsdp", "tensor")), res
