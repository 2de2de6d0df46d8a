"""Training engine: FLOP accounting, sharding, determinism, the single-run command."""

from __future__ import annotations

import json
import math
import sqlite3
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from archs.config import ModelConfig
from archs.flops import forward_flops
from archs.model import Model
from archs.objective import AutoregressiveObjective
from conftest import CONF, ROOT, compose, run_cli, train_step_flops

SMALL_RUN = ["arch.size=xxs", "train.seq_len=64", "train.batch_size=8", "train.eval_windows=16",
             "train.eval_batch=8", "train.progress=false", "train.tensorboard=false"]


def test_every_config_composes():
    groups = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir() and g.name != "hydra"}
    assert {"ar", "diffusion", "gdn", "mamba2", "hybrid"} <= set(groups["arch"])
    for arch in groups["arch"]:
        cfg = compose([f"+arch={arch}", "sweep=none"])
        from archs.sizes import resolve

        resolve(cfg.arch)
    for group, names in groups.items():
        if group == "arch":
            continue
        for name in names:
            if group == "tokenizer":  # python -m sweeps.prepare's group
                compose([f"tokenizer={name}"], "prepare")
            else:
                compose(["+arch=ar", f"{group}={name}"])


@pytest.mark.parametrize("causal,window", [(True, 0), (False, 0), (True, 16)])
def test_analytic_train_flops_match_xla(causal, window):
    """3 x the analytic forward count (as executed: dense masked attention) vs XLA's count of
    the compiled loss-and-gradient computation."""
    cfg = ModelConfig(size="xs", d_model=128, n_layers=2, n_heads=4, causal=causal,
                      objective="ar" if causal else "diffusion", pattern="S" if window else "A", window=window)
    gdef, params = nnx.split(Model(cfg, rngs=nnx.Rngs(0)))
    xla, analytic = train_step_flops(cfg, gdef, params, 4, 128)
    assert xla == pytest.approx(analytic, rel=0.10), (xla, analytic)


def test_causal_count_halves_attention_bidirectional_does_not():
    c = ModelConfig(size="xs")
    t = 256
    causal = forward_flops(c, t)["layers"][0]
    bidir = forward_flops(ModelConfig(size="xs", causal=False, objective="diffusion"), t)["layers"][0]
    executed = forward_flops(c, t, executed=True)["layers"][0]
    assert bidir == executed
    d, h, hd = 128, 4, 32
    assert executed - causal == pytest.approx(4 * hd * h * (t * t - t * (t + 1) / 2))


SHARDED = textwrap.dedent("""
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import compose, train_batch
    from sweeps.engine.trainer import Trainer
    from sweeps.engine.plan import plan_run
    from sweeps.engine.data import load_corpus
    corpus = load_corpus("stdlib")
    arch = sys.argv[1]
    base = [f"+arch={arch}", "sweep=none", "arch.size=xxs", "arch.d_model=64", "arch.n_heads=4", "arch.n_kv_heads=2",
            "train.seq_len=32", "train.batch_size=8", "train.tokens=100000"]
    meshes = {"ar": ["mesh=fsdp4_tp2"], "ar_moe": ["mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"]}
    out = {}
    for name, over, devs in [("single", ["mesh.data=1"], jax.devices()[:1]), ("sharded", meshes[arch], jax.devices())]:
        cfg = compose(base + over)
        plan = plan_run(cfg, len(devs))
        tr = Trainer(cfg, plan, devs)
        state = tr.init_state()
        losses = []
        for s in range(3):
            state, m = tr.step(state, train_batch(corpus, 0, s, 8, 32), s)
            losses.append(float(m["loss"]))
        leaves = [np.asarray(x) for x in jax.tree.leaves(state[0]) + jax.tree.leaves(state[2])]
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state[0])})
        out[name] = (losses, leaves, specs)
    l1, p1, _ = out["single"]; l2, p2, specs = out["sharded"]
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p2))
    print(json.dumps({"loss_single": l1, "loss_sharded": l2, "max_param_diff": err, "specs": specs}))
""")


@pytest.mark.parametrize("arch,axes", [("ar", ("fsdp", "tensor")), ("ar_moe", ("expert", "fsdp", "tensor"))])
def test_sharded_step_matches_single_device(arch, axes):
    """8 simulated CPU devices (fsdp 4 x tensor 2; for MoE fsdp 2 x tensor 2 x expert 2, with the
    routers' loss-free balancing biases carried through the step): same losses and updated
    parameters and router state as one device."""
    proc = run_cli(["-c", SHARDED, arch], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(res["loss_sharded"], res["loss_single"], rtol=1e-5)
    assert res["max_param_diff"] < 1e-5
    # parameters really are split over the mesh axes
    assert any(all(a in s for a in axes) for s in res["specs"]), res["specs"]


def test_same_seed_same_metrics(tmp_path):
    from sweeps.config import DataConfig
    from sweeps.engine.dataset import open_dataset
    from sweeps.engine.loop import train

    # the batch for step s does not depend on how the run got there
    ds = open_dataset(DataConfig())
    a = ds.train_batch(3, 7, 4, 16)
    for s in range(7):
        ds.train_batch(3, s, 4, 16)
    np.testing.assert_array_equal(a, ds.train_batch(3, 7, 4, 16))
    assert not np.array_equal(a, ds.train_batch(4, 7, 4, 16))

    logs = []
    for i in range(2):
        cfg = compose(["+arch=ar", "sweep=none", *SMALL_RUN, "train.tokens=10240", "train.evals=2",
                       "train.log_every=1", f"root={tmp_path / str(i)}"])
        row = train(cfg)
        assert row["status"] == "done"
        logs.append((tmp_path / str(i) / "runs" / row["run_id"] / "metrics.jsonl").read_text())
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 20


def test_single_run_command_learns_and_writes_its_row(tmp_path, stdlib_corpus):
    """`python -m sweeps.run +arch=ar sweep=none`: a done row, held-out bpb far below unigram."""
    from sweeps.engine.data import byte_unigram_bits

    root = tmp_path / "root"
    proc = run_cli(["-m", "sweeps.run", "+arch=ar", "sweep=none", *SMALL_RUN, "train.tokens=200000",
                    "optim.lr=1e-2", f"root={root}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    con = sqlite3.connect(root / "results.sqlite")
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM runs")]
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "done" and row["error"] is None and row["arch"] == "ar"
    assert row["tokens"] == math.ceil(200000 / 512) * 512
    assert row["params"] > row["nonembed_params"] > 0
    from archs.flops import flops_per_token
    from archs.sizes import resolve

    assert row["flops"] == pytest.approx(flops_per_token(resolve(ModelConfig(size="xxs")), 64) * row["tokens"])
    unigram = byte_unigram_bits(stdlib_corpus.heldout)
    assert row["eval_bpb"] < unigram - 1.0, (row["eval_bpb"], unigram)
    assert row["corpus_sha256"] == stdlib_corpus.sha256


def test_cooldown_branch_equals_a_separately_trained_wsd_run(tmp_path):
    """A branch forked from its trunk at step 10 and cooled down over 4 steps computes what a separate
    warmup-stable-decay run of 14 steps computes (same batches, same rates up to the fork): the same
    per-step losses after the fork and the same held-out bits per byte."""
    from sweeps.engine.loop import train
    from sweeps.engine.plan import run_id_for

    common = ["+arch=ar", "sweep=none", *SMALL_RUN, "train.evals=1", "train.log_every=1", "optim.schedule=wsd",
              "optim.warmup_steps=2", f"root={tmp_path}"]
    trunk_cfg = compose([*common, "train.tokens=5120", "optim.decay_steps=0", "role=trunk", "train.keep_steps=[10]"])
    trunk = train(trunk_cfg)
    point = [*common, "train.tokens=7168", "optim.decay_steps=4"]
    branch = train(compose([*point, "role=branch", f"train.branch_from={run_id_for(trunk_cfg)}"]))
    plain = train(compose(point))
    assert trunk["status"] == branch["status"] == plain["status"] == "done"
    assert branch["trunk_id"] == trunk["run_id"] and branch["run_id"] != plain["run_id"]
    assert branch["compute_spent"] == pytest.approx(plain["flops"] * 4 / 14) and plain["compute_spent"] == plain["flops"]

    def log(row):
        return [json.loads(ln) for ln in (tmp_path / "runs" / row["run_id"] / "metrics.jsonl").read_text().splitlines()]

    after_fork = [r for r in log(plain) if r["step"] > 10]
    assert [r["step"] for r in log(branch)] == [11, 12, 13, 14] == [r["step"] for r in after_fork]
    for a, b in zip(log(branch), after_fork):
        assert a["lr"] == b["lr"] and abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert abs(branch["eval_bpb"] - plain["eval_bpb"]) <= 1e-6, (branch["eval_bpb"], plain["eval_bpb"])


def test_run_ids_of_existing_configs_do_not_move():
    """Settings added later at their defaults (data.dir, data.tokenizer, data.mqar, arch.attention_impl)
    leave run ids as they were, so existing roots resume and skip their finished runs; the literal is
    the id the previous release gave this config."""
    from sweeps.engine.plan import run_id_for

    assert run_id_for(compose(["+arch=ar", "sweep=none"])) == "ar-xs-1500000tok-s0-fa97f443"
    assert run_id_for(compose(["+arch=ar", "sweep=none", "arch.attention_impl=blocked"])) == \
        "ar-xs-1500000tok-s0-fa97f443"  # an implementation choice: the same run
    mqar = [run_id_for(compose(["+arch=ar", "sweep=none", "data=mqar", f"data.mqar.pairs={p}"])) for p in (4, 8)]
    assert mqar[0] != mqar[1]
