"""The commands as a hostile user drives them: interrupts keep their progress, every bad input is
one line and exit 2 with nothing written or changed, and every path means what the user typed.

Each case is a real `python -m sweeps.X` process started from a scratch working directory; the
checks are its exit status, its output (one line), and that the working directory and every
file that existed before are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

TINY = ["sweep=none", "arch.size=xxs", "train.seq_len=32", "train.batch_size=4", "train.tokens=4096",
        "train.eval_windows=4", "train.eval_batch=4", "train.progress=false", "train.tensorboard=false"]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("LAB_COMPILE_CACHE", str(Path.home() / ".cache" / "difflab" / "xla"))
    return env


def _snapshot(*dirs: Path) -> dict[str, str]:
    """Every file under the given directories with its sha256 (what must not change)."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")) if d.exists() else ():
            if p.is_file() and not p.is_fifo():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir() or p.is_fifo():
                out[str(p)] = "dir" if p.is_dir() else "fifo"
    return out


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _refused(cases: dict, tmp_path: Path) -> None:
    """Each case (args, pattern, extra dirs that must not change) exits 2 with one line matching
    its pattern, writes nothing into its working directory and changes no existing file."""
    started = {}
    names = list(cases)
    results = {}
    for i in range(0, len(names), 4):  # a few at a time: each is an interpreter importing JAX
        for name in names[i:i + 4]:
            cwd = tmp_path / f"cwd-{name}"
            cwd.mkdir()
            args, _, keep = cases[name]
            started[name] = (_start(args, cwd), cwd, _snapshot(cwd, *keep), time.time())
        for name in names[i:i + 4]:
            proc, cwd, before, t0 = started[name]
            out, _ = proc.communicate(timeout=180)
            results[name] = (proc.returncode, out, cwd, before, time.time() - t0)
    for name, (rc, out, cwd, before, wall) in results.items():
        _, pattern, keep = cases[name]
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, rc, out)
        assert re.search(pattern, lines[0]), (name, pattern, lines[0])
        assert _snapshot(cwd, *keep) == before, (name, "files changed")
        assert wall < 60, (name, wall)


def test_config_errors_are_one_line_before_anything_is_written(tmp_path):
    run = ["-m", "sweeps.run", "+arch=ar", *TINY]
    _refused({
        "typo": ([*run, "trian.tokens=1000"], r"unknown key 'trian\.tokens'.*did you mean train\.tokens", ()),
        "plus_typo": ([*run, "+trian.tokens=1000"], r"unknown key 'trian\.tokens'", ()),
        "bad_float": ([*run, "optim.lr=abc"], r"^error: optim\.lr: .*'abc'.*give a number", ()),
        "float_for_int": ([*run, "train.tokens=3e6"], r"train\.tokens: .*whole number", ()),
        "unknown_option": ([*run, "sweep=nosuch"], r"unknown sweep option 'nosuch'.*smoke", ()),
        "bad_fraction": ([*run, "data.heldout_fraction=1.5"], r"data\.heldout_fraction=1\.5 must lie in \(0, 1\)", ()),
        "unknown_launcher": ([*run, "hydra/launcher=nosuch"], r"hydra/launcher/nosuch.*joblib", ()),
        "sweep_value": (["-m", "sweeps.run", "+arch=ar", "sweep=smoke", "optim.lr=1e-3,abc", "root=r"],
                        r"optim\.lr: .*'abc'", ()),
        "sample_typo": (["-m", "sweeps.sample", "stpes=4"], r"unknown key 'stpes'.*did you mean steps", ()),
    }, tmp_path)


def test_bad_inputs_and_outputs_are_refused_and_left_untouched(tmp_path):
    run = ["-m", "sweeps.run", "+arch=ar", *TINY]
    afile = tmp_path / "a_file"
    afile.write_text("precious\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.sqlite").write_bytes(b"this is not a database" * 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.mkdir()
    with (big / "huge.txt").open("wb") as f:  # sparse: 1 TB of text on paper, nothing on disk
        f.truncate(1 << 40)
    _refused({
        "root_unwritable": ([*run, "root=/proc/nope"], r"root=/proc/nope cannot be created", ()),
        "root_is_file": ([*run, f"root={afile}"], r"is an existing file, not a directory", (tmp_path / "a_file",)),
        "corrupt_db": ([*run, f"root={corrupt}"], r"results\.sqlite is not a readable results database.*untouched",
                       (corrupt,)),
        "fifo": ([*run, "data=text", f"data.paths=[{fifo}]"], r"is a FIFO", ()),
        "device": ([*run, "data=text", "data.paths=[/dev/zero]"], r"'/dev/zero' is a device", ()),
        "too_big_for_memory": ([*run, "data=text", f"data.paths=[{big}]"], r"GiB of text.*sweeps\.prepare", ()),
        "impossible_size": (["-m", "sweeps.run", "+arch=ar", "sweep=none", "arch.size=100B"],
                            r"arch\.size=100B .*needs at least .*GiB.*smaller arch\.size", ()),
    }, tmp_path)


def test_configs_that_cannot_build_are_refused_before_a_row_exists(tmp_path):
    root = tmp_path / "root"
    _refused({
        # the Mamba-2 layer refuses B/C groups that do not divide its heads: found by the abstract build
        "single": (["-m", "sweeps.run", "+arch=mamba2", *TINY, "arch.mamba_groups=3", f"root={root}"],
                   r"arch\.mamba_groups=3 must divide", ()),
        "sweep": (["-m", "sweeps.run", "+arch=mamba2", "sweep=smoke", "arch.mamba_groups=3", f"root={root}"],
                  r"arch\.mamba_groups=3 must divide", ()),
    }, tmp_path)
    assert not root.exists()


def test_a_run_id_of_another_config_is_refused(tmp_path):
    from sweeps.engine.records import ResultsDB

    root = tmp_path / "root"
    db = ResultsDB(root)
    _, lock = db.claim("taken", {"arch": "ar", "config_hash": "0" * 64, "tokens": 123})
    db.update("taken", status="done", eval_bpb=1.0)
    lock.release()
    _refused({
        "other_config": (["-m", "sweeps.run", "+arch=ar", *TINY, "run_id=taken", f"root={root}"],
                         r"run_id=taken belongs to a run of another config", (root,)),
    }, tmp_path)
    assert db.get("taken")["tokens"] == 123


def test_paths_resolve_against_the_directory_the_command_started_from(tmp_path):
    """`<repo>/lab python -m sweeps.run ... data.paths=[mydata.txt] root=relroot` from elsewhere: the
    data file is the caller's, the outputs land in the caller's directory, nothing in the checkout."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    text = b"".join(p.read_bytes() for p in sorted((ROOT / "archs").glob("*.py")))
    (cwd / "mydata.txt").write_bytes(text * 3)
    repo_before = set(os.listdir(ROOT))
    proc = subprocess.run([str(ROOT / "lab"), "python", "-m", "sweeps.run", "+arch=ar", *TINY, "data=text",
                           "data.paths=[mydata.txt]", "root=relroot"], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cwd / "relroot" / "results.sqlite").is_file()
    assert set(os.listdir(ROOT)) == repo_before
    assert sorted(os.listdir(cwd)) == ["mydata.txt", "relroot"]  # and no Hydra directory
    con = sqlite3.connect(cwd / "relroot" / "results.sqlite")
    (status, corpus), = con.execute("SELECT status, corpus FROM runs").fetchall()
    assert status == "done" and corpus == "text:mydata.txt"


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    """The first Ctrl-C saves at the next step boundary and exits 130 with one line; the same
    command resumes from that step and finishes with the metrics of an uninterrupted run."""
    text = b"".join(p.read_bytes() for p in sorted((ROOT / "sweeps").rglob("*.py")))
    data = tmp_path / "data.txt"
    data.write_bytes(text)
    args = ["-m", "sweeps.run", "+arch=ar", *TINY, "train.tokens=8192", "train.log_every=1",
            "train.checkpoint_every_s=3600", "data=text", f"data.paths=[{data}]"]
    ref = subprocess.run([sys.executable, *args, f"root={tmp_path / 'ref'}"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, *args, f"root={root}"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list((root / "runs").glob("*/metrics.jsonl")) if (root / "runs").exists() else []
        if logs and len(logs[0].read_text().splitlines()) >= 5:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and re.search(r"interrupted at step (\d+); checkpoint saved, re-run the same command to "
                                         r"resume", lines[0]), err
    step = int(re.search(r"at step (\d+)", lines[0]).group(1))
    (rdir,) = (root / "runs").iterdir()
    assert (rdir / "ckpt" / str(step)).is_dir() and (rdir / "ckpt.integrity" / f"{step}.json").is_file()
    again = subprocess.run([sys.executable, *args, f"root={root}"], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and f"resumed from step {step}" in again.stderr, again.stderr[-3000:]

    def metrics(r):
        (path,) = (r / "runs").glob("*/metrics.jsonl")
        return [json.loads(ln) for ln in path.read_text().splitlines()]

    got, want = metrics(root), metrics(tmp_path / "ref")
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), (k, a, b)


def test_lab_refuses_a_python_too_old_in_one_line(tmp_path):
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\necho 'Python 3.9.18'\nexit 1\n")  # any version check fails: too old
    old.chmod(0o755)
    proc = subprocess.run([str(ROOT / "lab"), "true"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**_env(), "PYTHON": str(old), "LAB_VENV": str(tmp_path / "venv")})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "needs Python >= 3.11" in lines[0], proc.stderr
    assert not (tmp_path / "venv").exists()
