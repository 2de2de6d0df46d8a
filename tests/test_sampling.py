"""Sampling: cached AR decoding against the full forward pass, float64 categorical draws, the
params-only checkpoint restore, and the sample / sample_tradeoff commands on a tiny root."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from archs.config import ModelConfig
from archs.model import Model
from archs.sampling import ARSampler, forbid, gumbel_argmax
from archs.tokens import BYTES

EOD, MASK, PAD = BYTES.eod, BYTES.mask, BYTES.pad


def tiny(pattern="A", **kw) -> ModelConfig:
    return ModelConfig(pattern=pattern, d_model=32, n_layers=2, n_heads=2, window=4, doc_mask=True, **kw)


def tokens_with_eod(b=2, t=12, eod_at=3, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, size=(b, t)).astype(np.int32)
    x[:, eod_at] = EOD
    if t > 8:
        x[1, 8] = EOD  # and one after the prompt, in one row only
    return x


# --- (4) cached decoding == full forward ----------------------------------------------------


@pytest.mark.parametrize("pattern", ["A", "AS"])
def test_cached_decoding_matches_full_forward(pattern):
    model = Model(tiny(pattern), rngs=nnx.Rngs(0))
    x = tokens_with_eod()
    b, t = x.shape
    full = np.asarray(model(jnp.asarray(x)))
    cache = model.init_cache(b, t)
    prompt = 5  # the EOD at position 3 lies inside the prompt
    logits, cache = model.decode(jnp.asarray(x[:, :prompt]), cache, 0)
    steps = [np.asarray(logits)]
    for pos in range(prompt, t):
        logits, cache = model.decode(jnp.asarray(x[:, pos:pos + 1]), cache, pos)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)


def test_ar_sampler_greedy_equals_full_forward_greedy():
    model = Model(tiny("AS"), rngs=nnx.Rngs(1))
    prompt = tokens_with_eod(b=2, t=5, eod_at=2, seed=3)
    out, st = ARSampler(model).generate(prompt, 6, temperature=0.0)
    np.testing.assert_array_equal(out[:, :5], prompt)
    # Greedy means: every new token is the argmax of the full (uncached) forward pass at its
    # position given all tokens before it; the model is causal, so one pass checks them all.
    logits = np.asarray(model(jnp.asarray(out[:, :-1])))[:, 4:]
    np.testing.assert_array_equal(out[:, 5:], forbid(logits).argmax(-1))
    assert st["nfe"] == 6 and st["tokens_per_s"] > 0


# --- float64 categorical draws ----------------------------------------------------------------


def test_gumbel_argmax_float64_matches_probabilities():
    p = np.array([0.5, 0.25, 0.15, 0.0999, 1e-4])
    rng = np.random.default_rng(0)
    logits = np.log(np.broadcast_to(p, (20000, 5)))
    draws = gumbel_argmax(logits, rng)
    counts = np.bincount(draws, minlength=5)
    assert stats.chisquare(counts[:4], p[:4] / p[:4].sum() * counts[:4].sum()).pvalue > 1e-3
    assert gumbel_argmax(np.log(p)[None], rng, temperature=0.0)[0] == 0
    never = forbid(np.zeros((1000, 259)))
    assert not np.isin(gumbel_argmax(never, rng), (MASK, PAD)).any()


# --- loading trained runs ---------------------------------------------------------------------


def test_params_only_restore_after_saving(tmp_path):
    import jax

    from sweeps.engine.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "ckpt", owner=True)
    params = {"w": jnp.ones((3, 2)), "b": {"c": jnp.arange(4.0)}}
    opt = {"mu": jnp.zeros((3, 2)), "count": jnp.int32(7)}
    ck.save(5, params, opt)
    ck.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    step, restored = ck.restore_params(target)  # same manager that saved: must still work
    assert step == 5
    np.testing.assert_array_equal(restored["b"]["c"], params["b"]["c"])
    ck.close()


def _fake_run(root, run_id, mc: ModelConfig, *, eval_bpb, flops, seq_len=16):
    """A results row + run dir + checkpoint for an untrained tiny model (no training needed)."""
    from omegaconf import OmegaConf

    from sweeps.engine.checkpoint import Checkpointer
    from sweeps.engine.records import ResultsDB
    from conftest import compose

    arch = "diffusion" if mc.objective == "diffusion" else "ar"
    cfg = compose([f"+arch={arch}", "sweep=none", f"root={root}", f"train.seq_len={seq_len}",
                   "arch.d_model=32", "arch.n_layers=1", "arch.n_heads=2"])
    rdir = root / "runs" / run_id
    rdir.mkdir(parents=True)
    (rdir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    model = Model(cfg.arch, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(model))
    ck = Checkpointer(rdir / "ckpt", owner=True)
    ck.save(1, state, {"count": jnp.int32(0)})
    ck.close()
    db = ResultsDB(root)
    _, lock = db.claim(run_id, {"arch": arch, "objective": mc.objective, "params": 1, "tokens": 100, "flops": flops})
    db.update(run_id, status="done", eval_bpb=eval_bpb, pid=None)
    lock.release()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sroot")
    _fake_run(root, "ar-tiny", ModelConfig(), eval_bpb=7.0, flops=1e9)
    _fake_run(root, "diffusion-tiny", ModelConfig(objective="diffusion", causal=False), eval_bpb=7.5, flops=1.1e9)
    return root


def test_sample_command_both_families(tiny_root, capsys):
    from conftest import compose
    from sweeps.tools.sample import main

    main(compose([f"root={tiny_root}", "run=diffusion", "steps=4", "n=2", "progress=false", "sampler=semiar",
                  "block_len=5"], "sample"))
    out = capsys.readouterr().out
    assert "diffusion-tiny" in out and "4 steps" in out and out.count("----- sample") == 2
    main(compose([f"root={tiny_root}", "run=ar-tiny", "n=2", "progress=false", "prompt=def"], "sample"))
    out = capsys.readouterr().out
    assert "KV-cache" in out and out.count("----- sample") == 2 and "def" in out


def test_sample_command_rejects_typos(tiny_root):
    from archs.errors import ConfigError
    from conftest import compose
    from sweeps.cli import check_command_line
    from sweeps.config import SampleConfig
    from sweeps.tools.sample import main

    with pytest.raises(ConfigError, match="'stpes'.*did you mean steps"):
        check_command_line("sample", SampleConfig, [f"root={tiny_root}", "stpes=4"])
    with pytest.raises(ConfigError, match="matches no run"):
        main(compose([f"root={tiny_root}", "run=zzz"], "sample"))


def test_tradeoff_report(tiny_root):
    import json

    from conftest import compose
    from sweeps.tools.tradeoff import main

    main(compose([f"root={tiny_root}", "steps=[2,15]", "n=3", "progress=false", "samplers=[ancestral,remask]"],
                 "sample_tradeoff"))
    rep = tiny_root / "report"
    res = json.loads((rep / "sampling_tradeoff.json").read_text())
    fam = [(r["family"], r["sampler"], r["steps"]) for r in res["rows"]]
    assert fam == [("diffusion", "ancestral", 2), ("diffusion", "ancestral", 15), ("diffusion", "remask", 2),
                   ("diffusion", "remask", 15), ("ar", "kv-cache", 15)]
    assert res["judge"]["run_id"] == "ar-tiny" and res["ar"]["run_id"] == "ar-tiny"
    assert all(np.isfinite(r["judge_bpb"]) and r["tokens_per_s"] > 0 for r in res["rows"])
    for ext in ("md", "png", "pdf"):
        assert (rep / f"sampling_tradeoff.{ext}").stat().st_size > 0
