"""Block diffusion (BD3-LM): the block-causal mask by hand, the L = 1 (AR) and L = T (MDLM)
limits against independent computations, the sampler's conditional against the training pass,
cached against uncached sampling, FLOPs against XLA's cost analysis, config errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from archs.attention import block_attention_pairs
from archs.config import DiffusionConfig, ModelConfig
from archs.errors import ConfigError
from archs.flops import flops_per_token, forward_flops
from archs.model import Model
from archs.sizes import mlp_hidden, resolve
from archs.tokens import BYTES
from diffusion.block import BlockDiffusionObjective, block_context
from diffusion.block_sampler import ModelBlockDenoiser, block_sample, generate_blocks
from diffusion.objective import MaskedDiffusionObjective
from diffusion.schedules import get_schedule
from conftest import compile_fast as _compile, fit_one_batch, xla_flops as _xla_flops
from test_ssm_layers import _build

EOD, MASK, PAD, VOCAB = BYTES.eod, BYTES.mask, BYTES.pad, BYTES.size


def bd_cfg(block_size: int, **kw) -> ModelConfig:
    base = dict(name="bd", objective="block_diffusion", causal=False, block_size=block_size, pattern="A",
                size="xxs", d_model=32, n_layers=2, n_heads=2)
    base.update(kw)
    return resolve(ModelConfig(**base))


def _call(fn, *args):
    return _compile(fn, *args)(*args)


def text(rng, shape, eods=()):
    """Random byte tokens with EODs at the given (row, column) places."""
    x = rng.integers(0, 256, shape).astype(np.int32)
    for r, c in eods:
        x[r, c] = EOD
    return x


# --- the mask ------------------------------------------------------------------------------------


def test_block_causal_mask_by_hand():
    """T = 4, L = 2: tokens [n0 n1 n2 n3 | c0 c1 c2 c3] (noisy, then clean)."""
    x = jnp.asarray([[5, EOD, 7, 8]])
    z = jnp.asarray([[MASK, MASK, 7, MASK]])
    tokens, ctx = block_context(z, x, 2, EOD, doc_mask=True)
    want = np.array([
        # n0 n1 n2 n3 c0 c1 c2 c3
        [1, 1, 0, 0, 0, 0, 0, 0],  # n0: its block, no clean block before it
        [1, 1, 0, 0, 0, 0, 0, 0],  # n1
        [0, 0, 1, 1, 1, 1, 0, 0],  # n2: its block + clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],  # n3
        [0, 0, 0, 0, 1, 1, 0, 0],  # c0: clean blocks <= 0
        [0, 0, 0, 0, 1, 1, 0, 0],  # c1
        [0, 0, 0, 0, 1, 1, 1, 1],  # c2: clean blocks <= 1
        [0, 0, 0, 0, 1, 1, 1, 1],  # c3
    ], bool)
    np.testing.assert_array_equal(np.asarray(ctx.blocks.mask()[0]), want)
    np.testing.assert_array_equal(np.asarray(tokens[0]), [MASK, MASK, 7, MASK, 5, EOD, 7, 8])
    np.testing.assert_array_equal(np.asarray(ctx.positions[0]), [0, 1, 2, 3, 0, 1, 2, 3])
    # Documents: clean tokens count x's EODs; noisy block 0 has its EOD masked, so it stays in
    # document 0; noisy block 1 starts after x's EOD at position 1 -> document 1.
    np.testing.assert_array_equal(np.asarray(ctx.segment_ids[0]), [0, 0, 1, 1, 0, 1, 1, 1])
    _, ctx2 = block_context(jnp.asarray([[5, EOD, MASK, 8]]), x, 2, EOD, doc_mask=True)
    np.testing.assert_array_equal(np.asarray(ctx2.segment_ids[0]), [0, 1, 1, 1, 0, 1, 1, 1])
    _, ctx3 = block_context(z, x, 2, EOD, doc_mask=False)
    assert ctx3.segment_ids is None


@pytest.mark.parametrize("t,blk,window", [(16, 4, 0), (12, 1, 0), (12, 12, 0), (16, 4, 5), (12, 3, 2), (8, 2, 30)])
def test_block_attention_pairs_count_the_mask(t, blk, window):
    _, ctx = block_context(jnp.zeros((1, t), jnp.int32), jnp.zeros((1, t), jnp.int32), blk, EOD, doc_mask=False)
    mask = np.array(ctx.blocks.mask()[0])
    pos = np.asarray(ctx.positions[0])
    if window:
        mask &= np.abs(pos[:, None] - pos[None, :]) < window
    assert block_attention_pairs(t, blk, window=window, executed=False) == mask.sum()
    if not window or window >= t:
        assert mask.sum() == t * (t + blk)
    assert block_attention_pairs(t, blk, window=window, executed=True) == 4 * t * t


# --- the limits: L = 1 is AR, L = T is MDLM -------------------------------------------------------


def test_block_size_one_is_the_ar_loss_of_the_same_network():
    """With L = 1 each block is one token: masked, its term is -log p(x_i | x_<i, [MASK] at i),
    the AR loss of the same weights run causally on x_<i followed by [MASK] (an explicit loop
    over positions here); unmasked, it is 0. At t = 1 every token is masked and the NELBO is
    exactly the summed AR loss; at t = 0.4 it is the masked positions' AR losses / 0.4."""
    t = 10
    cfg = bd_cfg(1)
    gdef, state = _build(lambda r: Model(cfg, rngs=r), seed=3)
    ar_gdef, _ = nnx.split(nnx.eval_shape(lambda: Model(dataclasses.replace(cfg, objective="ar", causal=True),
                                                        rngs=nnx.Rngs(0))))
    obj = BlockDiffusionObjective(cfg)
    x = jnp.asarray(text(np.random.default_rng(0), (2, t), eods=[(0, 3), (1, 6), (1, 7)]))

    # Reference: row (b, i) holds x_<i, [MASK] at i, PAD after (a causal model never sees it).
    rows = np.full((2, t, t), PAD, np.int32)
    for i in range(t):
        rows[:, i, :i] = np.asarray(x)[:, :i]
        rows[:, i, i] = MASK

    def both(state, x, rows):
        bd = nnx.merge(gdef, state)
        ar = nnx.merge(ar_gdef, state)
        at_one = obj.masked_nll(bd, x, jnp.ones((2, t)), jax.random.key(0))
        at_04 = obj.masked_nll(bd, x, jnp.full((2, t), 0.4), jax.random.key(1))
        nelbo_04 = obj.nelbo(bd, x, jnp.full((2, t), 0.4), jax.random.key(1))
        return at_one, at_04, nelbo_04, ar(rows.reshape(2 * t, t)).reshape(2, t, t, -1)

    (nll1, m1), (nll04, m04), nelbo04, ar_logits = _call(both, state, x, jnp.asarray(rows))
    logits = np.asarray(ar_logits, np.float64)[:, np.arange(t), np.arange(t)]  # row i, position i
    logits[..., [MASK, PAD]] = -np.inf  # SUBS: never [MASK] / PAD
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ar_nll = -np.take_along_axis(logp, np.asarray(x)[..., None], -1)[..., 0]  # [2, t]
    assert np.asarray(m1).all()
    np.testing.assert_allclose(np.asarray(nll1), ar_nll, rtol=2e-5, atol=2e-5)
    m04 = np.asarray(m04)
    assert 0 < m04.sum() < m04.size
    np.testing.assert_allclose(np.asarray(nll04), np.where(m04, ar_nll, 0.0), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(nelbo04), (np.where(m04, ar_nll, 0.0) / 0.4).sum(1), rtol=2e-5)


def test_block_size_t_is_mdlm():
    """L = T: one block, one t per sequence; the same rng gives the same t, the same masks and,
    through the same network, the same loss, NELBO and eval_nats as MaskedDiffusionObjective."""
    t = 16
    for normalize in ("tokens", "masked"):
        cfg = bd_cfg(t, diffusion=DiffusionConfig(normalize=normalize, eval_samples=3))
        gdef, state = _build(lambda r: Model(cfg, rngs=r), seed=1)
        bd, md = BlockDiffusionObjective(cfg), MaskedDiffusionObjective(cfg)
        w = jnp.asarray(text(np.random.default_rng(2), (4, t + 1), eods=[(0, 5), (2, 1), (3, 9)]))

        def both(state, w):
            m = nnx.merge(gdef, state)
            rng = jax.random.key(7)
            return (bd.loss(m, w, rng), md.loss(m, w, rng), bd.eval_nats(m, w, rng), md.eval_nats(m, w, rng))

        (l_bd, aux_bd), (l_md, aux_md), e_bd, e_md = _call(both, state, w)
        np.testing.assert_allclose(float(l_bd), float(l_md), rtol=1e-5)
        np.testing.assert_allclose(float(aux_bd["masked_frac"]), float(aux_md["masked_frac"]), rtol=0)
        np.testing.assert_allclose(np.asarray(e_bd), np.asarray(e_md), rtol=1e-5)
        assert 0 < float(aux_md["masked_frac"]) < 1


# --- sampling ------------------------------------------------------------------------------------


def test_block_denoiser_matches_the_training_pass():
    """The sampler's conditional for block j (cached: decode over a KV cache of the committed
    clean blocks; uncached: the whole context under the block mask) equals the training pass's
    noisy logits of block j, documents included (an EOD in x, one masked in z)."""
    t, blk = 16, 4
    cfg = bd_cfg(blk)
    model = nnx.merge(*_build(lambda r: Model(cfg, rngs=r), seed=5))
    obj = BlockDiffusionObjective(cfg)
    x = text(np.random.default_rng(4), (2, t), eods=[(0, 2), (0, 9), (1, 13)])
    z, _ = obj.corrupt(jnp.asarray(x), jnp.full((2, t // blk), 0.6), jax.random.key(3))
    z = np.array(z)
    z[0, 9] = MASK  # a masked EOD: block 2 of row 0 must not see a document boundary there
    from diffusion.objective import subs_log_probs

    train = np.asarray(jax.jit(lambda z, x: subs_log_probs(obj.denoiser_logits(model, z, x), z))(z, x))
    for kv_cache in (True, False):
        den = ModelBlockDenoiser(model, 2, t, kv_cache=kv_cache)
        for j in range(t // blk):
            got = den(z[:, j * blk:(j + 1) * blk], np.ones(2))
            want = train[:, j * blk:(j + 1) * blk]
            np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
            fin = np.isfinite(want)
            np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4, atol=1e-5)
            den.commit(x[:, j * blk:(j + 1) * blk])


@pytest.mark.parametrize("sampler", ["ancestral", "remask"])
def test_cached_sampling_equals_uncached(sampler):
    """Same seed, same tokens, with and without the KV cache; the prompt ends inside a block
    and the requested length is not a whole number of blocks."""
    cfg = bd_cfg(4)
    model = nnx.merge(*_build(lambda r: Model(cfg, rngs=r), seed=2))
    prompt = [EOD, 100, 101, 102, 103, 104]
    kw = dict(sampler=sampler, schedule=get_schedule("loglinear"), seed=9, prefix=prompt, stop_at_eod=False,
              confidence="top")
    a, sa = block_sample(model, 3, 18, 3, kv_cache=True, **kw)
    b, sb = block_sample(model, 3, 18, 3, kv_cache=False, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 18) and (a[:, :6] == prompt).all()
    assert not np.isin(a, [MASK, PAD]).any()
    assert sa["blocks"] == sb["blocks"] == 4 and sa["nfe"] == sb["nfe"]
    c, _ = block_sample(model, 3, 18, 3, kv_cache=True, **dict(kw, seed=10))
    assert (a[:, 6:] != c[:, 6:]).any()


class ScriptedDenoiser:
    """A block denoiser that predicts byte 97 everywhere, except EOD at the places in `eods`
    ((row, absolute position)); it records what the driver commits."""

    mask_id = MASK
    time_conditioned = False

    def __init__(self, block_size, eods):
        self.block_size, self.eods, self.pos, self.committed = block_size, eods, 0, []

    def __call__(self, z, t_b):
        out = np.full(z.shape + (VOCAB,), -np.inf, np.float32)
        out[..., 97] = 0.0
        for r, p in self.eods:
            if self.pos <= p < self.pos + self.block_size:
                out[r, p - self.pos] = -np.inf
                out[r, p - self.pos, EOD] = 0.0
        keep = z != MASK  # SUBS: unmasked positions copy their input
        out[keep] = -np.inf
        out[keep, z[keep]] = 0.0
        return out

    def commit(self, x):
        self.committed.append(np.asarray(x).copy())
        self.pos += self.block_size


@pytest.mark.parametrize("sampler", ["ancestral", "remask"])
def test_generation_stops_after_eod_or_at_length(sampler):
    kw = dict(sampler=sampler, schedule=get_schedule("loglinear"), seed=0, prefix=[EOD, 1, 2, 3, 4, 5])
    den = ScriptedDenoiser(4, eods=[(0, 9)])
    out, st = generate_blocks(den, 2, 30, 2, **kw)
    # Row 0 ends at its EOD (position 9); row 1 runs to the requested length.
    assert list(st["lengths"]) == [10, 30]
    assert out[0, 9] == EOD and (out[0, 10:] == PAD).all() and (out[0, 6:9] == 97).all()
    assert (out[1, 6:] == 97).all() and (out[:, :6] == [EOD, 1, 2, 3, 4, 5]).all()
    # The prompt's whole block was committed first, then every generated block but the last.
    assert st["blocks"] == 7 and len(den.committed) == 1 + 6
    np.testing.assert_array_equal(den.committed[0], [[EOD, 1, 2, 3]] * 2)
    np.testing.assert_array_equal(den.committed[1][:, :2], [[4, 5]] * 2)
    # Once every row has ended, generation stops early.
    den = ScriptedDenoiser(4, eods=[(0, 9), (1, 13)])
    out, st = generate_blocks(den, 2, 30, 2, **kw)
    assert list(st["lengths"]) == [10, 14] and st["blocks"] == 3 and (out[1, 14:] == PAD).all()


# --- FLOPs ---------------------------------------------------------------------------------------


def test_block_diffusion_flops_by_hand():
    t, blk = 64, 16
    cfg = bd_cfg(blk, d_model=64, n_heads=2, n_layers=2)
    d, v, hd, h = 64, cfg.vocab_size, 32, 2
    per_layer = (2 * (2 * t) * d * hd * 4 * h  # q, k, v, o projections over 2T tokens
                 + 4 * t * (t + blk) * hd * h  # scores + weighted sum over the block-causal pairs
                 + 2 * (2 * t) * 3 * d * mlp_hidden(cfg))  # SwiGLU over 2T tokens
    total = 2 * per_layer + 2 * (2 * t) * d * v + 2 * t * d * v  # embedding of 2T, head on the T noisy
    assert forward_flops(cfg, t)["total"] == total
    assert flops_per_token(cfg, t) == 3 * total / t
    # Against MDLM on the same stack: the doubled pass costs about twice, never less.
    md = dataclasses.replace(cfg, objective="diffusion")
    assert 1.8 < flops_per_token(cfg, t) / flops_per_token(md, t) < 2.2


def test_block_diffusion_flops_match_xla():
    """The vectorised pass as the objective runs it (2T tokens, dense [2T, 2T] masked attention,
    head on the noisy half) against forward_flops(executed=True) (embedding gathers are free)."""
    t = 256
    cfg = bd_cfg(16, d_model=256, n_heads=4, n_layers=2)
    gdef, state = _build(lambda r: Model(cfg, rngs=r))
    obj = BlockDiffusionObjective(cfg)
    z = x = jnp.zeros((1, t), jnp.int32)
    xla = _xla_flops(lambda s, z, x: obj.denoiser_logits(nnx.merge(gdef, s), z, x), state, z, x)
    analytic = forward_flops(cfg, t, executed=True, embedding=False)["total"]
    assert abs(xla / analytic - 1) < 0.05, (xla, analytic)


# --- configuration -------------------------------------------------------------------------------


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def test_bad_block_diffusion_configs_are_one_line_errors():
    import ssm  # noqa: F401  (registers G and M: refused for their kind, not for being unknown)

    with pytest.raises(ConfigError, match="block_size") as e:
        bd_cfg(0)
    _one_line(e)
    with pytest.raises(ConfigError, match="does not divide train.seq_len=64") as e:
        flops_per_token(bd_cfg(5), 64)
    _one_line(e)
    obj = BlockDiffusionObjective(bd_cfg(5))
    with pytest.raises(ConfigError, match="does not divide"):
        obj.loss(None, jnp.zeros((2, 65), jnp.int32), jax.random.key(0))
    with pytest.raises(ConfigError, match="cannot run") as e:
        BlockDiffusionObjective(bd_cfg(4, pattern="GGGA", n_layers=4))
    assert "G (gated deltanet)" in _one_line(e)
    with pytest.raises(ConfigError, match="cannot run"):
        flops_per_token(bd_cfg(4, pattern="MA"), 64)
    with pytest.raises(ConfigError, match="time_conditioning") as e:
        BlockDiffusionObjective(bd_cfg(4, diffusion=DiffusionConfig(time_conditioning=True)))
    _one_line(e)
    with pytest.raises(ConfigError, match="causal=false"):
        bd_cfg(4, causal=True)
    with pytest.raises(ConfigError, match="block-diffusion model"):
        mdlm = resolve(ModelConfig(objective="diffusion", causal=False, size="xxs"))
        ModelBlockDenoiser(nnx.eval_shape(lambda: Model(mdlm, rngs=nnx.Rngs(0))), 1, 16)


def test_arch_configs_compose():
    from conftest import compose

    bd = resolve(compose(["+arch=block_diffusion", "sweep=none"]).arch)
    assert (bd.name, bd.objective, bd.block_size, bd.causal) == ("block_diffusion", "block_diffusion", 16, False)
    assert isinstance(BlockDiffusionObjective(bd), BlockDiffusionObjective)
    for seq_len in (64, 128, 256, 1024):  # the sweeps' windows
        assert math.isfinite(flops_per_token(bd, seq_len))
    hy = resolve(compose(["+arch=diffusion_hybrid", "sweep=none"]).arch)
    assert (hy.name, hy.objective, hy.pattern, hy.causal) == ("diffusion_hybrid", "diffusion", "GGGA", False)
    assert hy.n_layers >= 4  # the default size holds the pattern's attention layer
    MaskedDiffusionObjective(hy)


# --- it learns -----------------------------------------------------------------------------------


def test_block_diffusion_memorises_one_batch():
    """Gradients flow through the [noisy; clean] pass: the masked-token cross-entropy of one
    fixed batch falls far below ln 257 (L = 4)."""
    import optax

    cfg = bd_cfg(4, d_model=64, diffusion=DiffusionConfig(normalize="masked"))
    obj = BlockDiffusionObjective(cfg)
    gdef, params = nnx.split(Model(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    w = jax.random.randint(jax.random.key(6), (2, 17), 0, 256)

    def train(params):
        return fit_one_batch(obj, gdef, params, w, 300)[1]

    losses = np.asarray(_call(train, params))
    first, last = losses[:20].mean(), losses[-50:].mean()
    assert first > 3.0 and last < 0.25 * first and last < 1.0, (first, last)  # measured 4.2 -> 0.44


def test_autoregressive_objective_refuses_a_block_diffusion_model():
    """Until an engine builds BlockDiffusionObjective for objective=block_diffusion, falling back
    to the AR objective fails with one line instead of training the wrong loss."""
    from archs.objective import AutoregressiveObjective

    with pytest.raises(ConfigError, match="BlockDiffusionObjective") as e:
        AutoregressiveObjective(bd_cfg(4))
    _one_line(e)
