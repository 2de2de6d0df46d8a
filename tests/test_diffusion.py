"""Masked diffusion: the NELBO estimator against closed forms, SUBS, schedules, samplers.

Most checks use the exact denoiser of i.i.d. data (tokens drawn from a known marginal p): at
every masked position it predicts p, whatever the context. Its NELBO is tight: for every
window it equals the window's exact NLL, so the estimator's mean must hit T * H(p).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from archs.config import DiffusionConfig, ModelConfig
from archs.errors import ConfigError
from diffusion.objective import MaskedDiffusionObjective, subs_log_probs
from diffusion.samplers import ModelDenoiser, ancestral, remask
from diffusion.schedules import get_schedule, sample_times, stratified_times
from archs.tokens import BYTES

EOD, MASK, PAD, VOCAB = BYTES.eod, BYTES.mask, BYTES.pad, BYTES.size

SUPPORT = np.array([10, 32, 97, 101, 115, EOD])
P_SUPPORT = np.array([0.05, 0.30, 0.25, 0.20, 0.12, 0.08])
P_V = np.zeros(VOCAB)
P_V[SUPPORT] = P_SUPPORT
H_NATS = float(-(P_SUPPORT * np.log(P_SUPPORT)).sum())


def diffusion_cfg(**kw) -> ModelConfig:
    return ModelConfig(objective="diffusion", causal=False, diffusion=DiffusionConfig(**kw))


class ExactIID:
    """Model stand-in: logits log p at every position (the optimal denoiser for i.i.d. data)."""

    def __call__(self, tokens_bt, *, t_b=None):
        with np.errstate(divide="ignore"):
            logp = jnp.asarray(np.log(P_V), jnp.float32)
        return jnp.broadcast_to(logp, tokens_bt.shape + (VOCAB,))


def iid_windows(b, t, seed=0):
    return np.random.default_rng(seed).choice(VOCAB, size=(b, t + 1), p=P_V).astype(np.int32)


def exact_nll(windows):
    return -np.log(P_V[windows[:, 1:]]).sum(axis=1)


# --- (1) the estimator against the closed form -------------------------------------------------


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_nelbo_of_exact_denoiser_is_sequence_entropy(schedule):
    b, t = 512, 16
    w = iid_windows(b, t)
    obj = MaskedDiffusionObjective(diffusion_cfg(schedule=schedule, eval_samples=4))
    est = np.asarray(obj.eval_nats(ExactIID(), jnp.asarray(w), jax.random.key(0)), np.float64)
    gap = est - exact_nll(w)  # MC error of the t / mask draws only
    assert abs(gap.mean()) < 4 * gap.std() / math.sqrt(b)
    assert abs(est.mean() - t * H_NATS) < 4 * est.std() / math.sqrt(b)
    # The per-token training loss estimates H(p); the masked-count ratio estimator too (exactly
    # so for log-linear, where -alpha' = 1 whatever t).
    for normalize in ("tokens", "masked") if schedule == "loglinear" else ("tokens",):
        obj_n = MaskedDiffusionObjective(diffusion_cfg(schedule=schedule, normalize=normalize))
        losses = [float(obj_n.loss(ExactIID(), jnp.asarray(w[i::8]), jax.random.key(i))[0]) for i in range(8)]
        assert abs(np.mean(losses) - H_NATS) < 0.05 * H_NATS, (normalize, np.mean(losses), H_NATS)


def test_estimator_variance_shrinks_with_k():
    b, t = 256, 16
    w = iid_windows(b, t, seed=1)
    var = {}
    for k in (1, 4, 16):
        obj = MaskedDiffusionObjective(diffusion_cfg(eval_samples=k))
        est = np.asarray(obj.eval_nats(ExactIID(), jnp.asarray(w), jax.random.key(7)), np.float64)
        var[k] = float(np.var(est - exact_nll(w)))
    assert var[4] < 0.5 * var[1] and var[16] < 0.5 * var[4], var


def test_times_are_stratified_and_clipped():
    n, eps = 8, 1e-3
    t = np.asarray(stratified_times(jnp.asarray(0.37), n, eps))
    assert sorted(np.floor(t * n).astype(int)) == list(range(n))  # one draw per stratum
    t0 = np.asarray(stratified_times(jnp.asarray(0.0), n, eps))
    assert t0.min() == pytest.approx(eps) and t0.max() <= 1.0
    tb = np.asarray(sample_times(jax.random.key(3), 1000, eps, antithetic=False))
    assert tb.min() >= eps and tb.max() <= 1.0 and abs(tb.mean() - 0.5) < 0.05


# --- (2) SUBS, masking, weights --------------------------------------------------------------


@pytest.mark.parametrize("name", ["loglinear", "cosine"])
def test_schedule_weight_matches_its_derivative(name):
    sched = get_schedule(name)
    t = jnp.array([1e-3, 0.1, 0.5, 0.9, 1.0])
    dalpha = jax.vmap(jax.grad(sched.alpha))(t)
    np.testing.assert_allclose(sched.neg_dalpha(t), -dalpha, rtol=1e-5)
    t64 = np.asarray(t, np.float64)  # reference in float64: 1 - alpha_t cancels at small t
    np.testing.assert_allclose(sched.weight(t), sched.neg_dalpha(t64) / (1 - sched.alpha(t64)), rtol=1e-4)
    assert float(sched.alpha(0.0)) == 1.0 and abs(float(sched.alpha(1.0))) < 1e-7
    w_eps = float(sched.weight(jnp.float32(1e-3)))
    assert math.isfinite(w_eps) and w_eps == pytest.approx({"loglinear": 1e3, "cosine": 2e3}[name], rel=1e-3)


def test_weight_finite_at_the_clip():
    obj = MaskedDiffusionObjective(diffusion_cfg())
    x = jnp.asarray(iid_windows(4, 16)[:, 1:])
    t = jnp.clip(jnp.zeros(4), obj.eps, 1.0)  # t = 0 drawn: clipped to eps
    nelbo = obj.nelbo(ExactIID(), x, t, jax.random.key(0))
    assert np.isfinite(np.asarray(nelbo)).all()


def test_subs_log_probs_carry_over_and_never_mask():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, VOCAB)) * 3, jnp.float32)
    z = rng.integers(0, 256, size=(2, 8)).astype(np.int32)
    z[:, ::2] = MASK
    logp = np.asarray(subs_log_probs(logits, jnp.asarray(z)))
    assert np.isneginf(logp[..., MASK]).all() and np.isneginf(logp[..., PAD]).all()
    masked = z == MASK
    np.testing.assert_allclose(np.log(np.exp(logp[masked]).sum(-1)), 0.0, atol=1e-5)
    carried = logp[~masked]
    assert (np.take_along_axis(carried, z[~masked][:, None], -1) == 0.0).all()  # exact point mass
    assert (np.isneginf(carried).sum(-1) == VOCAB - 1).all()


def test_only_masked_positions_contribute():
    b, t = 4, 16
    x = jnp.asarray(iid_windows(b, t)[:, 1:])
    logits0 = jnp.asarray(np.random.default_rng(1).normal(size=(b, t, VOCAB)), jnp.float32)

    class Table:  # a "model" whose logits are a free tensor, to take gradients against
        def __init__(self, table):
            self.table = table

        def __call__(self, tokens_bt, *, t_b=None):
            return self.table

    obj = MaskedDiffusionObjective(diffusion_cfg())
    t_b = jnp.full((b,), 0.5)

    def total(table):
        nll, masked = obj.masked_nll(Table(table), x, t_b, jax.random.key(2))
        return nll.sum(), (nll, masked)

    grad, (nll, masked) = jax.grad(total, has_aux=True)(logits0)
    grad, nll, masked = map(np.asarray, (grad, nll, masked))
    assert 0 < masked.sum() < masked.size
    assert (nll[~masked] == 0).all() and (nll[masked] > 0).all()
    assert (grad[~masked] == 0).all() and (np.abs(grad[masked]).sum(-1) > 0).all()
    assert (grad[..., MASK] == 0).all()  # the [MASK] logit never enters the loss


def test_real_denoiser_never_produces_mask_and_trains():
    from flax import nnx

    from archs.model import Model

    cfg = diffusion_cfg(time_conditioning=True)
    cfg.d_model, cfg.n_layers, cfg.n_heads = 32, 1, 2
    model = Model(cfg, rngs=nnx.Rngs(0))
    w = jnp.asarray(iid_windows(2, 12))
    obj = MaskedDiffusionObjective(model.cfg)
    loss, aux = obj.loss(model, w, jax.random.key(0))
    assert np.isfinite(float(loss)) and 0 < float(aux["masked_frac"]) < 1
    den = ModelDenoiser(model)
    z = np.full((2, 12), MASK, np.int32)
    z[:, :3] = 97
    logp = den(z, np.full(2, 0.7))
    assert np.isneginf(logp[..., MASK]).all() and (logp[:, :3, 97] == 0).all()
    out, st = ancestral(den, 2, 12, 4, schedule=get_schedule("loglinear"), seed=0, prefix=[EOD])
    assert (out != MASK).all() and (out[:, 0] == EOD).all() and st["nfe"] == 4  # time-conditioned: no cache


def test_config_composes_and_rejects_bad_values():
    from sweeps.engine.plan import make_objective
    from conftest import compose

    cfg = compose(["+arch=diffusion", "sweep=none"])
    mc = cfg.arch
    assert isinstance(make_objective(mc), MaskedDiffusionObjective) and not mc.causal
    with pytest.raises(ConfigError, match="schedule"):
        MaskedDiffusionObjective(diffusion_cfg(schedule="sqrt"))
    with pytest.raises(ConfigError, match="normalize"):
        MaskedDiffusionObjective(diffusion_cfg(normalize="batch"))


# --- (3) samplers with the exact denoiser ----------------------------------------------------


class ExactIIDDenoiser:
    """Host-side exact denoiser with SUBS: p at masked positions, the input elsewhere."""

    time_conditioned = False
    mask_id = MASK

    def __init__(self):
        self.calls = 0
        with np.errstate(divide="ignore"):
            self.logp_v = np.log(P_V).astype(np.float32)

    def __call__(self, z_bt, t_b):
        self.calls += 1
        copy = np.where(np.arange(VOCAB) == z_bt[..., None], 0.0, -np.inf).astype(np.float32)
        return np.where((z_bt == MASK)[..., None], self.logp_v, copy)


def chi2_pvalue(tokens):
    assert (tokens != MASK).all() and (tokens != PAD).all()
    counts = np.array([(tokens == s).sum() for s in SUPPORT])
    assert counts.sum() == tokens.size  # nothing outside p's support
    return stats.chisquare(counts, P_SUPPORT * tokens.size).pvalue


SAMPLER_CASES = {
    "ancestral": lambda d, **k: ancestral(d, schedule=get_schedule("loglinear"), **k),
    "ancestral-cosine-blocks": lambda d, **k: ancestral(d, schedule=get_schedule("cosine"), block_len=8, **k),
    "remask-top": lambda d, **k: remask(d, confidence="top", **k),
    "remask-random": lambda d, **k: remask(d, confidence="random", **k),
    "semiar-top": lambda d, **k: remask(d, confidence="top", block_len=8, **k),
}


@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_sampler_frequencies_match_p(case):
    out, st = SAMPLER_CASES[case](ExactIIDDenoiser(), batch=64, length=32, steps=8, seed=11)
    assert chi2_pvalue(out) > 1e-3, case
    assert st["steps"] >= 8


def test_low_confidence_remasking_sharpens():
    # LLaDA's confidence (probability of the drawn token) picks likely draws first, so the most
    # likely token is over-represented: a known property, not a bug.
    out, _ = remask(ExactIIDDenoiser(), batch=64, length=32, steps=16, seed=3, confidence="prob")
    top = SUPPORT[P_SUPPORT.argmax()]
    freq = (out == top).mean()
    assert freq > P_SUPPORT.max() + 4 * math.sqrt(P_SUPPORT.max() * (1 - P_SUPPORT.max()) / out.size)


def test_cached_and_uncached_ancestral_agree():
    sched = get_schedule("loglinear")
    cached, uncached = ExactIIDDenoiser(), ExactIIDDenoiser()
    a, sa = ancestral(cached, 4, 16, 64, schedule=sched, seed=5, cache=True)
    b, sb = ancestral(uncached, 4, 16, 64, schedule=sched, seed=5, cache=False)
    np.testing.assert_array_equal(a, b)
    assert sb["nfe"] == 64 and sa["nfe"] == cached.calls < 64
    c, _ = ancestral(ExactIIDDenoiser(), 4, 16, 64, schedule=sched, seed=6)
    assert (a != c).any()


def test_prefix_is_clamped():
    out, _ = remask(ExactIIDDenoiser(), 3, 10, 4, seed=0, prefix=[EOD, 97, 98])
    assert (out[:, :3] == [EOD, 97, 98]).all() and (out != MASK).all()


# --- (5) the end-to-end claim (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_diffusion_bound_between_ar_nll_and_unigram(tmp_path):
    """Two models on the default corpus, the AR single run's token budget each (the config
    default, train.tokens): the diffusion NELBO bound must lie above the AR NLL (masked
    diffusion needs more compute for the same loss) and well below the byte-unigram entropy
    (it learned context)."""
    from sweeps.engine.data import byte_unigram_bits, load_corpus
    from sweeps.engine.loop import train
    from conftest import compose

    common = ["sweep=none", f"root={tmp_path}", "train.progress=false", "train.tensorboard=false"]
    ar = train(compose(["+arch=ar", *common]))
    dif = train(compose(["+arch=diffusion", *common]))
    assert ar["status"] == dif["status"] == "done"
    assert ar["tokens"] == dif["tokens"]
    unigram = byte_unigram_bits(load_corpus("stdlib").heldout)
    assert dif["eval_bpb"] > ar["eval_bpb"]
    assert dif["eval_bpb"] < unigram - 0.5, (dif["eval_bpb"], unigram)
