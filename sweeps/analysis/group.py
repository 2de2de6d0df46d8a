"""Grouping rows and analysing one group: points over seeds, the frontier, every law, and how the laws agree.

Conventions: loss = final held-out bits per byte (``eval_bpb``; for diffusion the NELBO upper bound); C = training
FLOPs by the analytic count; N = all parameters; D = training tokens. A run's budget is its sweep budget (exact for
IsoFLOP grids), else its own FLOPs.

A *point* is one (budget, N, D) configuration: the rows that differ only in their seed (same stored config apart
from seed, run_id and root). Its loss is the mean over seeds. The frontier (lowest mean loss per budget) and the
IsoFLOP parabolas use points; the compute law is fitted to every row of the frontier points and Chinchilla's law
to every row; bootstraps resample whole points. Cooldown branches (``trunk_id`` set) stand for the point of their
``tokens`` and ``flops`` like any run; ``compute_spent`` says what they cost.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sweeps.analysis.approaches import (Curve, Envelope, Holdout, IsoflopFit, LeaveOneOut, fit_approach1,
                                        fit_isoflop, leave_one_out)
from sweeps.analysis.laws import (ChinchillaLaw, ComputeLaw, Multiplier, chinchilla_loss, fit_chinchilla,
                                  fit_compute_law, frontier)
from sweeps.analysis.status import NoFit, Status, epochs_flag

MIN_BUDGETS = 3  # the compute law has 3 parameters
CHINCHILLA_MIN = (8, 3, 3)  # runs, distinct sizes, distinct token counts for L(N, D)
NOT_A_POINT_KEY = ("seed", "run_id", "root")  # config keys in which the seeds of one point differ


# --- rows to groups ------------------------------------------------------------------------------------------


def row_value(row: dict, key: str) -> Any:
    """A row's value for a grouping key: a results column, else a dotted path into its config."""
    if key in row and key not in ("config", "evals"):
        return row[key]
    node: Any = row.get("config") or {}
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def known_keys(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(results columns, dotted config paths) present in any row: the keys group_by accepts."""
    cols: set[str] = set()
    paths: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            p = f"{prefix}{k}"
            paths.add(p)
            if isinstance(v, dict):
                walk(v, p + ".")

    for r in rows:
        cols.update(k for k in r if k not in ("config", "evals", "incomplete"))
        walk(r.get("config") or {}, "")
    return sorted(cols), sorted(paths - cols)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def group_of(row: dict, group_by: Sequence[str]) -> tuple[str, dict]:
    vals = {k: row_value(row, k) for k in group_by}
    if list(group_by) == ["arch"]:
        return str(vals["arch"]), vals
    return ",".join(f"{k}={_fmt_value(v)}" for k, v in vals.items()), vals


def budget_of(row: dict) -> float:
    return float(row["budget"]) if row.get("budget") else float(row["flops"])


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


# --- points --------------------------------------------------------------------------------------------------


@dataclass
class Point:
    """The seeds of one (budget, N, D) configuration."""

    budget: float
    rows: list[dict]

    @property
    def C(self) -> float:
        return float(np.mean([r["flops"] for r in self.rows]))

    @property
    def N(self) -> float:
        return float(self.rows[0]["params"])

    @property
    def D(self) -> float:
        return float(self.rows[0]["tokens"])

    @property
    def L(self) -> float:
        return float(np.mean([r["eval_bpb"] for r in self.rows]))

    @property
    def L_std(self) -> float:
        """Standard deviation of the loss over seeds (ddof 1; NaN for a single seed)."""
        return float(np.std([r["eval_bpb"] for r in self.rows], ddof=1)) if len(self.rows) > 1 else math.nan

    @property
    def n_seeds(self) -> int:
        return len(self.rows)


def _point_key(row: dict) -> tuple:
    cfg = {k: v for k, v in (row.get("config") or {}).items() if k not in NOT_A_POINT_KEY}
    return (budget_of(row), row["params"], row["tokens"], json.dumps(cfg, sort_keys=True, default=str))


def points_of(rows: Sequence[dict]) -> list[Point]:
    """Rows merged over seeds, in order of first appearance."""
    pts: dict[tuple, Point] = {}
    for r in rows:
        k = _point_key(r)
        if k not in pts:
            pts[k] = Point(budget=k[0], rows=[])
        pts[k].rows.append(r)
    return list(pts.values())


def frontier_points(points: Sequence[Point]) -> list[Point]:
    """The lowest-loss point at each budget, by budget."""
    return [points[i] for i in frontier([p.budget for p in points], [p.L for p in points])]


# --- the analysis of one group -------------------------------------------------------------------------------


@dataclass
class SeedSpread:
    """How much the seeds of a point disagree, and what that does to the compute law's exponent."""

    n_seeds: int  # most seeds of any point
    n_points: int  # points with at least two seeds
    bpb_std_mean: float
    bpb_std_max: float
    alpha_per_seed: dict[str, float]  # the compute law fitted to each seed's runs alone

    @property
    def alpha_std(self) -> float:
        a = [v for v in self.alpha_per_seed.values() if _finite(v)]
        return float(np.std(a, ddof=1)) if len(a) > 1 else math.nan


@dataclass
class Agreement:
    """The compute-optimal exponent a (N* ~ C^a) and the loss each approach predicts at the largest budget."""

    C_max: float
    L_actual: float
    rows: list[dict]  # approach, a, a_ci, L_pred, status


@dataclass
class GroupAnalysis:
    key: str
    vals: dict
    archs: list[str]
    ok: list[dict]  # finished runs with a finite loss
    failed: list[dict]
    incomplete: list[dict]
    points: list[Point]
    frontier: list[Point]
    law: ComputeLaw | NoFit
    loo: LeaveOneOut | None = None
    isoflop: IsoflopFit | NoFit = field(default_factory=lambda: NoFit(Status.INSUFFICIENT, "no sweep runs"))
    approach1: Envelope | NoFit = field(default_factory=lambda: NoFit(Status.INSUFFICIENT, "no curves"))
    chinchilla: ChinchillaLaw | NoFit = field(default_factory=lambda: NoFit(Status.INSUFFICIENT, "no runs"))
    chinchilla_loo: LeaveOneOut | None = None
    seeds: SeedSpread | None = None
    compute_saved: float | None = None
    max_epochs: float | None = None
    data_flag: str | None = None
    tokenizers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    agreement: Agreement | None = None
    multiplier: Multiplier | None = None

    @property
    def status(self) -> Status:
        return self.law.status

    @property
    def fitted(self) -> bool:
        return isinstance(self.law, ComputeLaw)

    @property
    def extrapolation(self) -> Holdout | None:
        """The largest budget held out (from the leave-one-out refits)."""
        if self.loo and self.loo.holdouts and self.frontier and self.loo.holdouts[-1].C == self.frontier[-1].C:
            return self.loo.holdouts[-1]
        return None


def _try(fn, what: str):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the report writes what it can and says what failed
        return NoFit(Status.FAILED, f"{what} failed: {type(e).__name__}: {e}")


def _law_rows(front: Sequence[Point]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, L, frontier index) of every row of the frontier points."""
    C = np.array([r["flops"] for p in front for r in p.rows], dtype=float)
    L = np.array([r["eval_bpb"] for p in front for r in p.rows], dtype=float)
    k = np.array([i for i, p in enumerate(front) for _ in p.rows], dtype=int)
    return C, L, k


def _compute_law(g: GroupAnalysis, n_boot: int, seed: int) -> None:
    if not g.ok:
        g.law = NoFit(Status.INSUFFICIENT, "no finished runs" + (" (all failed)" if g.failed else ""))
        return
    if len(g.frontier) < MIN_BUDGETS:
        g.law = NoFit(Status.INSUFFICIENT, f"only {len(g.frontier)} distinct compute budget(s) with finished runs; "
                                           f"the 3-parameter law needs at least {MIN_BUDGETS}")
        return
    C, L, k = _law_rows(g.frontier)
    g.law = _try(lambda: fit_compute_law(C, L, clusters=k, n_boot=n_boot, seed=seed), "compute-law fit")
    if not g.fitted or len(g.frontier) < MIN_BUDGETS + 1:
        return

    law = g.law

    def refit(mask, j):
        if np.unique(k[mask]).size < MIN_BUDGETS:
            return None
        q = law.refit(mask)
        with np.errstate(over="ignore", invalid="ignore"):
            return float(q["E"] + q["A"] * g.frontier[j].C ** -q["alpha"])

    g.loo = leave_one_out(k, [(p.C, p.L) for p in g.frontier], refit)


def _enough_for_chinchilla(rows: Sequence[dict]) -> bool:
    n, s, t = CHINCHILLA_MIN
    return len(rows) >= n and len({r["params"] for r in rows}) >= s and len({r["tokens"] for r in rows}) >= t


def _chinchilla(g: GroupAnalysis, n_boot: int, seed: int) -> None:
    if not _enough_for_chinchilla(g.ok):
        n, s, t = CHINCHILLA_MIN
        g.chinchilla = NoFit(Status.INSUFFICIENT,
                             f"needs >= {n} finished runs over >= {s} sizes and >= {t} token counts")
        return
    pid = {id(r): i for i, p in enumerate(g.points) for r in p.rows}
    N = np.array([r["params"] for r in g.ok], dtype=float)
    D = np.array([r["tokens"] for r in g.ok], dtype=float)
    L = np.array([r["eval_bpb"] for r in g.ok], dtype=float)
    cl = np.array([pid[id(r)] for r in g.ok])
    g.chinchilla = _try(lambda: fit_chinchilla(N, D, L, clusters=cl, n_boot=n_boot, seed=seed), "L(N, D) fit")
    ch = g.chinchilla
    if not isinstance(ch, ChinchillaLaw) or len(g.frontier) < 2:
        return
    fidx = {b: i for i, b in enumerate(p.budget for p in g.frontier)}
    k = np.array([fidx.get(budget_of(r), -1) for r in g.ok])

    def refit(mask, j):
        if not _enough_for_chinchilla([r for r, m in zip(g.ok, mask) if m]):
            return None
        p = g.frontier[j]
        q = ch.refit(mask)
        return float(chinchilla_loss(p.N, p.D, q["E"], q["A"], q["B"], q["alpha"], q["beta"]))

    g.chinchilla_loo = leave_one_out(k, [(p.C, p.L) for p in g.frontier], refit)


def _isoflop(g: GroupAnalysis, n_boot: int, seed: int) -> None:
    swept = [p for p in g.points if p.rows[0].get("budget")]
    if not swept:
        g.isoflop = NoFit(Status.INSUFFICIENT, "no sweep runs (runs with a budget)")
        return
    C, N, L, D = (np.array(v, dtype=float) for v in zip(*[(p.budget, p.N, p.L, p.D) for p in swept]))
    g.isoflop = _try(lambda: fit_isoflop(C, N, L, D, rtol=0.01, n_boot=n_boot, seed=seed), "IsoFLOP fit")


def _branch_family(rows: Sequence[dict]) -> set[int]:
    """ids of the rows that are cooldown branches or the trunks they fork from."""
    trunks = {r["trunk_id"] for r in rows if r.get("trunk_id")}
    return {id(r) for r in rows if r.get("trunk_id") or r["run_id"] in trunks}


def _eval_curve(r: dict) -> Curve | None:
    ev = [e for e in r["evals"] if _finite(e.get("eval_bpb")) and e.get("flops") and e.get("tokens")]
    if len(ev) < 2:
        return None
    return Curve(params=r["params"], flops=np.array([e["flops"] for e in ev], dtype=float),
                 loss=np.array([e["eval_bpb"] for e in ev], dtype=float),
                 tokens=np.array([e["tokens"] for e in ev], dtype=float))


def _approach1(g: GroupAnalysis) -> None:
    family = _branch_family(g.ok)
    if family:
        by_size: dict[float, list[Point]] = {}
        for p in g.points:
            if any(id(r) in family for r in p.rows):
                by_size.setdefault(p.N, []).append(p)
        curves = [Curve(params=n, flops=np.array([p.C for p in ps]), loss=np.array([p.L for p in ps]),
                        tokens=np.array([p.D for p in ps])) for n, ps in by_size.items() if len(ps) >= 2]
        source = "cooldown-branch endpoints (one curve per size)"
    else:
        curves = [c for c in map(_eval_curve, g.ok) if c is not None]
        source = "held-out curves during training (one per run)"
    if len({c.params for c in curves}) < 3:
        g.approach1 = NoFit(Status.INSUFFICIENT, f"needs {source} of at least 3 model sizes")
        return
    g.approach1 = _try(lambda: fit_approach1(curves, source=source), "approach 1")


def _seed_spread(g: GroupAnalysis) -> None:
    seeds = sorted({r.get("seed") for r in g.ok}, key=lambda s: (s is None, s))
    if len(seeds) < 2:
        return
    multi = [p for p in g.points if p.n_seeds > 1]
    alphas = {}
    for s in seeds:
        front = frontier_points(points_of([r for r in g.ok if r.get("seed") == s]))
        if len(front) >= MIN_BUDGETS:
            C, L, _ = _law_rows(front)
            law = _try(lambda: fit_compute_law(C, L), "per-seed fit")
            alphas[str(s)] = law.alpha if isinstance(law, ComputeLaw) else math.nan
    stds = [p.L_std for p in multi]
    g.seeds = SeedSpread(n_seeds=max(p.n_seeds for p in g.points), n_points=len(multi),
                         bpb_std_mean=float(np.mean(stds)) if stds else math.nan,
                         bpb_std_max=float(np.max(stds)) if stds else math.nan, alpha_per_seed=alphas)


def _agreement(g: GroupAnalysis) -> None:
    if not g.frontier:
        return
    top = g.frontier[-1]
    rows = []
    if g.fitted:
        rows.append({"approach": "L(C) on the frontier", "a": None, "a_ci": None,
                     "L_pred": float(g.law.predict(top.C)), "status": g.law.status})
    a1 = g.approach1
    if isinstance(a1, Envelope):
        fitted = not isinstance(a1.N_law, NoFit)
        rows.append({"approach": "approach 1 (envelope)", "a": a1.N_law.p if fitted else None, "a_ci": None,
                     "L_pred": a1.loss_at(top.C), "status": a1.N_law.status})
    iso = g.isoflop
    if isinstance(iso, IsoflopFit):
        fitted = not isinstance(iso.N_law, NoFit)
        last = [p for p in iso.bracketed if abs(math.log(p.C / top.budget)) <= math.log1p(0.01)]
        rows.append({"approach": "approach 2 (IsoFLOP)", "a": iso.N_law.p if fitted else None,
                     "a_ci": iso.N_law.ci.get("p") if fitted else None,
                     "L_pred": last[0].L_opt if last else math.nan, "status": iso.N_law.status})
    ch = g.chinchilla
    if isinstance(ch, ChinchillaLaw):
        al = ch.allocation(top.C)
        rows.append({"approach": "approach 3 (L(N, D))", "a": al.a, "a_ci": ch.boot.ci.get("a"),
                     "L_pred": float(al.L_opt), "status": ch.status})
    g.agreement = Agreement(C_max=top.C, L_actual=top.L, rows=rows)


def is_trunk(row: dict) -> bool:
    """A cooldown trunk: the shared stable phase of a size's branches, never a point of its own."""
    return row.get("role") == "trunk"


def analyse_group(key: str, vals: dict, rows: list[dict], *, n_boot: int, seed: int = 0,
                  trunks: Sequence[dict] = ()) -> GroupAnalysis:
    """Every fit of one group's rows (rows of excluded sweeps, recall probes and cooldown trunks
    already removed; the trunks come separately, for the compute they cost)."""
    ok = [r for r in rows if r["status"] == "done" and _finite(r["eval_bpb"]) and r["flops"] and r["params"]
          and r["tokens"]]
    ok_ids = {r["run_id"] for r in ok}
    incomplete = [r for r in rows if r["incomplete"]]
    failed = [r for r in rows if r["run_id"] not in ok_ids and not r["incomplete"] and r["status"] in ("failed", "done")]
    points = points_of(ok)
    g = GroupAnalysis(key=key, vals=vals, archs=sorted({str(r["arch"]) for r in rows}), ok=ok, failed=failed,
                      incomplete=incomplete, points=points, frontier=frontier_points(points),
                      law=NoFit(Status.INSUFFICIENT, "not fitted"))
    if len(g.archs) > 1:
        g.notes.append(f"this group mixes archs {g.archs} (add 'arch' to group_by to separate them)")
    for col in ("seq_len", "corpus_sha256", "objective"):
        seen = sorted({str(r.get(col)) for r in ok})
        if len(seen) > 1:
            g.notes.append(f"this group mixes {col} values {[v[:12] for v in seen]}: losses are not comparable "
                           f"across them (add {col} to group_by)")
    g.tokenizers = sorted({f"{r['tokenizer']}/{r['vocab_size']}" for r in ok if r.get("tokenizer")})
    if len(g.tokenizers) > 1:
        g.notes.append(f"this group mixes tokenizers {g.tokenizers}: bits per byte stays comparable across them "
                       "(the loss is normalised by the text bytes behind the tokens)")
    epochs = [r["epochs"] for r in ok if _finite(r.get("epochs"))]
    g.max_epochs = float(max(epochs)) if epochs else None
    g.data_flag = epochs_flag(epochs)
    if any(r.get("trunk_id") for r in ok):
        spent = sum(float(r["compute_spent"]) if _finite(r.get("compute_spent")) else float(r["flops"])
                    for r in [*ok, *trunks])
        g.compute_saved = spent / sum(float(r["flops"]) for r in ok)
    _compute_law(g, n_boot, seed)
    _isoflop(g, n_boot, seed)
    _approach1(g)
    _chinchilla(g, n_boot, seed)
    _seed_spread(g)
    _agreement(g)
    return g
