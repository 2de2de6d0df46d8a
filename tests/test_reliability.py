"""Reliability: preemption, kills, damaged checkpoints, divergence, bad input, concurrent writers.

End-to-end runs are real `python -m sweeps.run` processes on a tiny model and a ~300 KB text
corpus; the interrupted ones must finish with exactly the metrics of an uninterrupted run.
Nothing heavy is imported at module level: the database tests spawn worker processes that
import this module.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, compose

STEPS, EVERY = 64, 8  # 64 steps of 4 x 32 tokens, a checkpoint every 8 steps
RUN = ["+arch=ar", "sweep=none", "arch.size=xxs", "train.seq_len=32", "train.batch_size=4",
       f"train.tokens={STEPS * 4 * 32}", "train.eval_windows=4", "train.eval_batch=4", "train.evals=4",
       "train.log_every=1", "train.progress=false", "train.tensorboard=false",
       f"train.checkpoint_every_steps={EVERY}", "train.checkpoint_every_s=3600"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~300 KB of text (standard-library sources), one file: training and held-out by stream tail."""
    import sysconfig

    parts, n = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        parts.append(p.read_bytes())
        n += len(parts[-1])
        if n > 300_000:
            break
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_bytes(b"".join(parts))
    return f


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("LAB_COMPILE_CACHE", str(Path.home() / ".cache" / "difflab" / "xla"))
    return env


def _run_args(corpus: Path, root: Path, *extra: str) -> list[str]:
    return ["-m", "sweeps.run", *RUN, "data=text", f"data.paths=[{corpus}]", f"root={root}", *extra]


class _Proc:
    """A `python -m ...` child with its output in a file (no pipe to fill up)."""

    def __init__(self, args: list[str], log: Path, env_extra: dict | None = None):
        self.log = log
        self._fh = log.open("w")
        self.t0 = time.time()
        self.p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**_env(), **(env_extra or {})},
                                  stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.p.wait(timeout)
        finally:
            self._fh.close()
        self.wall = time.time() - self.t0
        return rc

    @property
    def output(self) -> str:
        return self.log.read_text()


def _run(args: list[str], log: Path) -> tuple[int, str]:
    proc = _Proc(args, log)
    rc = proc.wait()
    return rc, proc.output


def _metrics(root: Path) -> list[dict]:
    (path,) = (root / "runs").glob("*/metrics.jsonl")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _last_step(root: Path) -> int:
    files = list((root / "runs").glob("*/metrics.jsonl"))
    if not files:
        return 0
    for ln in reversed(files[0].read_text().splitlines()):
        try:
            return json.loads(ln)["step"]
        except ValueError:
            continue
    return 0


def _wait_for_step(proc: _Proc, root: Path, step: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.p.poll() is not None:
            pytest.fail(f"the run ended (rc={proc.p.returncode}) before it could be interrupted:\n{proc.output[-3000:]}")
        s = _last_step(root)
        if s >= step:
            return s
        time.sleep(0.01)
    pytest.fail(f"the run did not reach step {step} in {timeout}s:\n{proc.output[-3000:]}")


def _row(root: Path) -> dict:
    from sweeps.engine.records import ResultsDB

    (row,) = ResultsDB(root).rows()
    return row


class _Reference:
    """The uninterrupted run, started once per module in the background and shared."""

    def __init__(self, corpus: Path, root: Path):
        self.root = root
        self.proc = _Proc(_run_args(corpus, root), root.parent / "reference.log")
        self._done = False

    def get(self) -> Path:
        if not self._done:
            rc = self.proc.wait()
            assert rc == 0, self.proc.output[-3000:]
            self._done = True
        return self.root


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    ref = _Reference(corpus, tmp_path_factory.mktemp("reference") / "root")
    yield ref
    if ref.proc.p.poll() is None:
        ref.proc.p.kill()
        ref.proc.wait()


def _assert_same_as_reference(root: Path, ref_root: Path) -> None:
    row, ref = _row(root), _row(ref_root)
    assert row["status"] == "done" and row["error"] is None, row
    assert row["run_id"] == ref["run_id"]
    assert abs(row["eval_bpb"] - ref["eval_bpb"]) <= 1e-6, (row["eval_bpb"], ref["eval_bpb"])
    got, want = _metrics(root), _metrics(ref_root)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (a, b)
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (k, a, b)


def _resumed_from(output: str) -> int:
    m = re.findall(r"resumed from step (\d+)", output)
    assert len(m) == 1, output[-3000:]
    return int(m[0])


# --- preemption and kills: resume to the metrics of an uninterrupted run ---------------------------


def _sigterm(proc: _Proc, root: Path, at: int) -> int:
    """SIGTERM once the run has logged step `at`; checks the clean exit. Returns the saved step."""
    from sweeps.engine.records import ResultsDB

    _wait_for_step(proc, root, at)
    os.kill(proc.p.pid, signal.SIGTERM)
    rc = proc.wait()
    out = proc.output
    assert rc in (0, 143), out[-3000:]
    m = re.search(r"SIGTERM at step (\d+); checkpoint saved, re-run the same command to resume", out)
    assert m and "Traceback" not in out, out[-3000:]
    step = int(m.group(1))
    assert at <= step < STEPS
    (rdir,) = (root / "runs").iterdir()
    assert (rdir / "ckpt" / str(step)).is_dir()
    row = _row(root)
    assert row["status"] == "failed" and row["error"].startswith("preempted") and ResultsDB(root).is_resumable(row), row
    return step


def _sigkill(proc: _Proc, root: Path, at: int) -> int:
    seen = _wait_for_step(proc, root, at)
    os.killpg(proc.p.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert _row(root)["status"] == "running"  # as a killed process leaves it
    return seen


def _truncate_newest_checkpoint(root: Path) -> tuple[int, int]:
    (rdir,) = (root / "runs").iterdir()
    steps = sorted(int(p.name) for p in (rdir / "ckpt").iterdir() if p.name.isdigit())
    assert len(steps) >= 2, steps
    data = max((p for p in (rdir / "ckpt" / str(steps[-1])).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)
    return steps[-1], steps[-2]


def test_sigterm_then_kill9_then_truncated_checkpoint_resume_to_identical_metrics(corpus, reference, tmp_path):
    """The CI version of the three faults, chained on one run (three launches instead of six):
    SIGTERM (clean exit, checkpoint) -> resume -> SIGKILL -> newest checkpoint truncated ->
    resume from the one before it -> the metrics of the uninterrupted run, to 1e-6."""
    root = tmp_path / "root"
    saved = _sigterm(_Proc(_run_args(corpus, root), tmp_path / "1-terminated.log"), root, 12)

    proc = _Proc(_run_args(corpus, root), tmp_path / "2-killed.log")
    seen = _sigkill(proc, root, 40)
    assert _resumed_from(proc.output) == saved

    newest, previous = _truncate_newest_checkpoint(root)
    assert previous >= saved and newest <= seen + 1
    rc, out = _run(_run_args(corpus, root), tmp_path / "3-resumed.log")
    assert rc == 0, out[-3000:]
    assert f"warning: checkpoint at step {newest} is unreadable" in out, out[-3000:]
    assert _resumed_from(out) == previous
    assert "Traceback" not in out and "never retrieved" not in out
    _assert_same_as_reference(root, reference.get())


@pytest.mark.slow
def test_kill9_midrun_resumes_to_identical_metrics(corpus, reference, tmp_path):
    root = tmp_path / "root"
    seen = _sigkill(_Proc(_run_args(corpus, root), tmp_path / "killed.log"), root, 25)
    rc, out = _run(_run_args(corpus, root), tmp_path / "resumed.log")
    assert rc == 0, out[-3000:]
    start = _resumed_from(out)
    assert EVERY <= start <= seen + 1 and start % EVERY == 0, (start, seen)
    _assert_same_as_reference(root, reference.get())


@pytest.mark.slow
def test_sigterm_saves_exits_and_resumes_to_identical_metrics(corpus, reference, tmp_path):
    root = tmp_path / "root"
    step = _sigterm(_Proc(_run_args(corpus, root), tmp_path / "terminated.log"), root, 25)
    rc, out = _run(_run_args(corpus, root), tmp_path / "resumed.log")
    assert rc == 0, out[-3000:]
    assert _resumed_from(out) == step
    _assert_same_as_reference(root, reference.get())


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_skipped_end_to_end(corpus, reference, tmp_path):
    root = tmp_path / "root"
    _sigkill(_Proc(_run_args(corpus, root), tmp_path / "killed.log"), root, 25)
    newest, previous = _truncate_newest_checkpoint(root)
    rc, out = _run(_run_args(corpus, root), tmp_path / "resumed.log")
    assert rc == 0, out[-3000:]
    assert f"warning: checkpoint at step {newest} is unreadable" in out, out[-3000:]
    assert _resumed_from(out) == previous
    (rdir,) = (root / "runs").iterdir()
    assert any(p.name.startswith(f"{newest}-") for p in (rdir / "ckpt.unreadable").iterdir())
    _assert_same_as_reference(root, reference.get())


# --- checkpoints -------------------------------------------------------------------------------------


def _tiny_state(offset: float = 0.0):
    import jax.numpy as jnp

    params = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) + offset, "b": jnp.ones(7) + offset}
    opt = {"m": jnp.full((64, 64), offset, jnp.float32), "count": jnp.asarray(int(offset), jnp.int32)}
    return params, opt


def _abstract(tree):
    import jax

    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, capsys, damage):
    """Truncation Orbax notices itself; a flipped byte in array data it restores silently as
    garbage, which the integrity manifest catches."""
    import numpy as np

    from sweeps.engine.checkpoint import Checkpointer

    d = tmp_path / "ckpt"
    c = Checkpointer(d, 2, owner=True)
    c.save(10, *_tiny_state(1.0))
    c.save(20, *_tiny_state(2.0))
    c.close()
    assert sorted(int(p.stem) for p in (tmp_path / "ckpt.integrity").glob("*.json")) == [10, 20]
    data = max((p for p in (d / "20").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = data.stat().st_size
    if damage == "truncate":
        os.truncate(data, size // 2)
    else:
        with data.open("r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0x5A]))
    c = Checkpointer(d, 2, owner=True)
    step, params, opt = c.restore_latest(*map(_abstract, _tiny_state()))
    err = capsys.readouterr().err
    assert step == 10
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(_tiny_state(1.0)[0]["w"]))
    assert "warning: checkpoint at step 20 is unreadable" in err and "trying the previous one" in err
    assert "Traceback" not in err and "never retrieved" not in err
    assert c.committed_steps() == [10] and len(list((tmp_path / "ckpt.unreadable").iterdir())) == 1
    assert c.save(20, *_tiny_state(3.0))  # the resumed run can write that step again
    c.close()


_UNSEALED_SCRIPT = """
import os, sys, jax, jax.numpy as jnp
from pathlib import Path
from sweeps.engine.checkpoint import Checkpointer
d = Path(sys.argv[1])
keys = jax.random.split(jax.random.key(0), 8)  # incompressible data: the array files are the largest
params = {f"w{i}": jax.random.normal(keys[i], (256, 256)) for i in range(6)}
opt = {"mu": jax.random.normal(keys[7], (259, 256))}
c = Checkpointer(d, 2, owner=True)
c.save(1, params, opt); c.save(2, params, opt); c.close()
(d.parent / "ckpt.integrity" / "2.json").unlink()  # killed between Orbax's commit and our seal
data = max((p for p in (d / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
os.truncate(data, data.stat().st_size // 2)
c = Checkpointer(d, 2, owner=True)
abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
step, _, _ = c.restore_latest(abstract(params), abstract(opt))
x = jnp.ones((256, 256))
for _ in range(20):  # let in-flight reads and garbage collection finish before exit
    x = x @ x / 256
c.close()
print("restored", step)
"""


def test_unsealed_truncated_checkpoint_falls_back_without_tracebacks(tmp_path):
    """Without a manifest (a kill right after Orbax committed the step) only Orbax itself can
    notice the damage; its abandoned reads must not spray tracebacks over the run's log."""
    p = subprocess.run([sys.executable, "-c", _UNSEALED_SCRIPT, str(tmp_path / "ckpt")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "restored 1", p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint at step 2 is unreadable"), p.stderr[-3000:]


def test_interrupted_save_never_becomes_the_latest(tmp_path):
    """SIGKILL while Orbax writes step 2 (its temporary directory exists): step 1 stays the newest."""
    d = tmp_path / "ckpt"
    code = (
        "import sys, time, jax.numpy as jnp\n"
        "from sweeps.engine.checkpoint import Checkpointer\n"
        "c = Checkpointer(sys.argv[1], 2, owner=True)\n"
        "c.save(1, {'w': jnp.ones((8, 8))}, {'m': jnp.zeros(1)}); c.wait()\n"
        "big = {'w': jnp.ones((4096, 8192))}\n"  # 128 MB: the write takes a while
        "c.save(2, big, {'m': jnp.zeros(1)})\n"
        "time.sleep(600)\n"
    )
    proc = _Proc(["-c", code, str(d)], tmp_path / "saver.log")
    deadline = time.time() + 120
    tmp_dir = None
    while time.time() < deadline and tmp_dir is None:
        assert proc.p.poll() is None, proc.output[-3000:]
        tmp_dir = next((p for p in d.glob("2.orbax-checkpoint-tmp*")), None) if d.exists() else None
        time.sleep(0.002)
    assert tmp_dir is not None, "the save of step 2 never started"
    os.killpg(proc.p.pid, signal.SIGKILL)
    proc.wait()
    if (d / "2").exists():
        pytest.skip("the 128 MB save finished before the kill landed (machine too fast for this check)")
    from sweeps.engine.checkpoint import Checkpointer

    c = Checkpointer(d, 2, owner=True)
    assert c.committed_steps() == [1]
    step, params, _ = c.restore_latest(_abstract({"w": _ones((8, 8))}), _abstract({"m": _ones((1,))}))
    assert step == 1
    assert c.save(2, {"w": _ones((8, 8))}, {"m": _ones((1,))})  # the leftover does not block step 2
    c.close()
    assert c.committed_steps() == [2, 1] and not list(d.glob("*.orbax-checkpoint-tmp*"))


def _ones(shape):
    import jax.numpy as jnp

    return jnp.ones(shape)


# --- divergence and errors inside training ------------------------------------------------------


def _small_cfg(corpus: Path, root: Path, *extra: str):
    return compose([*RUN, "data=text", f"data.paths=[{corpus}]", "train.tokens=4096", f"root={root}", *extra])


def test_divergence_gives_a_failed_row_naming_the_step(corpus, tmp_path, capsys):
    from sweeps.cli import guarded
    from sweeps.engine.loop import train

    row = train(_small_cfg(corpus, tmp_path, "optim.lr=1e9"))
    assert row["status"] == "failed" and row["eval_bpb"] is None and row["pid"] is None
    assert re.fullmatch(r"non-finite (loss|gradient norm) at step \d+ \(.*\); try a lower optim.lr", row["error"]), row
    assert _row(tmp_path)["status"] == "failed"
    # As a single run (not a sweep point) it also exits non-zero with the error as one line.
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        guarded(lambda: {k: row[k] for k in ("run_id", "status", "eval_bpb", "flops", "error")})()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: run ") and "non-finite" in err


@pytest.mark.parametrize("where", ["build", "step"])
def test_exception_in_training_marks_the_row_failed_and_propagates(corpus, tmp_path, monkeypatch, where):
    from sweeps.engine import loop as T
    from sweeps.engine.records import ResultsDB

    calls = []

    def broken(self, *args, **kwargs):
        calls.append(where)
        raise RuntimeError("RESOURCE_EXHAUSTED: simulated XLA failure")

    monkeypatch.setattr(T.Trainer, "__init__" if where == "build" else "step", broken)
    with pytest.raises(RuntimeError, match="simulated XLA failure"):
        T.train(_small_cfg(corpus, tmp_path))
    row = _row(tmp_path)
    assert calls == [where]
    assert row["status"] == "failed" and row["pid"] is None
    assert row["error"] == "RuntimeError: RESOURCE_EXHAUSTED: simulated XLA failure"
    assert not ResultsDB(tmp_path).is_resumable(row)  # an error of its own: a sweep does not retry it by default


def test_sigterm_while_building_stops_before_the_first_step(corpus, tmp_path, monkeypatch):
    from sweeps.engine import loop as T
    from sweeps.engine.records import ResultsDB

    build = T.Trainer.__init__

    def build_then_sigterm(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the model is built and compiled
        build(self, *args, **kwargs)

    monkeypatch.setattr(T.Trainer, "__init__", build_then_sigterm)
    stepped = []
    monkeypatch.setattr(T.Trainer, "step", lambda *a: stepped.append(1))
    with pytest.raises(T.Preempted, match="SIGTERM before training started"):
        T.train(_small_cfg(corpus, tmp_path))
    assert not stepped
    row = _row(tmp_path)
    assert row["status"] == "failed" and row["error"].startswith("preempted") and ResultsDB(tmp_path).is_resumable(row)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


_HOLD_LOCK = (
    "import sys, time\n"
    "from sweeps.engine.liveness import RunLock\n"
    "assert RunLock(sys.argv[1], sys.argv[2]).acquire()\n"
    "print('holding', flush=True)\n"
    "time.sleep(120)\n"
)


def _lock_holder(root: Path, run_id: str) -> subprocess.Popen:
    """Another process that holds the run's lock (as a live trainer does)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(root), run_id], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def test_a_run_owned_by_a_live_process_is_not_trained_twice(corpus, tmp_path):
    from archs.errors import ConfigError
    from sweeps.engine.loop import train
    from sweeps.engine.plan import run_id_for
    from sweeps.engine.records import ResultsDB

    cfg = _small_cfg(corpus, tmp_path)
    rid = run_id_for(cfg)
    db = ResultsDB(tmp_path)
    claim, lock = db.claim(rid, {"arch": "ar"})
    assert claim == "claimed"
    lock.release()
    owner = _lock_holder(tmp_path, rid)
    try:
        assert db.mark_dead() == []  # its lock is held: alive, whatever its pid column says
        with pytest.raises(ConfigError, match="is being trained by another live process"):
            train(cfg)
        assert db.get(rid)["status"] == "running"
    finally:
        owner.kill()
        owner.wait()


# --- bad input: one line, non-zero, before anything compiles ------------------------------------


SMALL = ["sweep=none", "arch.size=xxs", "train.seq_len=32", "train.batch_size=4", "train.tokens=4096",
         "train.progress=false", "train.tensorboard=false"]


def _check_bad_inputs(tmp_path: Path, cases: dict) -> None:
    """Each case: a fresh `python -m sweeps.run` that must exit non-zero within seconds with a
    one-line `error: ...` matching its pattern, no traceback, nothing written."""
    procs = {}
    names = list(cases)
    for i in range(0, len(names), 4):  # a few at a time: each is an interpreter importing jax
        batch = {name: _Proc(["-m", "sweeps.run", *cases[name][0], f"root={tmp_path / name}"], tmp_path / f"{name}.log")
                 for name in names[i:i + 4]}
        for proc in batch.values():
            proc.wait(timeout=120)
        procs.update(batch)
    slow = {}
    for name, (args, pattern) in cases.items():
        proc = procs[name]
        out = proc.output
        assert proc.p.returncode not in (0, None), (name, out)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert "Traceback" not in out, (name, out)
        assert re.search(pattern, out), (name, pattern, out)
        assert proc.p.returncode == 2, (name, proc.p.returncode)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, out)
        # The results database is opened after validation and before the model is built: none
        # means nothing was built or compiled (test_bad_input_is_caught_before_any_compilation).
        assert not (tmp_path / name / "results.sqlite").exists(), name
        if proc.wall > 45:  # seconds on an idle machine; generous for a shared one
            slow[name] = round(proc.wall, 1)
    assert not slow, f"bad input took too long to report (s): {slow}"


def test_bad_inputs_fail_fast_with_one_line(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("print('hello')\n" * 30)  # 450 bytes: a 10-token held-out tail
    _check_bad_inputs(tmp_path, {
        "unknown_arch": (["+arch=nope", *SMALL], r"unknown architecture 'nope'.*\+arch=NAME.*\bar\b.*diffusion"),
        "no_arch": ([], r"no architecture chosen: pass \+arch=NAME with NAME one of ar, "),
        "heads": (["+arch=ar", *SMALL, "arch.n_heads=5"], r"arch.n_heads=5 does not divide arch.d_model=64"),
        "missing_path": (["+arch=ar", *SMALL, "data=text", "data.paths=[/nope/corpus]"],
                         r"data path '/nope/corpus' does not exist; fix data.paths"),
        "tiny_corpus": (["+arch=ar", *SMALL, "data=text", f"data.paths=[{tiny}]"],
                        r"train.seq_len=32 is longer than the held-out split \(\d+ tokens\)"),
        "tiny_budget": (["+arch=ar", *SMALL, "train.tokens=10"], r"train.tokens=10 is smaller than one step"),
        "mesh": (["+arch=ar", *SMALL, "mesh.fsdp=3"], r"mesh.fsdp x mesh.tensor x mesh.expert = 3 does not divide the 1 available"),
    })


def test_bad_input_is_caught_before_any_compilation(tmp_path):
    """In-process, with a listener on JAX's compilation events: train() rejects each bad input
    without compiling (or fetching from the compilation cache) anything."""
    import jax

    from archs.errors import ConfigError
    from sweeps.engine.loop import train

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("print('hello')\n" * 30)
    events = []

    def listener(event, duration, **kw):
        # Tracing shapes (the abstract model build that checks a config) is not compiling; lowering,
        # backend compilation and compilation-cache reads are.
        if "compil" in event and "jaxpr_trace" not in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for extra in (["arch.n_heads=5"], ["data=text", "data.paths=[/nope/corpus]"],
                      ["data=text", f"data.paths=[{tiny}]"], ["train.tokens=10"], ["mesh.fsdp=3"],
                      ["train.seq_len=100000000", "train.tokens=1000000000000"]):  # > the stdlib held-out split
            with pytest.raises(ConfigError):
                train(compose(["+arch=ar", *SMALL, f"root={tmp_path / 'root'}", *extra]))
        assert not events, events
        jax.jit(lambda x: x + 1)(jax.numpy.ones(3))  # the listener does see compilations
        assert events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not (tmp_path / "root" / "results.sqlite").exists()


@pytest.mark.slow
def test_more_bad_inputs_fail_fast_with_one_line(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    _check_bad_inputs(tmp_path, {
        "no_arch_with_arch_keys": (SMALL, r"no architecture chosen: pass \+arch=NAME"),
        "empty_file": (["+arch=ar", *SMALL, "data=text", f"data.paths=[{empty}]"],
                       rf"{re.escape(str(empty))}.*hold no bytes"),
        "huge_window": (["+arch=ar", *SMALL, "data=text", f"data.paths=[{corpus}]", "train.seq_len=100000",
                         "train.tokens=1000000000"], r"train.seq_len=100000 is longer than the held-out split"),
        "hydra_typo": (["+arch=ar", *SMALL, "train.nope=1"], r"nope"),
        "bad_lr": (["+arch=ar", *SMALL, "optim.lr=-1"], r"optim.lr=-1.0 must be a positive number"),
        "log_every": (["+arch=ar", *SMALL, "train.log_every=0"], r"train.log_every=0 must be >= 1"),
    })


# --- the results database under concurrency -----------------------------------------------------


def _db_worker(root: str, worker: int, shared: int, own: int, out) -> None:
    """Claim and finish shared runs (racing the other workers) and write rows of its own."""
    from sweeps.engine.records import EvalRecord, ResultsDB

    db = ResultsDB(root)
    ids = [f"shared-{i:03d}" for i in range(shared)] + [f"w{worker}-{i:03d}" for i in range(own)]
    random.Random(worker).shuffle(ids)
    claimed = []
    for rid in ids:
        res, lock = db.claim(rid, {"arch": "ar", "params": 1, "tokens": 2, "flops": 3.0, "config": {"worker": worker}})
        if res != "claimed":
            continue
        claimed.append(rid)
        for step in (1, 2, 3):
            db.add_eval(EvalRecord(rid, step, step * 10, step * 100.0, 5.0 - step, 4.0))
        db.update(rid, status="done", eval_bpb=1.5, error=None, pid=None, wall_s=0.1)
        lock.release()
    out.put((worker, claimed))


def test_concurrent_writers_never_lose_or_duplicate_rows(tmp_path):
    from sweeps.engine.records import ResultsDB

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n_workers, shared, own = 4, 40, 25
    workers = [ctx.Process(target=_db_worker, args=(str(tmp_path), w, shared, own, q)) for w in range(n_workers)]
    for w in workers:
        w.start()
    results = dict(q.get(timeout=300) for _ in workers)
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    claimed = [rid for ids in results.values() for rid in ids]
    assert len(claimed) == len(set(claimed)), "a run was claimed by two live workers"
    expected = {f"shared-{i:03d}" for i in range(shared)} | {f"w{w}-{i:03d}" for w in range(n_workers) for i in range(own)}
    assert set(claimed) == expected
    rows = ResultsDB(tmp_path).rows()
    assert sorted(r["run_id"] for r in rows) == sorted(expected)
    assert all(r["status"] == "done" and r["eval_bpb"] == 1.5 and r["pid"] is None for r in rows)
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT run_id || '/' || step) FROM evals").fetchone() == (
        3 * len(expected), 3 * len(expected))
    con.close()


def _hold_write_lock(root: str, ready) -> None:
    """Claim a run, then open a write transaction, write into it and hang there (to be killed)."""
    from sweeps.engine.records import ResultsDB

    db = ResultsDB(root)
    db.claim("killed-run", {"arch": "ar"})  # the lock dies with this process
    con = db._connect()
    con.execute("BEGIN IMMEDIATE")
    for i in range(500):
        con.execute("INSERT INTO evals (run_id, step, eval_bpb) VALUES (?, ?, ?)", ("killed-run", i, 1.0))
    con.execute("UPDATE runs SET eval_bpb = 123 WHERE run_id = 'killed-run'")
    ready.set()
    time.sleep(600)


def test_writer_killed_mid_transaction_leaves_db_consistent_and_unlocked(tmp_path):
    from sweeps.engine.records import ResultsDB

    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_write_lock, args=(str(tmp_path), ready))
    p.start()
    assert ready.wait(120)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    db = ResultsDB(tmp_path)
    t = time.time()
    _, lock = db.claim("next-run", {"arch": "ar"})  # the database lock died with its process
    db.update("next-run", status="done", pid=None)
    lock.release()
    assert time.time() - t < 5
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM evals").fetchone()[0] == 0  # the open transaction rolled back
    con.close()
    row = db.get("killed-run")
    assert row["status"] == "running" and row["eval_bpb"] is None and db.is_resumable(row)
    assert db.mark_dead() == ["killed-run"]
    row = db.get("killed-run")
    assert row["status"] == "failed" and row["error"].startswith("interrupted") and db.is_resumable(row)
    assert db.get("next-run")["status"] == "done"


def test_liveness_is_the_lock_not_the_pid(tmp_path):
    """A row is alive exactly while its run holds its lock: a killed owner (even a zombie that
    nobody has reaped yet) is dead at once, and a pid that happens to be alive means nothing."""
    from sweeps.engine.records import ResultsDB

    db = ResultsDB(tmp_path)
    _, lock = db.claim("r1", {"arch": "ar"})
    lock.release()
    assert db.mark_dead() == ["r1"]  # released without finishing: the process went away
    _, lock = db.claim("r2", {"arch": "ar"})
    lock.release()
    p = _lock_holder(tmp_path, "r2")  # another process trains it now
    try:
        row = db.get("r2")
        assert db.is_alive("r2") and not db.is_resumable(row) and db.mark_dead() == []
        db.update("r2", status="running", pid=os.getpid())  # a live pid in the row is not what counts
        p.kill()
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie: killed, not yet reaped
        assert not db.is_alive("r2") and db.is_resumable(db.get("r2"))
        assert db.mark_dead() == ["r2"] and db.get("r2")["error"].startswith("interrupted")
    finally:
        p.kill()
        p.wait()


# --- a sweep with one diverging learning rate still fits the rest -------------------------------


@pytest.mark.slow
def test_sweep_with_diverging_points_fits_the_rest(tmp_path):
    """An IsoFLOP sweep over two learning rates, one of which diverges at every point: the
    diverged runs are `failed` rows naming the step, the sweep goes on and exits 0, and the
    compute law is fitted to the finished runs only."""
    rc, out = _run(["-m", "sweeps.run", "+arch=ar", "sweep=smoke", "sweep.budgets=[6.0e9,1.2e10,2.4e10]",
                    "sweep.sizes=[50k]", "sweep.min_steps=5", "sweep.bootstrap=20", "optim.lr=3.0e-3,1.0e9",
                    f"root={tmp_path}"], tmp_path / "sweep.log")
    assert rc == 0, out[-4000:]
    from sweeps.engine.records import ResultsDB

    rows = ResultsDB(tmp_path).rows()
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(done) == 3 and len(failed) == 3, [(r["run_id"], r["status"], r["error"]) for r in rows]
    assert all(r["lr"] < 1 for r in done) and all(r["lr"] > 1 for r in failed)
    assert all(re.match(r"non-finite (loss|gradient norm) at step \d+", r["error"]) and r["eval_bpb"] is None
               for r in failed)
    fits = json.loads((tmp_path / "report" / "fits.json").read_text())
    (entry,) = fits.values()
    # Three budgets for a three-parameter law: fitted, and flagged as saturated (no degrees of freedom).
    assert entry["status"] == "saturated" and entry["n_runs"] == 3 and entry["n_failed"] == 3, entry
    assert all(k in entry and entry[k] is not None for k in ("E", "A", "alpha")), entry
