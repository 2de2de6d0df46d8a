"""Accelerator-facing engine features, checked on CPU: rematerialisation, mixed precision, XProf
traces, the benchmark's report and the device peak table, and runs over several processes."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from archs.errors import ConfigError
from conftest import ROOT, compose, run_cli

TINY = ["sweep=none", "arch.size=xxs", "train.seq_len=32", "train.batch_size=4"]


# --- rematerialisation ----------------------------------------------------------------------------


def _loss_grads_memory(overrides: list[str], remat: str, batch: np.ndarray):
    """Loss, gradients and router statistics of the engine's loss for one policy, the jaxpr, and
    the temporaries of the compiled forward + backward (XLA's memory analysis)."""
    from sweeps.engine.plan import plan_run
    from sweeps.engine.trainer import CPU_REMAT_OPTIONS, Trainer

    cfg = compose(overrides + [f"train.remat={remat}"])
    tr = Trainer(cfg, plan_run(cfg, 1))
    params, _, other = tr.init_state()
    args = (params, other, batch, jax.random.key(3))
    options = CPU_REMAT_OPTIONS if remat != "none" else None  # as the trainer compiles its step on CPU
    fn = jax.jit(jax.value_and_grad(tr._loss, has_aux=True), compiler_options=options).lower(*args).compile()
    (total, (loss, _, stats)), grads = fn(*args)
    jaxpr = str(jax.make_jaxpr(tr._loss)(*args))
    return float(total), float(loss), grads, stats, jaxpr, fn.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("arch,policies", [("ar", ("block", "dots")), ("ar_moe", ("block",))])
def test_remat_policies_keep_loss_and_gradients_and_cut_memory(arch, policies, stdlib_corpus):
    """block and dots recompute inside the backward pass: loss (with the MoE balance loss, which
    needs the router statistics nnx.capture collects through nnx.remat) and every gradient equal
    the no-remat ones in float32, every block is checkpointed (remat in the jaxpr), and the
    compiled forward + backward needs far fewer temporaries with block than with none (dots in
    between). MoE: block only (the policy does not matter to the statistics, compiles do). On CPU only with trainer.CPU_REMAT_OPTIONS: XLA:CPU would otherwise merge the
    recomputation back into the forward pass."""
    from conftest import train_batch

    over = [f"+arch={arch}", "sweep=none", "arch.size=xxs", "arch.n_layers=4", "arch.dtype=float32",
            "train.seq_len=64", "train.batch_size=4", "train.tokens=100000"]
    if arch == "ar_moe":
        over.append("arch.moe.balance=aux")  # the balance loss enters the gradient
    batch = train_batch(stdlib_corpus, 0, 0, 4, 64)
    ref_total, ref_loss, ref_grads, ref_stats, ref_jaxpr, ref_temp = _loss_grads_memory(over, "none", batch)
    assert "remat" not in ref_jaxpr
    temp = {}
    for remat in policies:
        total, loss, grads, stats, jaxpr, temp[remat] = _loss_grads_memory(over, remat, batch)
        assert jaxpr.count("remat") >= 4, "every block is checkpointed"
        assert total == pytest.approx(ref_total, rel=1e-6) and loss == pytest.approx(ref_loss, rel=1e-6)
        if arch == "ar_moe":
            assert total > loss  # the balance loss is there
            np.testing.assert_allclose(float(stats["aux_loss"]), float(ref_stats["aux_loss"]), rtol=1e-6)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            scale = float(np.max(np.abs(r))) + 1e-12
            err = float(np.max(np.abs(np.asarray(g) - np.asarray(r)))) / scale
            assert err < 1e-5, (remat, jax.tree_util.keystr(path), err)
    assert temp["block"] < 0.6 * ref_temp, (ref_temp, temp)  # measured: 0.29 (ar), 0.50 (ar_moe)
    if "dots" in temp:
        assert temp["block"] < temp["dots"] < ref_temp, (ref_temp, temp)


# --- mixed precision ------------------------------------------------------------------------------


def test_auto_dtype_is_bf16_on_accelerators_and_keeps_the_run_id():
    from sweeps.engine.plan import plan_run, run_id_for

    cfg = compose(["+arch=ar", *TINY, "train.tokens=100000"])
    assert cfg.arch.dtype == "auto"
    assert plan_run(cfg, 1, "cpu").model_cfg.dtype == "float32"
    for platform in ("gpu", "cuda", "rocm", "tpu"):
        assert plan_run(cfg, 1, platform).model_cfg.dtype == "bfloat16"
    explicit = compose(["+arch=ar", *TINY, "train.tokens=100000", "arch.dtype=float32"])
    assert plan_run(explicit, 1, "gpu").model_cfg.dtype == "float32"
    assert run_id_for(explicit) != run_id_for(cfg)  # an explicit choice is another run
    with pytest.raises(ConfigError, match="arch.dtype='fp16'"):
        plan_run(compose(["+arch=ar", *TINY, "arch.dtype=fp16"]), 1)


def test_bf16_training_tracks_fp32_over_50_steps(stdlib_corpus):
    """A tiny model trained 50 steps with bf16 compute (fp32 parameters, norms' statistics, softmax
    and loss) follows the fp32 run at the default learning rate: every step's loss within 1% of it
    (measured: 0.12% at most), the last ten steps' mean within 0.2% (measured: 0.01%). The bf16
    model really multiplies in bf16 (bf16 projections in its jaxpr) and its losses differ."""
    from conftest import train_batch
    from sweeps.engine.plan import plan_run
    from sweeps.engine.trainer import Trainer

    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = compose(["+arch=ar", *TINY, "arch.dtype=" + dtype, "train.tokens=6400"])
        tr = Trainer(cfg, plan_run(cfg, 1))
        state = tr.init_state()
        batch = train_batch(stdlib_corpus, 0, 0, 4, 32)
        jaxpr = str(jax.make_jaxpr(tr._loss)(state[0], state[2], batch, jax.random.key(0)))
        bf16_dots = re.findall(r"bf16\[[\d,]*\] = dot_general", jaxpr)
        assert (len(bf16_dots) >= 7) == (dtype == "bfloat16"), len(bf16_dots)  # q, k, v, o, gate, up, down
        out = []
        for s in range(50):
            state, m = tr.step(state, train_batch(stdlib_corpus, 0, s, 4, 32), s)
            out.append(float(m["loss"]))
        losses[dtype] = np.array(out)
    f32, b16 = losses["float32"], losses["bfloat16"]
    assert f32[-10:].mean() < f32[:5].mean() - 1.0, "it learns"
    rel = np.abs(b16 - f32) / f32
    assert rel.max() < 0.01, rel.max()
    assert abs(b16[-10:].mean() - f32[-10:].mean()) / f32[-10:].mean() < 0.002
    assert rel.max() > 0, "bf16 computes something else than fp32"


# --- profiling ------------------------------------------------------------------------------------


def _trace_steps(profile_dir: Path) -> list[int]:
    """Step numbers of the training-step annotations in the Chrome-format trace XProf wrote."""
    traces = sorted(profile_dir.glob("plugins/profile/*/*.trace.json.gz"))
    assert traces, "no trace written"
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"]
    return sorted({int(e["args"]["step_num"]) for e in events
                   if e.get("name") == "train" and "step_num" in e.get("args", {})})


def test_profile_steps_trace_exactly_those_steps(tmp_path):
    from sweeps.engine.loop import train

    base = ["+arch=ar", *TINY, "train.tokens=1280", "train.evals=1", "train.progress=false",
            "train.tensorboard=false"]
    row = train(compose(base + ["train.profile_steps=[3,5]", f"root={tmp_path / 'a'}"]))
    profile = tmp_path / "a" / "runs" / row["run_id"] / "profile"
    assert row["status"] == "done"
    assert list(profile.glob("plugins/profile/*/*.xplane.pb")), "TensorBoard's profile plugin reads .xplane.pb"
    assert _trace_steps(profile) == [3, 4, 5]
    row = train(compose(base + [f"root={tmp_path / 'b'}"]))
    assert not (tmp_path / "b" / "runs" / row["run_id"] / "profile").exists()
    with pytest.raises(ConfigError, match="train.profile_steps"):
        compose(base + ["train.profile_steps=[5,3]"])
    from sweeps.engine.plan import plan_run

    with pytest.raises(ConfigError, match="past the run's last step"):
        plan_run(compose(base + ["train.profile_steps=[3,50]"]), 1)


# --- the benchmark --------------------------------------------------------------------------------


def test_device_peak_table():
    """Published dense bf16 peaks per chip; parts whose peak differs are not guessed."""
    from sweeps.tools.bench import device_peak

    expect = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
              "NVIDIA A100-PCIE-40GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}
    for kind, flops in expect.items():
        assert device_peak(kind)[1] == flops, kind
    for kind in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA L4", "cpu", "TPU v3"):
        assert device_peak(kind) is None, kind


def test_bench_runs_once_writes_nothing_and_reports_each_policy(tmp_path):
    """`python -m sweeps.bench +arch=ar` with the arch's sweep default still one benchmark: one
    header, one report per remat policy, MFU against the measured CPU peak, compiled memory that
    is lower with block than with none, and no file in the working directory."""
    proc = run_cli(["-m", "sweeps.bench", "+arch=ar", "bench.size=xxs", "arch.n_layers=4", "bench.seq_len=64",
                    "bench.batch_size=8", "bench.steps=2", "bench.matmul_n=256", "bench.remat=[none,block]"],
                   cwd=tmp_path, timeout=600, env_extra={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert sum(ln.startswith("arch=ar ") for ln in out) == 1, proc.stdout
    assert sum(" tokens/s, " in ln for ln in out) == 2
    assert sum("-> MFU " in ln for ln in out) == 2
    temps = [float(ln.split("temporaries ")[1].split(" MiB")[0].replace(",", ""))
             for ln in out if "compiled step memory" in ln]
    assert len(temps) == 2 and temps[1] < temps[0], proc.stdout
    assert list(tmp_path.iterdir()) == []


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry,over,match", [
    ("config", ["dist.processes=2"], "needs dist.coordinator"),
    ("config", ["dist.coordinator=localhost"], "must be HOST:PORT"),
    ("config", ["dist.coordinator=127.0.0.1:1234", "dist.processes=2", "dist.process_id=2"],
     "0 <= process_id < processes"),
    ("config", ["train.remat=all"], "train.remat"),
    ("bench", ["sweep=default"], "the benchmark measures one configuration"),  # would be a Hydra multirun
])
def test_bad_settings_are_one_line(entry, over, match):
    from sweeps.cli import check_command_line
    from sweeps.config import BenchConfig, Config, register_configs

    register_configs()
    with pytest.raises(ConfigError, match=match) as e:
        check_command_line(entry, {"config": Config, "bench": BenchConfig}[entry], ["+arch=ar", *over],
                           groups=("arch", "sweep"))
    assert "\n" not in str(e.value)


# --- several processes ----------------------------------------------------------------------------

MP_RUN = ["+arch=ar", *TINY, "train.tokens=2560", "train.evals=2", "train.log_every=1", "train.checkpoint_every_steps=8",
          "train.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(root: Path) -> list[str]:
    """The run as 2 processes of 1 CPU device each, on a loopback coordinator; their stderr."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, "-m", "sweeps.run", *MP_RUN, f"root={root}",
                               f"dist.coordinator=127.0.0.1:{port}", "dist.processes=2", f"dist.process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def _metrics(root: Path) -> list[dict]:
    (path,) = root.glob("runs/*/metrics.jsonl")
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_jax_distributed_must_start_first():
    from sweeps.config import DistConfig
    from sweeps.engine.distributed import initialize

    jax.devices()  # this process's backend is up
    with pytest.raises(ConfigError, match="must start before anything else uses JAX"):
        initialize(DistConfig(coordinator="127.0.0.1:1", processes=2, process_id=0))


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """The same run as one process (one device) and as two processes (one device each, the global
    mesh over both, each feeding its half of every batch): the same per-step losses and held-out
    bits per byte (to 1e-5; measured 5e-7), one results row, one metrics log, checkpoints written
    by both (each process's array metadata) and committed once by process 0 with an integrity
    record that verifies. Resumed as two processes from a two-process checkpoint, it ends with the
    same numbers again."""
    from sweeps.engine.checkpoint import Checkpointer
    from sweeps.engine.loop import train

    one = train(compose([*MP_RUN, f"root={tmp_path / 'one'}"]))
    assert one["status"] == "done"
    ref = _metrics(tmp_path / "one")
    two_root = tmp_path / "two"

    def check_same():
        got = _metrics(two_root)
        assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 21))
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5, atol=0)
        evals = [(r["step"], r["eval_bpb"]) for r in got if "eval_bpb" in r]
        ref_evals = [(r["step"], r["eval_bpb"]) for r in ref if "eval_bpb" in r]
        assert [s for s, _ in evals] == [s for s, _ in ref_evals] == [10, 20]
        np.testing.assert_allclose([b for _, b in evals], [b for _, b in ref_evals], rtol=1e-5)
        con = sqlite3.connect(two_root / "results.sqlite")
        rows = con.execute("SELECT run_id, status, eval_bpb FROM runs").fetchall()
        assert rows == [(one["run_id"], "done", pytest.approx(one["eval_bpb"], rel=1e-5))]

    _two_processes(two_root)
    check_same()
    rdir = two_root / "runs" / one["run_id"]
    assert len(list((rdir / "tb").glob("events.*"))) == 1
    ckpt = Checkpointer(rdir / "ckpt")
    try:
        assert ckpt.committed_steps() == [20, 16]
        assert all(ckpt.verify(s) is None for s in (16, 20))
    finally:
        ckpt.close()
    assert {p.name for p in (rdir / "ckpt" / "20").rglob("process_*")} == {"process_0", "process_1"}

    # Interrupted after the step-16 checkpoint: both processes restore it and finish the run.
    import shutil

    shutil.rmtree(rdir / "ckpt" / "20")
    (rdir / "ckpt.integrity" / "20.json").unlink()
    con = sqlite3.connect(two_root / "results.sqlite")
    con.execute("UPDATE runs SET status = 'failed', error = 'interrupted: test'")
    con.commit()
    con.close()
    errs = _two_processes(two_root)
    assert all("resumed from step 16" in e for e in errs), errs
    check_same()
