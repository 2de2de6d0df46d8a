"""The scaling-law report: re-fits everything in ROOT/results.sqlite (training nothing) and writes ROOT/report/.

- fits.json: one entry per group (per arch by default; ``group_by`` takes results columns and dotted config paths)
  with the compute law ``L(C) = E + A * C**(-alpha)`` fitted to the frontier (keys E, A, alpha), bootstrap
  intervals ``ci`` resampling whole points, ``status`` and ``flags`` (rules in ``sweeps.analysis.status``),
  ``reason`` when not fitted, run counts and the runs excluded, the leave-one-budget-out extrapolation (``loo``,
  ``extrapolation``), the IsoFLOP optima and N*(C), D*(C) laws (approach 2), approach 1 and approach 3 with their
  statuses, how the approaches agree, the seed spread, the compute saved by cooldown branches, the
  data-constrained flag, and the compute multiplier against the reference group.
- figures (PNG and PDF) and tables.md / tables.tex (``sweeps.analysis.plots``, ``sweeps.analysis.tables``);
  recall.json and a recall figure when the database holds ``data=mqar`` probe runs.
- summary.json: grouping, reference, figures, timing.

Runs of excluded sweeps (``lr_scan`` by default: tuning runs, tabulated separately) and recall-probe runs never
enter a fit. The report is written into a new directory next to ROOT/report and swapped in only once complete, so
a failure leaves the previous report as it was.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from archs.errors import ConfigError
from sweeps.analysis import plots, tables
from sweeps.analysis.approaches import AllocationLaw, Envelope, IsoflopFit, LeaveOneOut
from sweeps.analysis.group import GroupAnalysis, analyse_group, group_of, is_trunk, known_keys
from sweeps.analysis.laws import CHINCHILLA_LAW, LAW, ComputeLaw, Multiplier, compute_multiplier
from sweeps.analysis.recall import is_probe, recall_points
from sweeps.analysis.rows import load_rows
from sweeps.analysis.status import NoFit, Status
from sweeps.config import ReportConfig


# --- JSON ----------------------------------------------------------------------------------------------------


def clean(x: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [clean(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _ci(ci: dict, *keys: str) -> dict:
    return {k: list(ci.get(k, (None, None))) for k in keys}


def _nofit(x: NoFit) -> dict:
    return {"status": x.status, "reason": x.reason}


def _alloc(law: AllocationLaw | NoFit) -> dict:
    if isinstance(law, NoFit):
        return {"p": None, "G": None, "ci": [None, None], **_nofit(law)}
    return {"p": law.p, "G": law.G, "ci": list(law.ci.get("p", (None, None))), "status": law.status,
            "flags": law.flags, "n_points": law.n_points}


def _loo(loo: LeaveOneOut | None) -> dict | None:
    if not loo or not (loo.holdouts or loo.failed):
        return None
    return {"holdouts": [{"C": h.C, "predicted": h.predicted, "actual": h.actual, "error": h.error,
                          "rel_error": h.rel_error} for h in loo.holdouts],
            "mae": loo.mae, "mean_abs_rel_error": loo.mean_abs_rel_error, "failed": loo.failed}


def _isoflop(iso: IsoflopFit | NoFit) -> dict:
    if isinstance(iso, NoFit):
        return {"budgets": [], "skipped": [], "a": None, "G": None, "b": None, "G_prime": None, "ci": {},
                "reason": iso.reason, "status": iso.status}
    n, d = _alloc(iso.N_law), _alloc(iso.D_law)
    out = {
        "budgets": [dict(C=p.C, N_opt=p.N_opt, D_opt=p.D_opt, L_opt=p.L_opt, tokens_per_param=p.D_opt / p.N_opt,
                         in_range=p.in_range, bracketed=p.bracketed, coef=list(p.coef), n_points=p.n_points)
                    for p in iso.parabolas],
        "skipped": iso.skipped, "a": n["p"], "G": n["G"], "b": d["p"], "G_prime": d["G"],
        "ci": {"a": n["ci"], "b": d["ci"]}, "status": n["status"], "flags": n.get("flags", []) + d.get("flags", []),
        "n_bracketed": len(iso.bracketed),
        "law": "N*(C) = G * C**a, D*(C) = G_prime * C**b (N = all parameters), from bracketed optima only",
    }
    if "reason" in n:
        out["reason"] = n["reason"]
    return out


def _approach1(a1: Envelope | NoFit) -> dict:
    if isinstance(a1, NoFit):
        return _nofit(a1)
    n, d = _alloc(a1.N_law), _alloc(a1.D_law)
    out = {"a": n["p"], "G": n["G"], "b": d["p"], "G_prime": d["G"], "n_grid_used": int(a1.C.size),
           "sizes_won": a1.sizes_won, "source": a1.source, "status": n["status"],
           "flags": n.get("flags", []) + d.get("flags", [])}
    if "reason" in n:
        out["reason"] = n["reason"]
    return out


def _chinchilla(g: GroupAnalysis) -> dict:
    ch = g.chinchilla
    if isinstance(ch, NoFit):
        return _nofit(ch)
    out = {k: getattr(ch, k) for k in ("E", "A", "B", "alpha", "beta")}
    al = ch.allocation(g.frontier[-1].C) if g.frontier else None
    out.update(law=CHINCHILLA_LAW, status=ch.status, flags=ch.flags, n_runs=ch.n_rows,
               ci=_ci(ch.boot.ci, "E", "A", "B", "alpha", "beta"), n_bootstrap=ch.boot.n,
               allocation={"a": None if al is None else al.a, "b": None if al is None else al.b,
                           "ci": _ci(ch.boot.ci, "a", "b")},
               rms_log_residual=ch.rms_log_residual, loo=_loo(g.chinchilla_loo))
    if ch.flags:
        out["reason"] = "; ".join(ch.flags)
    return out


def fits_entry(g: GroupAnalysis) -> dict:
    """The fits.json entry of one group."""
    law = g.law
    fitted = isinstance(law, ComputeLaw)
    e: dict[str, Any] = {
        "E": law.E if fitted else None, "A": law.A if fitted else None, "alpha": law.alpha if fitted else None,
        "ci": _ci(law.boot.ci if fitted else {}, "E", "A", "alpha"),
        "status": g.status, "reason": None if fitted else law.reason, "flags": law.flags if fitted else [],
        "law": LAW, "loss": tables.LOSS, "group": g.vals, "archs": g.archs,
        "n_runs": len(g.ok), "n_points": len(g.points), "n_failed": len(g.failed), "n_incomplete": len(g.incomplete),
        "failed_runs": [{"run_id": r["run_id"], "error": r.get("error") or "no final eval_bpb"} for r in g.failed],
        "incomplete_runs": [r["run_id"] for r in g.incomplete],
        "n_budgets": len(g.frontier),
        "frontier": {"budget": [p.budget for p in g.frontier], "C": [p.C for p in g.frontier],
                     "L": [p.L for p in g.frontier], "L_std": [p.L_std for p in g.frontier],
                     "n_seeds": [p.n_seeds for p in g.frontier], "run_id": [p.rows[0]["run_id"] for p in g.frontier],
                     "params": [p.rows[0]["params"] for p in g.frontier],
                     "tokens": [p.rows[0]["tokens"] for p in g.frontier]},
        "tokens_per_param": {"frontier_runs": [p.D / p.N for p in g.frontier]},
        "max_epochs": g.max_epochs, "data_constrained": g.data_flag is not None,
        "tokenizers": g.tokenizers, "compute_saved": g.compute_saved,
    }
    if g.data_flag:
        e["flags"] = e["flags"] + [g.data_flag]
    if fitted:
        e.update(ci_level=law.boot.level, n_bootstrap=law.boot.n, n_bootstrap_requested=law.boot.n_requested,
                 rms_log_residual=law.rms_log_residual)
        e["frontier"]["residual_log"] = np.log(e["frontier"]["L"]) - np.log(law.predict(e["frontier"]["C"]))
    e["loo"] = _loo(g.loo)
    ex = g.extrapolation
    if ex is not None:
        e["extrapolation"] = {"C_heldout": ex.C, "predicted": ex.predicted, "actual": ex.actual,
                              "rel_error": ex.rel_error}
    e["isoflop"] = _isoflop(g.isoflop)
    if isinstance(g.isoflop, IsoflopFit):
        e["tokens_per_param"]["isoflop"] = [p.D_opt / p.N_opt for p in g.isoflop.bracketed]
    e["approach1"] = _approach1(g.approach1)
    e["chinchilla"] = _chinchilla(g)
    if g.agreement is not None:
        e["agreement"] = {"C_max": g.agreement.C_max, "L_actual": g.agreement.L_actual, "approaches": g.agreement.rows}
    if g.seeds is not None:
        e["seeds"] = {**asdict(g.seeds), "alpha_std": g.seeds.alpha_std}
    if g.multiplier is not None:
        e["compute_multiplier"] = asdict(g.multiplier)
        if g.key == g.multiplier.reference:
            e["compute_multiplier"]["note"] = "reference group"
    if g.notes:
        e["note"] = " ; ".join(g.notes)
    return e


# --- the report ----------------------------------------------------------------------------------------------


def _check_group_by(rows: list[dict], group_by: list[str]) -> None:
    cols, paths = known_keys(rows)
    for k in group_by:
        if k in cols or k in paths:
            continue
        close = difflib.get_close_matches(k, cols + paths, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"group_by key {k!r} is neither a results column nor a config path of any run{hint}; "
                          f"columns: {', '.join(cols)}; config paths: {', '.join(paths)}")


def _reference(groups: dict[str, GroupAnalysis], reference: str) -> str | None:
    if reference:
        return reference
    fitted = [k for k, g in groups.items() if g.fitted]
    for k in fitted:
        if k == "ar" or groups[k].vals.get("arch") == "ar":
            return k
    return fitted[0] if fitted else None


def _multipliers(groups: dict[str, GroupAnalysis], ref: str | None) -> None:
    if ref is None:
        return
    r = groups[ref]
    r.multiplier = Multiplier(reference=ref, multiplier=1.0, reason="reference group")
    if not r.fitted:
        r.multiplier.reason = f"reference group has no compute law: {r.law.reason}"
        r.multiplier.multiplier = None
        return
    for k, g in groups.items():
        if k == ref:
            continue
        if not g.fitted:
            g.multiplier = Multiplier(reference=ref, reason=f"no compute law for {k}: {g.law.reason}")
            continue
        L_common = max(min(p.L for p in r.frontier), min(p.L for p in g.frontier))
        g.multiplier = compute_multiplier(g.law, r.law, L_common, ref)


def analyse(cfg: ReportConfig) -> tuple[list[dict], dict[str, GroupAnalysis], str | None]:
    """(rows, groups by key, reference group) of the database under cfg.root."""
    rows = load_rows(cfg.root)
    _check_group_by(rows, cfg.group_by)
    exclude = set(cfg.exclude_sweeps)
    members: dict[str, tuple[dict, list[dict]]] = {}
    trunks: dict[str, list[dict]] = {}
    for r in rows:
        if is_probe(r):
            continue
        key, vals = group_of(r, cfg.group_by)
        if is_trunk(r):
            trunks.setdefault(key, []).append(r)
            continue
        members.setdefault(key, (vals, []))
        if r.get("sweep") not in exclude:
            members[key][1].append(r)
    if cfg.reference and cfg.reference not in members:
        raise ConfigError(f"reference={cfg.reference!r} is not a group of this report; groups: {', '.join(members)}")
    groups = {}
    for key in sorted(members):
        vals, grows = members[key]
        groups[key] = analyse_group(key, vals, grows, n_boot=cfg.bootstrap, seed=cfg.seed, trunks=trunks.get(key, ()))
        if not grows:
            groups[key].law = NoFit(Status.INSUFFICIENT, "all runs of this group belong to excluded sweeps "
                                                        f"({', '.join(sorted(exclude))})")
    ref = _reference(groups, cfg.reference)
    _multipliers(groups, ref)
    return rows, groups, ref


def _write(out: Path, cfg: ReportConfig, rows: list[dict], groups: dict[str, GroupAnalysis], ref: str | None,
           t0: float) -> None:
    glist = list(groups.values())
    lr_rows = [r for r in rows if r.get("sweep") == "lr_scan"]
    probes = recall_points(rows)
    (out / "fits.json").write_text(json.dumps(clean({k: fits_entry(g) for k, g in groups.items()}), indent=1) + "\n")
    if probes:
        (out / "recall.json").write_text(json.dumps(clean([asdict(p) for p in probes]), indent=1) + "\n")
    tables.write_tables(out, tables.build_tables(glist, group_by=cfg.group_by, reference=ref, lr_rows=lr_rows,
                                                 recall=probes), n_rows=len(rows), group_by=cfg.group_by)
    drawn = plots.draw_all(out, glist, lr_rows=lr_rows, recall_points=probes) if cfg.figures else []
    meta = {"root": str(cfg.root), "group_by": cfg.group_by, "reference": ref, "n_rows": len(rows),
            "excluded_sweeps": sorted(cfg.exclude_sweeps), "n_bootstrap": cfg.bootstrap, "law": LAW,
            "loss": tables.LOSS, "created_at": time.time(), "figures": drawn, "seconds": time.time() - t0}
    (out / "summary.json").write_text(json.dumps(clean(meta), indent=1) + "\n")


def _make(cfg: ReportConfig) -> tuple[Path, dict[str, GroupAnalysis]]:
    t0 = time.time()
    rows, groups, ref = analyse(cfg)
    root = Path(cfg.root)
    final = root / "report"
    tmp = Path(tempfile.mkdtemp(prefix=".report-new-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the report is as readable as any directory made here
    old = None
    try:
        _write(tmp, cfg, rows, groups, ref, t0)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".report-old-", dir=root))
            final.rename(old / "report")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            (old / "report").rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final, groups


def make_report(cfg: ReportConfig) -> Path:
    """Fit and draw everything in ROOT/results.sqlite into ROOT/report, swapped in only when complete."""
    return _make(cfg)[0]


def _r(x: float | None, nd: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{nd}g}"


def _short(approach: str) -> str:
    return approach.split(" (")[0]


def summary_lines(groups: dict[str, GroupAnalysis]) -> list[str]:
    """One line per group with its compute law, then how the approaches agree."""
    out = []
    for k, g in groups.items():
        law = g.law
        if not isinstance(law, ComputeLaw):
            out.append(f"{k}: no fit: {law.reason}")
            continue
        lo, hi = law.boot.ci.get("alpha", (math.nan, math.nan))
        ci = "n/a" if not math.isfinite(lo) else f"{round(lo, 4)}..{round(hi, 4)}"
        loo = f"; LOO extrapolation MAE {g.loo.mae:.4f} bpb" if g.loo and g.loo.holdouts else ""
        tag = "" if g.status == "ok" else f" [{g.status}: {'; '.join(law.flags)}]"
        out.append(f"{k}: L(C) = {law.E:.4g} + {law.A:.4g} C^-{law.alpha:.4f}  (alpha 95% CI {ci}; {len(g.ok)} runs"
                   f"{loo}){tag}")
        if g.agreement and len(g.agreement.rows) > 1:
            ag = g.agreement
            preds = ", ".join(f"{_short(r['approach'])} {_r(r['L_pred'])}" for r in ag.rows)
            exps = ", ".join(f"{_short(r['approach'])} {_r(r['a'], 3)}" + ("" if r["status"] == "ok" else f" ({r['status']})")
                             for r in ag.rows if r["a"] is not None or "approach" in r["approach"])
            out.append(f"{k}: at C={ag.C_max:.3g}, L={ag.L_actual:.4g}; predicted: {preds}; N* ~ C^a: {exps}")
        if g.seeds is not None:
            out.append(f"{k}: {g.seeds.n_seeds} seeds: bpb std {_r(g.seeds.bpb_std_mean, 3)} (mean over points), "
                       f"alpha std over seeds {_r(g.seeds.alpha_std, 3)}")
        if g.compute_saved is not None:
            out.append(f"{k}: cooldown branches: compute spent / flops = {g.compute_saved:.3f}")
    return out


def main(cfg: ReportConfig) -> int:
    """Make the report and print the per-group summary on stderr; a bad config or input raises ConfigError."""
    out, groups = _make(cfg)
    for line in summary_lines(groups):
        print(line, file=sys.stderr)
    print(f"report written to {out}", file=sys.stderr)
    return 0
