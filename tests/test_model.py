"""The shared builder and attention against independent references."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from archs.attention import Attention, attention_mask
from archs.config import ModelConfig
from archs.context import Ctx
from archs.layers import apply_rope, rope_tables
from archs.model import Model
from archs.sizes import resolve

TINY = ModelConfig(size="xxs", d_model=32, n_layers=2, n_heads=4, vocab_size=259)


def test_rope_matches_closed_form():
    """Each pair (x_i, x_{i+d/2}) is rotated by angle pos * theta^(-2i/d)."""
    d, theta = 8, 10000.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 2, d)).astype(np.float32)
    pos = np.arange(5)[None, :] + 3
    cos, sin = rope_tables(jnp.asarray(pos), d, theta)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np.empty_like(x)
    for t in range(5):
        for i in range(d // 2):
            a = pos[0, t] * theta ** (-2 * i / d)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + d // 2]
            want[0, t, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            want[0, t, :, i + d // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    d = 16
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)

    def score(pq, pk):
        cq, sq = rope_tables(jnp.array([[pq]]), d, 10000.0)
        ck, sk = rope_tables(jnp.array([[pk]]), d, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4, abs=1e-5)


def _attn(cfg, window=0, seed=0):
    return Attention(resolve(cfg), window=window, rngs=nnx.Rngs(seed))


def _ctx(b, t, seg=None):
    return Ctx(positions=jnp.broadcast_to(jnp.arange(t), (b, t)), segment_ids=seg)


def _naive_mha(x, layer, cfg, causal):
    """Plain multi-head attention written out head by head (independent reference)."""
    b, t, _ = x.shape
    h, hd = cfg.n_heads, cfg.head_dim
    q = np.asarray(layer.wq(x)).reshape(b, t, h, hd)
    k = np.asarray(layer.wk(x)).reshape(b, t, -1, hd)
    v = np.asarray(layer.wv(x)).reshape(b, t, -1, hd)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(t), (b, t)), hd, cfg.rope_theta)
    q, k = np.asarray(apply_rope(jnp.asarray(q), cos, sin)), np.asarray(apply_rope(jnp.asarray(k), cos, sin))
    rep = h // k.shape[2]
    out = np.zeros((b, t, h, hd), np.float32)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi // rep].T / math.sqrt(hd)
            if causal:
                s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, hi] = p @ v[bi, :, hi // rep]
    return np.asarray(layer.wo(jnp.asarray(out.reshape(b, t, h * hd))))


@pytest.mark.parametrize("n_kv", [4, 2])
def test_gqa_matches_naive_attention(n_kv):
    """n_kv_heads = n_heads is plain MHA; fewer kv heads share keys across query groups."""
    cfg = dataclasses.replace(TINY, n_kv_heads=n_kv)
    layer = _attn(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 7, 32))
    got = layer(x, _ctx(2, 7))
    np.testing.assert_allclose(np.asarray(got), _naive_mha(x, layer, resolve(cfg), causal=True), rtol=2e-4, atol=2e-5)


def test_sliding_window_wider_than_sequence_is_full_attention():
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    full = _attn(TINY, window=0)(x, _ctx(2, 9))
    wide = _attn(TINY, window=9)(x, _ctx(2, 9))
    np.testing.assert_allclose(np.asarray(full), np.asarray(wide), rtol=1e-6, atol=1e-6)
    narrow = _attn(TINY, window=3)(x, _ctx(2, 9))
    assert not np.allclose(np.asarray(full)[:, 3:], np.asarray(narrow)[:, 3:], atol=1e-4)
    np.testing.assert_allclose(np.asarray(full)[:, :3], np.asarray(narrow)[:, :3], rtol=1e-6, atol=1e-6)


def test_window_mask_is_a_band():
    pos = jnp.arange(6)[None]
    m = np.asarray(attention_mask(pos, pos, causal=True, window=2)[0])
    want = np.array([[0 <= i - j < 2 for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(m, want)


def _model(**kw):
    return Model(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))


def test_causal_model_ignores_the_future_bidirectional_sees_it():
    t, cut = 12, 5
    a = jax.random.randint(jax.random.key(2), (2, t), 0, 256)
    b = a.at[:, cut + 1:].set((a[:, cut + 1:] + 7) % 256)
    causal = _model()
    np.testing.assert_allclose(np.asarray(causal(a))[:, :cut + 1], np.asarray(causal(b))[:, :cut + 1], atol=1e-6)
    assert not np.allclose(np.asarray(causal(a))[:, cut + 1:], np.asarray(causal(b))[:, cut + 1:], atol=1e-4)
    bidir = _model(causal=False, objective="diffusion")
    assert not np.allclose(np.asarray(bidir(a))[:, :cut + 1], np.asarray(bidir(b))[:, :cut + 1], atol=1e-4)


def test_packed_documents_do_not_see_each_other():
    """With doc_mask, the second document's logits equal those of the document alone."""
    doc2 = jax.random.randint(jax.random.key(3), (1, 6), 0, 256)
    eod = jnp.full((1, 1), 256)
    doc1 = jax.random.randint(jax.random.key(4), (1, 5), 0, 256)
    packed = jnp.concatenate([doc1, eod, doc2], axis=1)
    alone = jnp.concatenate([eod, doc2], axis=1)
    for causal in (True, False):
        m = _model(causal=causal, objective="ar" if causal else "diffusion")
        np.testing.assert_allclose(np.asarray(m(packed))[:, 5:], np.asarray(m(alone)), rtol=1e-4, atol=1e-5)


def test_loss_at_init_is_ln_vocab():
    from archs.objective import AutoregressiveObjective

    m = _model()
    w = jax.random.randint(jax.random.key(5), (4, 33), 0, 256)
    loss, _ = AutoregressiveObjective(m.cfg).loss(m, w, None)
    assert float(loss) == pytest.approx(math.log(259), abs=0.05)


def test_tiny_model_memorises_one_batch():
    """Optimisation works end to end: one fixed batch is driven to near-zero loss."""
    import optax

    from archs.objective import AutoregressiveObjective

    m = _model(d_model=64, n_heads=2)
    obj = AutoregressiveObjective(m.cfg)
    gdef, params = nnx.split(m)
    params = nnx.to_pure_dict(params)
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    w = jax.random.randint(jax.random.key(6), (2, 17), 0, 256)

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(lambda p: obj.loss(nnx.merge(gdef, p), w, None)[0])(params)
        up, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, up), opt, loss

    for _ in range(150):
        params, opt, loss = step(params, opt)
    assert float(loss) < 0.05


@pytest.mark.parametrize("target", [12e3, 25e3, 50e3, 200e3, 3e6, 20e6])
def test_size_rule_hits_the_target_count(target):
    """A count-valued arch.size resolves to a stack whose measured non-embedding count is the
    target to within the granularity of the rule (width steps of 32/64, whole layers)."""
    from archs.model import count_params

    cfg = resolve(ModelConfig(size=f"{target:g}", vocab_size=259))
    assert cfg.d_model % cfg.head_dim == 0 and cfg.d_model >= 32
    model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    _, nonembed = count_params(model)
    assert 0.6 < nonembed / target < 1.5, (cfg.d_model, cfg.n_layers, nonembed)
