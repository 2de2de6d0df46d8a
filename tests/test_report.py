"""The report on databases with known contents: seeds, cooldown branches, saturated and degenerate grids, repeated
data, mixed tokenizers, recall probes, bad input, and the atomic swap of ROOT/report. Every number is checked
against an independent answer (a hand loop, a closed form, numpy on the raw rows)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from archs.errors import ConfigError
from conftest import run_cli
from sweeps import fit as F
from sweeps.analysis import laws, plots, solver
from sweeps.analysis.recall import recall_points
from sweeps.analysis.report import make_report
from sweeps.config import ReportConfig
from sweeps.analysis.rows import load_rows

LAW = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.33, "beta": 0.30}
BOOT = 100

# Today's results columns plus the ones added for data, branches, seeds and probes.
COLUMNS = ["run_id", "arch", "status", "params", "nonembed_params", "tokens", "flops", "eval_bpb", "error", "size",
           "d_model", "n_layers", "pattern", "objective", "seq_len", "batch_size", "lr", "seed", "steps", "budget",
           "sweep", "corpus", "corpus_sha256", "eval_samples", "tokens_per_s", "wall_s", "host", "pid", "heartbeat",
           "created_at", "updated_at", "config"]
NEW = ["tokenizer", "vocab_size", "epochs", "trunk_id", "compute_spent", "active_params", "eval_acc", "state_bytes",
       "role"]


def chinchilla(N, D):
    return LAW["E"] + LAW["A"] * N ** -LAW["alpha"] + LAW["B"] * D ** -LAW["beta"]


def write_db(root: Path, rows: list[dict], *, columns=COLUMNS + NEW, evals: dict | None = None) -> Path:
    """A results database with exactly these rows (columns absent from a row are NULL)."""
    root.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(root / "results.sqlite")
    con.execute(f"CREATE TABLE runs ({', '.join(c + (' TEXT PRIMARY KEY' if c == 'run_id' else '') for c in columns)})")
    con.execute("CREATE TABLE evals (run_id TEXT, step INTEGER, tokens INTEGER, flops REAL, eval_bpb REAL, "
                "train_loss REAL, PRIMARY KEY (run_id, step))")
    for i, r in enumerate(rows):
        r = {"status": "done", "sweep": "default", "created_at": float(i), "config": {}, **r}
        r["config"] = json.dumps(r["config"])
        cols = [c for c in columns if c in r]
        con.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [r[c] for c in cols])
    for rid, ev in (evals or {}).items():
        con.executemany("INSERT INTO evals VALUES (?, ?, ?, ?, ?, ?)", [(rid, *e) for e in ev])
    con.commit()
    con.close()
    return root


def run_row(arch, N, D, L, *, budget, seed=0, size=None, **extra) -> dict:
    size = size or f"n{N:.0f}"
    return {"run_id": f"{arch}-{size}-{budget:.3g}-s{seed}-{extra.get('trunk_id') or 'p'}", "arch": arch,
            "params": int(N), "nonembed_params": int(N), "tokens": int(D), "flops": 6.0 * N * D, "eval_bpb": float(L),
            "budget": budget, "seed": seed, "size": size,
            "config": {"arch": {"name": arch, "size": size}, "seed": seed, "budget": budget}, **extra}


def sweep_rows(arch, budgets, *, sizes=(1 / 3, 1.0, 3.0), seeds=(0,), noise=0.0, rng=None, **extra) -> list[dict]:
    """Sizes around the law's compute-optimal N at every budget; loss from the law times seed noise."""
    rows = []
    for c in budgets:
        n_opt = laws.compute_optimal_allocation(c, **LAW).N_opt
        for f in sizes:
            N = round(float(n_opt * f))
            D = round(c / (6 * N))
            for s in seeds:
                eps = noise * rng.standard_normal() if noise else 0.0
                rows.append(run_row(arch, N, D, chinchilla(N, D) * math.exp(eps), budget=c, seed=s, **extra))
    return rows


def fits(out: Path) -> dict:
    return json.loads((out / "fits.json").read_text())


# --- seeds: means, spread, whole-point bootstrap, leave-one-out ------------------------------------------------

BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20]


@pytest.fixture(scope="module")
def seeds_root(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = sweep_rows("ar", BUDGETS, seeds=(0, 1, 2), noise=0.01, rng=rng)
    root = write_db(tmp_path_factory.mktemp("seeds"), rows)
    make_report(ReportConfig(root=str(root), bootstrap=BOOT, figures=False))
    return root, rows


def _frontier_by_hand(rows):
    """{budget: [rows of the point with the lowest mean loss]} from the raw rows."""
    out = {}
    for c in sorted({r["budget"] for r in rows}):
        by_n = {}
        for r in rows:
            if r["budget"] == c:
                by_n.setdefault(r["params"], []).append(r)
        out[c] = min(by_n.values(), key=lambda rs: np.mean([r["eval_bpb"] for r in rs]))
    return out


def test_frontier_uses_means_over_seeds(seeds_root):
    root, rows = seeds_root
    e = fits(root / "report")["ar"]
    front = _frontier_by_hand(rows)
    assert e["frontier"]["budget"] == list(front)
    np.testing.assert_allclose(e["frontier"]["L"], [np.mean([r["eval_bpb"] for r in rs]) for rs in front.values()])
    np.testing.assert_allclose(e["frontier"]["L_std"],
                               [np.std([r["eval_bpb"] for r in rs], ddof=1) for rs in front.values()])
    assert e["n_runs"] == 45 and e["n_points"] == 15 and e["frontier"]["n_seeds"] == [3] * 5


def test_seed_spread_and_per_seed_alpha(seeds_root):
    root, rows = seeds_root
    s = fits(root / "report")["ar"]["seeds"]
    stds = []
    for c in BUDGETS:
        for n in {r["params"] for r in rows if r["budget"] == c}:
            stds.append(np.std([r["eval_bpb"] for r in rows if r["budget"] == c and r["params"] == n], ddof=1))
    assert s["n_seeds"] == 3 and s["n_points"] == 15
    assert s["bpb_std_mean"] == pytest.approx(np.mean(stds)) and s["bpb_std_max"] == pytest.approx(np.max(stds))
    for seed in (0, 1, 2):
        best = [min((r for r in rows if r["seed"] == seed and r["budget"] == c), key=lambda r: r["eval_bpb"])
                for c in BUDGETS]
        alpha = F.fit_compute_law([r["flops"] for r in best], [r["eval_bpb"] for r in best], frontier=False)["alpha"]
        assert s["alpha_per_seed"][str(seed)] == pytest.approx(alpha, rel=1e-6)
    assert s["alpha_std"] == pytest.approx(np.std(list(s["alpha_per_seed"].values()), ddof=1))


def test_compute_law_bootstrap_resamples_whole_points(seeds_root):
    """The report's interval comes from resamples of whole frontier points (all seeds together): each resample's
    optimum equals a from-scratch fit of the rows a loop draws point by point. Resamples with fewer than 4
    distinct budgets do not identify the 3-parameter law (a valley of equal objective), so there only the
    objective is compared."""
    root, rows = seeds_root
    e = fits(root / "report")["ar"]
    front = list(_frontier_by_hand(rows).values())
    all_rows = [r for rs in front for r in rs]
    C = np.array([r["flops"] for r in all_rows])
    L = np.array([r["eval_bpb"] for r in all_rows])
    law = laws.fit_compute_law(C, L, clusters=np.repeat(np.arange(5), 3), n_boot=BOOT, seed=0)
    assert e["alpha"] == pytest.approx(law.alpha, rel=1e-12)
    assert e["ci"]["alpha"] == pytest.approx(list(law.boot.ci["alpha"]), rel=1e-12)
    s = law.boot.samples
    draws = np.random.default_rng(0).integers(0, len(front), size=(BOOT, len(front)))
    for i, d in enumerate(draws[:12]):
        idx = np.array([k for j in d for k in range(3 * j, 3 * j + 3)])
        full = F.fit_compute_law(C[idx], L[idx], frontier=False)
        if len(set(d)) >= 4:
            assert s["alpha"][i] == pytest.approx(full["alpha"], rel=1e-6)
        ours = solver.huber(np.log(s["E"][i] + s["A"][i] * C[idx] ** -s["alpha"][i]) - np.log(L[idx])).sum()
        assert ours == pytest.approx(full["objective"], rel=1e-3)


def test_leave_one_budget_out_against_a_hand_loop(seeds_root):
    root, rows = seeds_root
    e = fits(root / "report")["ar"]
    front = _frontier_by_hand(rows)
    hand = []
    for c, held in front.items():
        rest = [r for b, rs in front.items() if b != c for r in rs]
        law = F.fit_compute_law([r["flops"] for r in rest], [r["eval_bpb"] for r in rest], frontier=False)
        C = np.mean([r["flops"] for r in held])
        hand.append((law["E"] + law["A"] * C ** -law["alpha"], np.mean([r["eval_bpb"] for r in held])))
    got = [(h["predicted"], h["actual"]) for h in e["loo"]["holdouts"]]
    np.testing.assert_allclose(got, hand, rtol=1e-6)  # warm-started weighted solves vs full refits
    assert e["loo"]["mae"] == pytest.approx(np.mean([abs(p - a) for p, a in hand]))
    assert e["extrapolation"]["predicted"] == pytest.approx(hand[-1][0])
    # Chinchilla's law refitted without each budget (warm-started weighted solves) vs full refits of the rest
    ch = e["chinchilla"]["loo"]["holdouts"]
    for h, (c, held) in zip(ch, front.items()):
        rest = [r for r in rows if r["budget"] != c]
        full = F.fit_chinchilla([r["params"] for r in rest], [r["tokens"] for r in rest], [r["eval_bpb"] for r in rest])
        N, D = held[0]["params"], held[0]["tokens"]
        pred = full["E"] + full["A"] * N ** -full["alpha"] + full["B"] * D ** -full["beta"]
        assert h["predicted"] == pytest.approx(pred, rel=1e-4)


def test_resample_counts_draw_clusters_whole():
    clusters = np.array([0, 0, 1, 2, 2, 2])
    counts = solver.resample_counts(3, 50, 7, clusters)
    draws = np.random.default_rng(7).integers(0, 3, size=(50, 3))
    for b in range(50):
        np.testing.assert_array_equal(counts[b], [np.sum(draws[b] == k) for k in clusters])


# --- what a fit may claim -----------------------------------------------------------------------------------


def test_saturated_and_degenerate_grids(tmp_path):
    """3 budgets for 3 parameters is saturated; a loss with no irreducible term (E fitted at its bound 0) is
    degenerate; both say so in fits.json, the tables and the legends; 2 budgets are insufficient."""
    rows = sweep_rows("ar", BUDGETS[:3])
    for c in BUDGETS:  # L = 30 C^-0.1: a pure power law, E = 0
        for f in (0.5, 1.0, 2.0):
            n = 0.1 * c**0.5 * f
            rows.append(run_row("pure", n, c / (6 * n), 30 * c**-0.1 * (1 + 0.02 * math.log(f) ** 2), budget=c))
    rows += sweep_rows("tiny", BUDGETS[:2])
    out = make_report(ReportConfig(root=str(write_db(tmp_path, rows)), bootstrap=BOOT, figures=False))
    f = fits(out)
    assert f["ar"]["status"] == "saturated" and "3 distinct points for 3 parameters" in f["ar"]["flags"][0]
    assert f["pure"]["status"] == "degenerate" and f["pure"]["E"] < 1e-3
    assert any("at its bound 0" in s for s in f["pure"]["flags"])
    assert f["tiny"]["status"] == "insufficient" and f["tiny"]["E"] is None and "at least 3" in f["tiny"]["reason"]
    md = (out / "tables.md").read_text()
    law_table = md.split("## Fitted compute laws")[1].split("\n## ")[0]
    assert "| ar | saturated |" in law_table and "| pure | degenerate |" in law_table
    assert "| tiny | insufficient |" in law_table


def test_isoflop_laws_only_from_bracketed_optima(tmp_path):
    """Sizes that all lie above the optimum: no budget brackets its minimum, so no parabola, optimum or
    N*(C) law is claimed, and fits.json says why."""
    rows = sweep_rows("ar", BUDGETS, sizes=(2.0, 4.0, 8.0))
    f = fits(make_report(ReportConfig(root=str(write_db(tmp_path, rows)), bootstrap=BOOT, figures=False)))["ar"]
    iso = f["isoflop"]
    assert iso["budgets"] and not any(b["bracketed"] for b in iso["budgets"])
    assert iso["a"] is None and iso["status"] == "insufficient"
    assert iso["reason"] == "not fitted: 0 bracketed optima (needs 3)"
    assert f["tokens_per_param"]["isoflop"] == []


def test_figures_label_statuses_and_tick_labels_never_collide(tmp_path, monkeypatch):
    """Every figure, for size ranges from 1.2x to nine decades, after drawing: no two tick labels of an axis
    overlap; a saturated law (3 budgets) says so in the legends; a law never drawn says why."""
    rows = []
    for arch, sizes in (("narrow", (0.9, 1.0, 1.1)), ("decade", (0.3, 1.0, 3.0)), ("wide", (1e-4, 0.1, 1.0, 1e4))):
        rows += sweep_rows(arch, BUDGETS if arch != "wide" else [1e12, 1e16, 1e20], sizes=sizes)
    rows += sweep_rows("edge", BUDGETS[:3], sizes=(2.0, 4.0, 8.0))  # no budget brackets its minimum
    root = write_db(tmp_path, rows)
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, name, drawn: figs.append((name, fig)))
    from sweeps.analysis.report import analyse

    _, groups, _ = analyse(ReportConfig(root=str(root), bootstrap=0, figures=False))
    plots.draw_all(tmp_path, list(groups.values()), lr_rows=[], recall_points=[])
    assert [n for n, _ in figs] == ["loss_vs_compute", "isoflop", "optimal_allocation", "residuals", "curves"]
    assert len(groups) == 4
    for name, fig in figs:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        for ax in fig.axes:
            if not (ax.axison and ax.get_visible()):
                continue
            for axis in (ax.xaxis, ax.yaxis):
                boxes = [t.get_window_extent(r) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
                assert len(boxes) >= 2, (name, ax.get_title())
                for a, b in zip(boxes, boxes[1:]):
                    assert not a.overlaps(b), (name, ax.get_title(), [t.get_text() for t in axis.get_ticklabels()])

    def legend(name):
        fig = dict(figs)[name]
        return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]

    assert any(t.startswith("wide: ") and t.endswith("[saturated]") for t in legend("loss_vs_compute"))
    assert any(t.startswith("narrow: ") and "[" not in t for t in legend("loss_vs_compute"))
    assert any(t.startswith("wide (rms") and t.endswith("[saturated]") for t in legend("residuals"))
    iso = legend("isoflop")
    assert iso.count("C=1e18 (minimum not bracketed)") == 1 and "C=1e18" in iso  # edge, then a bracketed group
    assert "N*(C) not fitted: 0 bracketed optima (needs 3)" in iso
    assert "edge: not fitted: 0 bracketed optima (needs 3)" in legend("optimal_allocation")


# --- cooldown branches ------------------------------------------------------------------------------------


def test_cooldown_branches_compute_saved_and_approach_1(tmp_path):
    """One constant-rate trunk per size (role trunk: not a point, its loss not cooled down) and a branch at every
    budget of that size: compute saved = (trunk + every cooldown) / the points' FLOPs, from the rows' own
    compute_spent, and approach 1 from the branch endpoints recovers the law's N* ~ C^a."""
    budgets = [6e15 * 2**j for j in range(12)]  # N*(C) of the law: 2e6 .. 7e7
    sizes = [5e5 * 2**k for k in range(10)]
    rows, spent, flops, n_branches = [], 0.0, 0.0, 0
    for N in sizes:
        pts = [(c, c / (6 * N)) for c in budgets if 1 <= c / (6 * N * N) <= 5000]  # tokens per parameter
        if len(pts) < 2:
            continue
        trunk = run_row("ar", N, 0.8 * pts[-1][1], chinchilla(N, 0.8 * pts[-1][1]) + 0.5, budget=pts[-1][0])
        # a far worse, un-cooled loss and no budget: it must not be fitted
        trunk.update(run_id=f"ar-trunk-{N:.0f}", budget=None, role="trunk", compute_spent=trunk["flops"])
        rows.append(trunk)
        spent += trunk["flops"]
        for c, D in pts:
            r = run_row("ar", N, D, chinchilla(N, D), budget=c, trunk_id=trunk["run_id"], compute_spent=0.2 * c,
                        role="branch")
            rows.append(r)
            spent += r["compute_spent"]
            flops += r["flops"]
            n_branches += 1
    out = make_report(ReportConfig(root=str(write_db(tmp_path, rows)), bootstrap=BOOT, figures=False))
    e = fits(out)["ar"]
    assert e["compute_saved"] == pytest.approx(spent / flops) and e["n_runs"] == n_branches
    a1 = e["approach1"]
    assert a1["source"].startswith("cooldown-branch endpoints") and a1["status"] == "ok", a1
    truth = LAW["beta"] / (LAW["alpha"] + LAW["beta"])
    assert a1["a"] == pytest.approx(truth, abs=0.05)
    names = [r["approach"] for r in e["agreement"]["approaches"]]
    assert names == ["L(C) on the frontier", "approach 1 (envelope)", "approach 2 (IsoFLOP)", "approach 3 (L(N, D))"]
    a3 = e["agreement"]["approaches"][3]
    assert a3["a"] == pytest.approx(truth, abs=1e-3)  # noiseless points of the law itself
    assert "compute spent/flops" in (out / "tables.md").read_text()


# --- data, tokenizers, probes -----------------------------------------------------------------------------


def test_repeated_data_and_mixed_tokenizers_are_flagged(tmp_path):
    rows = sweep_rows("ar", BUDGETS, tokenizer="byte", vocab_size=259, epochs=1.0)
    for r in rows[-3:]:
        r["epochs"] = 6.5
    bpe = sweep_rows("ar", BUDGETS, sizes=(5.0,), tokenizer="bpe", vocab_size=8192, epochs=0.5)
    for r in bpe:
        r["run_id"] += "-bpe"
        r["config"]["tokenizer"] = "bpe"
    out = make_report(ReportConfig(root=str(write_db(tmp_path, rows + bpe)), bootstrap=BOOT, figures=False))
    e = fits(out)["ar"]
    assert e["data_constrained"] and e["max_epochs"] == 6.5
    assert any(f.startswith("data-constrained: 3 point(s) repeat their data up to 6.5 epochs") for f in e["flags"])
    assert e["tokenizers"] == ["bpe/8192", "byte/259"] and "stays comparable" in e["note"]
    md = (out / "tables.md").read_text()
    assert "| ar †" in md and "tokenizer/vocab" in md and "bpe/8192, byte/259" in md


def test_recall_probe_rows_are_a_table_and_a_figure_not_a_fit(tmp_path):
    rows = sweep_rows("ar", BUDGETS)
    acc = {}
    for arch, bytes_per_width in (("ar", 512.0), ("gdn", 64.0)):
        for d in (32, 64):
            for pairs in (4, 16):
                for s in (0, 1):
                    a = min(1.0, d / pairs / 8) * (0.9 + 0.05 * s)
                    acc.setdefault((arch, d, pairs), []).append(a)
                    rows.append({"run_id": f"mqar-{arch}-{d}-{pairs}-{s}", "arch": arch, "params": d * 100,
                                 "tokens": 1000, "flops": 1e12, "eval_bpb": 1.0, "eval_acc": a, "seed": s,
                                 "d_model": d, "state_bytes": bytes_per_width * d, "sweep": "mqar",
                                 "config": {"data": {"mqar": {"pairs": pairs}}, "seed": s}})
    root = write_db(tmp_path, rows)
    out = make_report(ReportConfig(root=str(root), bootstrap=20, figures=False))
    f = fits(out)
    assert set(f) == {"ar"} and f["ar"]["n_runs"] == 15  # probes are not language-model runs
    rec = json.loads((out / "recall.json").read_text())
    assert len(rec) == 8
    for p in rec:
        assert p["acc"] == pytest.approx(np.mean(acc[(p["arch"], p["d_model"], p["pairs"])]))
        assert p["n_seeds"] == 2
    plots.recall(tmp_path, recall_points(load_rows(root)), drawn := [])
    assert drawn == ["recall.png", "recall.pdf"] and (tmp_path / "recall.png").stat().st_size > 1000
    assert "Recall probe (MQAR)" in (out / "tables.md").read_text()


# --- bad input, old databases, the atomic swap ------------------------------------------------------------


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A report every test below leaves exactly as it was."""
    root = write_db(tmp_path_factory.mktemp("reported"), sweep_rows("ar", BUDGETS))
    out = make_report(ReportConfig(root=str(root), bootstrap=20, figures=False))
    return root, {p.name: p.read_bytes() for p in out.iterdir()}


def _unchanged(root: Path, before: dict) -> None:
    assert {p.name: p.read_bytes() for p in (root / "report").iterdir()} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".report")]


def test_unknown_group_by_key_is_refused_and_changes_nothing(reported):
    root, before = reported
    with pytest.raises(ConfigError) as err:
        make_report(ReportConfig(root=str(root), group_by=["arch", "nosuchkey"]))
    msg = str(err.value)
    assert "'nosuchkey'" in msg and "columns: " in msg and "arch.size" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="did you mean arch.size"):
        make_report(ReportConfig(root=str(root), group_by=["arch.sise"]))
    _unchanged(root, before)


def test_a_failure_while_drawing_leaves_the_previous_report(reported, monkeypatch):
    root, before = reported

    def broken(*a, **k):
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(plots, "draw_all", broken)
    with pytest.raises(RuntimeError, match="plotting broke"):
        make_report(ReportConfig(root=str(root), bootstrap=20, figures=True))
    _unchanged(root, before)


def test_report_command_refuses_bad_input_in_one_line(reported):
    root, before = reported
    proc = run_cli(["-m", "sweeps.report", f"root={root}", "group_by=[nosuchkey]"], timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: group_by key 'nosuchkey' is neither a results column nor a config path")
    _unchanged(root, before)
    for bad, key in ((dict(bootstrap=-1), "bootstrap"), (dict(group_by=[]), "group_by"), (dict(seed=1.5), "seed"),
                     (dict(figures="yes"), "figures"), (dict(root=""), "root")):
        with pytest.raises(ConfigError, match=key):
            ReportConfig(**{"root": str(root), **bad})


def test_corrupt_database_is_reported_and_left_untouched(tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="results.sqlite is not a readable results database.*left untouched"):
        load_rows(tmp_path)
    assert (tmp_path / "results.sqlite").read_bytes() == b"not a database" * 100
    with pytest.raises(ConfigError, match="no results database"):
        load_rows(tmp_path / "nowhere")


def test_old_databases_and_interrupted_runs(tmp_path):
    """A database from before the new columns reads with them as None; a `running` row whose process is gone is
    incomplete (listed, not fitted); evals come back for finished runs only."""
    rows = sweep_rows("ar", BUDGETS)
    rows.append({"run_id": "ar-killed", "arch": "ar", "status": "running", "params": 100, "tokens": 10,
                 "flops": 1e18, "budget": 1e18, "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 1e6})
    rows.append({"run_id": "ar-diverged", "arch": "ar", "status": "failed", "params": 100, "tokens": 10,
                 "flops": 1e18, "budget": 1e18, "error": "non-finite loss at step 3"})
    ev = {rows[0]["run_id"]: [(1, 10, 1e17, 3.0, 3.1), (2, 20, 2e17, 2.5, 2.6)]}
    root = write_db(tmp_path, rows, columns=COLUMNS, evals=ev)
    got = {r["run_id"]: r for r in load_rows(root)}
    r0 = got[rows[0]["run_id"]]
    assert all(r0[c] is None for c in NEW) and r0["incomplete"] is False
    assert r0["evals"] == [{"step": 1, "tokens": 10, "flops": 1e17, "eval_bpb": 3.0, "train_loss": 3.1},
                           {"step": 2, "tokens": 20, "flops": 2e17, "eval_bpb": 2.5, "train_loss": 2.6}]
    assert got["ar-killed"]["incomplete"] is True and got["ar-killed"]["evals"] == []
    assert got["ar-diverged"]["incomplete"] is False
    e = fits(make_report(ReportConfig(root=str(root), bootstrap=20, figures=False)))["ar"]
    assert e["n_runs"] == 15 and e["incomplete_runs"] == ["ar-killed"]
    assert e["failed_runs"] == [{"run_id": "ar-diverged", "error": "non-finite loss at step 3"}]
