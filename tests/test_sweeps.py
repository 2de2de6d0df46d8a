"""The scaling-law sweep engine: IsoFLOP grids, the Hydra sweeper, resumption, the report, grouping."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest

from conftest import CONF, compose, run_cli

FIGURES = ("loss_vs_compute", "isoflop", "optimal_allocation", "residuals")


# --- the grid (no Hydra, no training) ---------------------------------------------------------------


def test_isoflop_grid_pairs_sizes_with_tokens_at_each_budget():
    from archs.config import ModelConfig
    from archs.flops import flops_per_token
    from archs.sizes import resolve
    from sweeps.grid.isoflop import isoflop_grid

    budgets, sizes = [3e11, 1e11, 1e12], ["50k", "xxs", "200k", "xs"]
    points, dropped = isoflop_grid(ModelConfig(size="s"), budgets, sizes, seq_len=64, batch_size=8, min_steps=40)
    # pairs, not a product: every (budget, size) at most once, and the tokens follow the size
    assert len(points) + len(dropped) == len(budgets) * len(sizes)
    assert len({(p.budget, p.size) for p in points}) == len(points)
    assert len({p.tokens for p in points}) == len(points)
    assert [p.budget for p in points] == sorted(p.budget for p in points)
    for p in points:
        fpt = flops_per_token(resolve(ModelConfig(size=p.size)), 64)
        assert p.flops_per_token == pytest.approx(fpt)
        assert p.tokens == p.steps * 8 * 64 and p.steps >= 40
        assert abs(fpt * p.tokens / p.budget - 1) <= 0.5 / p.steps + 1e-12  # within rounding to a step
        assert abs(p.rel_error) < 0.03
    for b in set(budgets):  # at one budget, bigger models get fewer tokens
        at = sorted((p for p in points if p.budget == b), key=lambda p: p.flops_per_token)
        assert [p.tokens for p in at] == sorted((p.tokens for p in at), reverse=True)
    # the only drop: xs (5.4 MFLOP/token, 2.8 GFLOP/step) gets 36 < 40 steps out of 1e11 FLOPs
    assert [(d.budget, d.size, d.steps) for d in dropped] == [(1e11, "xs", 36)]
    # a tokens-per-parameter window (N = flops_per_token / 6) keeps the sizes near the optimum
    kept, far = isoflop_grid(ModelConfig(size="s"), budgets, sizes, seq_len=64, batch_size=8,
                             min_tokens_per_param=2, max_tokens_per_param=20)
    assert kept and far and len(kept) + len(far) == len(budgets) * len(sizes)
    for p in kept:
        assert 2 <= 6 * p.tokens / p.flops_per_token <= 20
    assert all("tokens/param" in d.reason for d in far)


def test_grid_points_become_hydra_overrides_that_train_plans_at_the_budget():
    """The overrides a point hands to its Hydra job compose, and the engine's own plan of that job
    spends the budget (same FLOP count, same step rounding)."""
    from sweeps.grid.isoflop import expand_grid, isoflop_grid, with_extra
    from sweeps.engine.plan import plan_run

    base = compose(["+arch=hybrid", "sweep=smoke"])
    points, _ = isoflop_grid(base.arch, [2e10, 6e10], ["50k", "xxs", "3e5"],
                             seq_len=base.train.seq_len, batch_size=base.train.batch_size, min_steps=5)
    points = with_extra(points, expand_grid({"optim.lr": [1e-3, 0.004], "arch.pattern": ["GGGA"]}))
    assert len(points) == 2 * 3 * 2
    for p in points[::5]:
        cfg = compose(["+arch=hybrid", "sweep=smoke", *p.overrides()])
        assert cfg.arch.size == p.size and cfg.train.tokens == p.tokens and cfg.budget == p.budget
        assert cfg.optim.lr in (1e-3, 0.004)
        plan = plan_run(cfg, 1)
        assert plan.tokens == p.tokens and plan.flops == pytest.approx(p.flops)
        assert abs(plan.flops / p.budget - 1) < 0.05


def test_grid_refuses_bad_input():
    from archs.config import ModelConfig
    from archs.errors import ConfigError
    from sweeps.grid.isoflop import expand_grid, isoflop_grid

    with pytest.raises(ConfigError, match="budgets is empty"):
        isoflop_grid(ModelConfig(), [], ["xxs"], seq_len=64, batch_size=8)
    with pytest.raises(ConfigError, match="positive"):
        isoflop_grid(ModelConfig(), [-1], ["xxs"], seq_len=64, batch_size=8)
    with pytest.raises(ConfigError, match="same model"):
        isoflop_grid(ModelConfig(d_model=64, n_layers=2), [1e10], ["xxs", "xs"], seq_len=64, batch_size=8)
    with pytest.raises(ConfigError, match="derives it"):
        expand_grid({"train.tokens": [1, 2]})


def test_sweep_configs_switch_hydra_modes():
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from sweeps.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        def c(*o):
            return hydra_compose(config_name="config", overrides=["+arch=ar", *o], return_hydra_config=True)

        assert c("sweep=none").hydra.mode == RunMode.RUN
        for name in ("default", "smoke", "paper", "lr_scan"):
            cfg = c(f"sweep={name}")
            assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweeper._target_.endswith("IsoFLOPSweeper")
            assert cfg.sweep.name == name and cfg.sweep.budgets and cfg.sweep.sizes
        d = c()
        assert d.sweep.name == "default" and len(d.sweep.budgets) >= 3 and len(d.sweep.sizes) >= 3
        assert len(c("sweep=lr_scan").sweep.grid["optim.lr"]) >= 3
        assert c("sweep=smoke", "hydra/launcher=parallel").hydra.launcher._target_.endswith("JoblibLauncher")
        assert c("sweep=smoke", "hydra/launcher=slurm").hydra.launcher._target_.endswith("SlurmLauncher")


# --- the real command, once per module ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """`python -m sweeps.run +arch=ar sweep=smoke root=...` (6 runs, then the report)."""
    root = tmp_path_factory.mktemp("smoke")
    proc = run_cli(["-m", "sweeps.run", "+arch=ar", "sweep.cooldowns=true", "sweep=smoke", f"root={root}"],
                   timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _rows(root):
    con = sqlite3.connect(root / "results.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return {r["run_id"]: dict(r) for r in con.execute("SELECT * FROM runs")}
    finally:
        con.close()


def test_smoke_sweep_records_every_point(smoke_root):
    """`sweep.cooldowns=true sweep=smoke`: a branch row for every grid point (with its trunk and the
    compute it added) and one trunk per size, which spans the largest branch's fork."""
    from sweeps.grid.isoflop import isoflop_grid

    rows = _rows(smoke_root)
    cfg = compose(["+arch=ar", "sweep=smoke"])
    points, _ = isoflop_grid(cfg.arch, list(cfg.sweep.budgets), list(cfg.sweep.sizes),
                             seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                             min_steps=cfg.sweep.min_steps)
    branches = [r for r in rows.values() if r["role"] == "branch"]
    trunks = {r["run_id"]: r for r in rows.values() if r["role"] == "trunk"}
    assert len(points) >= 4 and len(branches) == len(points) and len(trunks) == len(cfg.sweep.sizes)
    assert {(p.budget, p.size, p.tokens) for p in points} == {(r["budget"], r["size"], r["tokens"]) for r in branches}
    for r in rows.values():
        assert r["status"] == "done" and r["sweep"] == "smoke" and r["arch"] == "ar" and math.isfinite(r["eval_bpb"])
    for r in branches:
        assert abs(r["flops"] / r["budget"] - 1) < 0.05 and json.loads(r["config"])["budget"] == r["budget"]
        trunk = trunks[r["trunk_id"]]
        assert trunk["size"] == r["size"] and trunk["budget"] is None and trunk["trunk_id"] is None
        decay = json.loads(r["config"])["optim"]["decay_steps"]
        assert decay == max(1, round(0.2 * r["steps"])) and r["steps"] - decay <= trunk["steps"]
        assert r["compute_spent"] == pytest.approx(r["flops"] * decay / r["steps"])
    for t in trunks.values():
        assert t["compute_spent"] == t["flops"]
        assert t["steps"] == max(r["steps"] - json.loads(r["config"])["optim"]["decay_steps"]
                                 for r in branches if r["trunk_id"] == t["run_id"])


def test_smoke_sweep_writes_the_report(smoke_root):
    out = smoke_root / "report"
    fits = json.loads((out / "fits.json").read_text())
    e = fits["ar"]
    assert {"E", "A", "alpha", "ci", "n_runs"} <= set(e)
    # 3 budgets for the law's 3 parameters: never "ok", and the report says why
    assert e["status"] in ("saturated", "degenerate") and e["flags"], e
    assert 0.5 < e["compute_saved"] < 1  # the cooldown branches' trunks are paid once
    assert e["n_runs"] == 6 and e["n_failed"] == 0 and e["n_budgets"] == 3
    assert all(len(e["ci"][k]) == 2 for k in ("E", "A", "alpha")) and e["n_bootstrap_requested"] >= 1000
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    assert "Fitted compute laws" in (out / "tables.md").read_text()
    assert r"\begin{tabular}" in (out / "tables.tex").read_text()


def test_rerunning_the_sweep_trains_nothing(smoke_root):
    before = _rows(smoke_root)
    logs = {p: p.stat().st_mtime_ns for p in (smoke_root / "runs").glob("*/metrics.jsonl")}
    proc = run_cli(["-m", "sweeps.run", "+arch=ar", "sweep=smoke", "sweep.cooldowns=true", f"root={smoke_root}",
                    "sweep.report=false"],
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(before)} already recorded" in proc.stderr and "0 to train" in proc.stderr
    after = _rows(smoke_root)
    assert {k: (v["updated_at"], v["wall_s"], v["status"]) for k, v in after.items()} == \
           {k: (v["updated_at"], v["wall_s"], v["status"]) for k, v in before.items()}
    assert {p: p.stat().st_mtime_ns for p in (smoke_root / "runs").glob("*/metrics.jsonl")} == logs


def test_report_command_refits_the_database(smoke_root):
    """`python -m sweeps.report root=DIR group_by=...`: no training, a fit per group (by size here)."""
    n_before = len(_rows(smoke_root))
    proc = run_cli(["-m", "sweeps.report", f"root={smoke_root}", "group_by=[arch,size]", "bootstrap=200"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_rows(smoke_root)) == n_before
    fits = json.loads((smoke_root / "report" / "fits.json").read_text())
    assert set(fits) == {"arch=ar,size=50k", "arch=ar,size=xxs"}
    for e in fits.values():
        assert e["n_runs"] == 3 and e["status"] in ("saturated", "degenerate") and e["E"] is not None
    bad = run_cli(["-m", "sweeps.report", f"root={smoke_root / 'nowhere'}"], timeout=300)
    assert bad.returncode == 2 and "no results database" in bad.stderr


def test_sweep_refuses_grid_keys_on_the_command_line(tmp_path):
    proc = run_cli(["-m", "sweeps.run", "+arch=ar", "sweep=smoke", f"root={tmp_path}", "train.tokens=1000"],
                   timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: train.tokens is set per run")
    assert not (tmp_path / "runs").exists()


def test_extra_axes_get_their_own_isoflop_grid(tmp_path):
    """A comma list on the command line is one more grid axis; an axis that changes the FLOPs per
    token (the layer pattern) changes every point's tokens so that each still spends its budget."""
    import re

    proc = run_cli(["-m", "sweeps.run", "+arch=hybrid", "sweep=smoke", f"root={tmp_path}", "sweep.dry_run=true",
                    "arch.pattern=GGGA,AAAA"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [ln for ln in proc.stderr.splitlines() if "would train" in ln]
    tokens = {}
    for ln in jobs:
        size = re.search(r"arch\.size=(\S+)", ln).group(1)
        budget = float(re.search(r"budget=(\S+)", ln).group(1))
        pattern = re.search(r"arch\.pattern=(\S+)", ln).group(1)
        tokens[(pattern, size, budget)] = int(re.search(r"train\.tokens=(\d+)", ln).group(1))
    assert {k[0] for k in tokens} == {"GGGA", "AAAA"} and len(jobs) >= 10
    assert tokens[("GGGA", "50k", 2.4e10)] != tokens[("AAAA", "50k", 2.4e10)]
    assert not (tmp_path / "runs").exists()  # a dry run trains nothing



def test_the_arch_can_be_a_sweep_axis(tmp_path):
    """`+arch=ar,gdn` sweeps the arch itself: the sweep's settings come from its first value (the
    master config has no arch), and every arch gets every point; a sweep without budgets
    (sweep=mqar) crosses its sweep.grid with the axis."""
    import re

    proc = run_cli(["-m", "sweeps.run", "sweep=mqar", "+arch=ar,gdn", f"root={tmp_path}", "sweep.dry_run=true"],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [ln for ln in proc.stderr.splitlines() if "would train" in ln]
    points = {(re.search(r"would train (\w+?)-", ln).group(1), re.search(r"arch\.d_model=(\d+)", ln).group(1),
               re.search(r"data\.mqar\.pairs=(\d+)", ln).group(1)) for ln in jobs}
    assert points == {(a, d, p) for a in ("ar", "gdn") for d in ("32", "64") for p in ("4", "8")}, jobs
    assert len(jobs) == 8 and not (tmp_path / "runs").exists()

# --- the report on a database with known laws ----------------------------------------------------------

BUDGETS = [1e15, 1e16, 1e17, 1e18, 1e19]
E0, A0, ALPHA0 = 1.8, 300.0, 0.15


def _write_law(db, arch, pattern, shift, budgets=BUDGETS, sweep="default"):
    """Three sizes per budget around N* = 0.1 C^0.5 on a parabola in log N whose minimum follows
    L(C) = E0 + A0 (C / shift)^-ALPHA0: the group needs `shift` times the compute of shift=1."""
    for c in budgets:
        l_opt = E0 + A0 * (c / shift) ** -ALPHA0
        n_opt = 0.1 * c**0.5
        for i, n in enumerate((n_opt / 4, n_opt, n_opt * 4)):
            rid = f"{arch}-{pattern}-{c:.0e}-{i}"
            fields = {"arch": arch, "params": int(n), "nonembed_params": int(0.8 * n), "tokens": int(c / (6 * n)),
                      "flops": c * (1 + 0.01 * (i - 1)), "budget": c, "sweep": sweep, "pattern": pattern,
                      "size": f"s{i}", "config": {"arch": {"name": arch, "pattern": pattern}, "optim": {"lr": 3e-3}}}
            _, lock = db.claim(rid, fields)
            db.update(rid, status="done", eval_bpb=l_opt + 0.05 * math.log(n / n_opt) ** 2, pid=None)
            lock.release()


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from sweeps.engine.records import ResultsDB

    root = tmp_path_factory.mktemp("synthetic")
    db = ResultsDB(root)
    _write_law(db, "ar", "A", 1.0)
    _write_law(db, "diffusion", "A", 16.0)
    _write_law(db, "hybrid", "GGGA", 0.5)
    _write_law(db, "hybrid", "GGGGGGGA", 0.8)
    _write_law(db, "gdn", "G", 1.0, budgets=BUDGETS[:2])
    _, lock = db.claim("ar-diverged", {"arch": "ar", "params": 1000, "tokens": 10, "flops": 1e16, "budget": 1e16,
                                       "sweep": "default", "config": {"arch": {"name": "ar", "pattern": "A"}}})
    db.update("ar-diverged", status="failed", error="non-finite loss at step 3", pid=None)
    lock.release()
    return root


def test_report_recovers_known_laws_and_the_compute_multiplier(synthetic_root):
    from sweeps.analysis.report import make_report
    from sweeps.config import ReportConfig

    out = make_report(ReportConfig(root=str(synthetic_root), bootstrap=1000, figures=False))
    fits = json.loads((out / "fits.json").read_text())
    assert set(fits) == {"ar", "diffusion", "hybrid", "gdn"}
    ar, dif = fits["ar"], fits["diffusion"]
    for e in (ar, dif):
        assert e["status"] == "ok"
        assert e["E"] == pytest.approx(E0, rel=1e-3) and e["alpha"] == pytest.approx(ALPHA0, rel=1e-3)
        assert e["ci"]["alpha"][0] <= e["alpha"] <= e["ci"]["alpha"][1]
        assert e["n_bootstrap"] >= 900
    # failed runs are excluded from the fit and listed
    assert ar["n_runs"] == 15 and ar["n_failed"] == 1
    assert ar["failed_runs"] == [{"run_id": "ar-diverged", "error": "non-finite loss at step 3"}]
    # the literature's "diffusion needs 16x": C_diffusion(L) / C_ar(L) at a loss both reach
    m = dif["compute_multiplier"]
    assert m["reference"] == "ar" and m["multiplier"] == pytest.approx(16.0, rel=0.02)
    assert m["ci"][0] <= m["multiplier"] <= m["ci"][1]
    # IsoFLOP optima: N* = 0.1 C^0.5 exactly, so a = b = 0.5 and D*/N* = C / (6 * 0.01 C)
    iso = ar["isoflop"]
    assert iso["a"] == pytest.approx(0.5, abs=0.01) and iso["b"] == pytest.approx(0.5, abs=0.01)
    assert iso["budgets"][0]["tokens_per_param"] == pytest.approx(1 / 0.06, rel=0.05)
    # too few budgets: the entry stays, says why, and nothing crashes
    gdn = fits["gdn"]
    assert gdn["status"] == "insufficient" and gdn["E"] is None and "at least 3" in gdn["reason"]
    md = (out / "tables.md").read_text()
    assert "Compute multiplier relative to ar" in md and "ar-diverged" in md
    assert "16" in md.split("Compute multiplier")[1].split("\n## ")[0]
    assert r"\toprule" in (out / "tables.tex").read_text()


def test_report_groups_by_any_config_key(synthetic_root):
    """group_by=[arch, arch.pattern] splits the hybrid patterns: an ablation at matched compute."""
    from sweeps.analysis.report import make_report
    from sweeps.config import ReportConfig

    out = make_report(ReportConfig(root=str(synthetic_root), group_by=["arch", "arch.pattern"], bootstrap=200))
    fits = json.loads((out / "fits.json").read_text())
    g4, g8 = "arch=hybrid,arch.pattern=GGGA", "arch=hybrid,arch.pattern=GGGGGGGA"
    assert {g4, g8, "arch=ar,arch.pattern=A"} <= set(fits)
    assert fits[g4]["group"] == {"arch": "hybrid", "arch.pattern": "GGGA"}
    assert fits[g4]["n_runs"] == fits[g8]["n_runs"] == 15
    assert fits[g4]["compute_multiplier"]["multiplier"] == pytest.approx(0.5, rel=0.02)
    assert fits[g8]["compute_multiplier"]["multiplier"] == pytest.approx(0.8, rel=0.02)
    md = (out / "tables.md").read_text()
    assert "Loss at matched compute" in md and g8 in md
    for name in FIGURES:
        assert (out / f"{name}.png").exists() and (out / f"{name}.pdf").exists()


# --- parallel local jobs ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_joblib_launcher_runs_points_in_worker_processes(tmp_path):
    proc = run_cli(["-m", "sweeps.run", "+arch=ar", "sweep=smoke", f"root={tmp_path}", "sweep.budgets=[6e9]",
                    "sweep.report=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows.values())
    assert np.all([r["budget"] == 6e9 for r in rows.values()])
