"""The scaling-law report: `python -m sweeps.report root=DIR [group_by=KEY[,KEY...]] [bootstrap=N] [reference=GROUP]`.

Re-fits everything in DIR/results.sqlite without training anything (`sweeps.run` calls the same
`make_report` at the end of a sweep) and writes DIR/report/:

- fits.json: one entry per arch (or per group when grouping by config keys) with the compute law
  `L(C) = E + A * C**(-alpha)` (keys E, A, alpha), bootstrap confidence intervals `ci` (>= 1000
  resamples by default), `n_runs` (finished runs used; failed ones excluded and listed under
  `failed_runs`), the IsoFLOP (approach 2) optima and N*(C), D*(C) laws, approach 1 and 3 fits
  when the data allow, and the compute multiplier against the reference group. An entry that cannot
  be fitted keeps the keys (null values) and says why in `reason`.
- figures (PNG and PDF): loss_vs_compute, isoflop, optimal_allocation, residuals, curves
  (and lr_scan when the database holds a learning-rate scan).
- tables.md and tables.tex: fitted parameters with CIs, compute multipliers at a common loss,
  compute-optimal tokens per parameter, losses at matched compute, learning-rate scans, failed runs.

Conventions: loss = final held-out bits per byte (`eval_bpb`; for diffusion the NELBO upper bound);
C = training FLOPs by the analytic count (archs/flops.py), N = all parameters (the FLOP count
includes the embedding and the output head), D = training tokens. The compute law is fitted to the
compute frontier: the lowest loss at each sweep budget (runs outside a sweep count at their own
FLOPs). Runs of `lr_scan` sweeps are tuning runs: they are excluded from the scaling fits (see
`exclude_sweeps`) and tabulated separately.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from archs.errors import ConfigError

LAW = "L(C) = E + A * C**(-alpha)"
LOSS = "held-out bits per byte (eval_bpb; for diffusion the NELBO upper bound)"
MIN_BUDGETS = 3  # the compute law has 3 parameters
DEFAULT_EXCLUDE = ("lr_scan",)


# --- rows and groups -----------------------------------------------------------------------------


def load_rows(root: str | Path) -> list[dict]:
    """Every row of ROOT/results.sqlite, with `config` parsed and the eval curve attached."""
    from sweeps.engine.records import ResultsDB

    path = Path(root) / "results.sqlite"
    if not path.exists():
        raise ConfigError(f"no results database at {path}; run a sweep with root={root} first")
    db = ResultsDB(root)
    db.mark_dead()  # `running` rows whose process is gone become failed (interrupted; a re-run resumes them)
    rows = db.rows()
    for r in rows:
        try:
            r["config"] = json.loads(r["config"]) if r.get("config") else {}
        except (TypeError, ValueError):
            r["config"] = {}
        r["evals"] = db.evals(r["run_id"]) if r["status"] == "done" else []
    return rows


def parse_group_by(value: Any) -> list[str]:
    """'arch', 'arch,arch.pattern', '[arch,pattern]' or a list -> list of keys."""
    if value is None or value == "":
        return ["arch"]
    if isinstance(value, str):
        value = value.strip().strip("[]")
        keys = [k.strip().strip("'\"") for k in value.split(",")]
    else:
        keys = [str(k) for k in value]
    keys = [k for k in keys if k]
    return keys or ["arch"]


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


# --- numbers -------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_clean(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def law(C, E, A, alpha):
    return E + A * np.power(np.asarray(C, dtype=float), -alpha)


def compute_for_loss(L: float, E, A, alpha):
    """C(L) = (A / (L - E))^(1 / alpha); inf where the law never reaches L (L <= E)."""
    E, A, alpha = (np.asarray(v, dtype=float) for v in (E, A, alpha))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.power(A / (L - E), 1.0 / alpha)
    return np.where(L > E, out, np.inf)


def _ci(samples: np.ndarray, level: float = 0.95) -> list[float | None]:
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if not s.size:
        return [None, None]
    q = 100 * (1 - level) / 2
    return [float(np.percentile(s, q)), float(np.percentile(s, 100 - q))]


# --- per-group analysis --------------------------------------------------------------------------


def _budget_key(row: dict) -> float:
    return float(row["budget"]) if row.get("budget") else float(row["flops"])


def _frontier(runs: list[dict]) -> list[dict]:
    """The lowest-loss finished run at each budget, by budget."""
    best: dict[float, dict] = {}
    for r in runs:
        k = _budget_key(r)
        if k not in best or r["eval_bpb"] < best[k]["eval_bpb"]:
            best[k] = r
    return [best[k] for k in sorted(best)]


def analyse_group(key: str, vals: dict, rows: list[dict], *, n_boot: int, seed: int = 0) -> tuple[dict, dict]:
    """(fits.json entry, private extras for plots and tables) for one group."""
    from sweeps import fit as F

    ok = [r for r in rows if r["status"] == "done" and r["eval_bpb"] is not None and math.isfinite(r["eval_bpb"])
          and r["flops"]]
    from sweeps.engine.records import INTERRUPTED_PREFIXES

    def is_resumable(r):
        return str(r.get("error") or "").startswith(INTERRUPTED_PREFIXES)

    ok_ids = {r["run_id"] for r in ok}
    # interrupted (killed, preempted) runs are incomplete, not failed: re-running the sweep resumes them
    incomplete = [r for r in rows if r["status"] == "running" or (r["status"] == "failed" and is_resumable(r))]
    inc_ids = {r["run_id"] for r in incomplete}
    failed = [r for r in rows if r["run_id"] not in ok_ids and r["run_id"] not in inc_ids
              and r["status"] in ("failed", "done")]
    entry: dict[str, Any] = {
        "E": None, "A": None, "alpha": None, "ci": {"E": [None, None], "A": [None, None], "alpha": [None, None]},
        "status": "ok", "reason": None, "law": LAW, "loss": LOSS, "group": vals,
        "archs": sorted({str(r["arch"]) for r in rows}),
        "n_runs": len(ok), "n_failed": len(failed), "n_incomplete": len(incomplete),
        "failed_runs": [{"run_id": r["run_id"], "error": r.get("error") or "no final eval_bpb"} for r in failed],
        "incomplete_runs": [r["run_id"] for r in incomplete],
    }
    extras: dict[str, Any] = {"ok": ok, "failed": failed, "frontier": [], "boot": None, "isoflop": None}
    notes = []
    if len(entry["archs"]) > 1:
        notes.append(f"this group mixes archs {entry['archs']} (add 'arch' to group_by to separate them)")
    for col in ("seq_len", "corpus_sha256", "objective"):
        seen = sorted({str(r.get(col)) for r in ok})
        if len(seen) > 1:
            notes.append(f"this group mixes {col} values {[v[:12] for v in seen]}: losses are not comparable "
                         f"across them (add {col} to group_by)")

    front = _frontier(ok)
    extras["frontier"] = front
    Cf = np.array([r["flops"] for r in front], dtype=float)
    Lf = np.array([r["eval_bpb"] for r in front], dtype=float)
    entry["n_budgets"] = len(front)
    entry["frontier"] = {"budget": [_budget_key(r) for r in front], "C": Cf, "L": Lf,
                         "run_id": [r["run_id"] for r in front], "params": [r["params"] for r in front],
                         "tokens": [r["tokens"] for r in front]}
    entry["tokens_per_param"] = {"frontier_runs": [r["tokens"] / r["params"] for r in front]}

    # Compute law on the frontier, with bootstrap CIs.
    if not ok:
        entry.update(status="insufficient", reason="no finished runs" + (" (all failed)" if failed else ""))
    elif len(front) < MIN_BUDGETS:
        entry.update(status="insufficient",
                     reason=f"only {len(front)} distinct compute budget(s) with finished runs; the 3-parameter law "
                            f"{LAW} needs at least {MIN_BUDGETS}")
    else:
        try:
            res = F.fit_compute_law_bootstrap(Cf, Lf, n=n_boot, seed=seed, frontier=False)
            entry.update(E=res["E"], A=res["A"], alpha=res["alpha"],
                         ci={k: list(res["ci"][k]) for k in ("E", "A", "alpha")}, ci_level=res["ci_level"],
                         n_bootstrap=res["n"], n_bootstrap_requested=res["n_requested"],
                         rms_log_residual=res["fit"].get("rms_log_residual"))
            extras["boot"] = res
            if len(front) == MIN_BUDGETS:
                notes.append("3 budgets for 3 parameters: the law interpolates them exactly; the CIs are "
                             "bootstrap percentiles of a saturated fit (add budgets for meaningful intervals)")
            pred = law(Cf, res["E"], res["A"], res["alpha"])
            entry["frontier"]["residual_log"] = np.log(Lf) - np.log(pred)
        except Exception as e:  # noqa: BLE001 - the report writes what it can
            entry.update(status="fit_failed", reason=f"compute-law fit failed: {type(e).__name__}: {e}")
        if len(front) >= MIN_BUDGETS + 1 and entry["status"] == "ok":
            try:
                ex = F.extrapolation_check(Cf, Lf, frontier=False)
                entry["extrapolation"] = {k: ex[k] for k in ("C_heldout", "predicted", "actual", "rel_error")}
            except Exception as e:  # noqa: BLE001
                entry["extrapolation"] = {"reason": f"{type(e).__name__}: {e}"}

    # Approach 2: IsoFLOP parabolas per budget (runs of a sweep only: their budget is exact).
    swept = [r for r in ok if r.get("budget")]
    if swept:
        C = np.array([r["budget"] for r in swept], dtype=float)
        N = np.array([r["params"] for r in swept], dtype=float)
        D = np.array([r["tokens"] for r in swept], dtype=float)
        L = np.array([r["eval_bpb"] for r in swept], dtype=float)
        try:
            iso = F.fit_isoflop(C, N, L, D=D, rtol=0.01, n_boot=n_boot, seed=seed)
            extras["isoflop"] = iso
            entry["isoflop"] = {
                "budgets": [dict(C=b["C"], N_opt=b["N_opt"], D_opt=b["D_opt"], L_opt=b["L_opt"],
                                 tokens_per_param=b["D_opt"] / b["N_opt"], in_range=b["in_range"],
                                 coef=b["coef"], n_points=b["n_points"]) for b in iso["budgets"]],
                "skipped": iso["skipped"], "a": iso["a"], "G": iso["G"], "b": iso["b"], "G_prime": iso["G_prime"],
                "ci": {k: list(v) for k, v in iso.get("ci", {}).items()},
                "law": "N*(C) = G * C**a, D*(C) = G_prime * C**b (N = all parameters)",
            }
            if len(iso["budgets"]) < 2:
                entry["isoflop"]["reason"] = (f"{len(iso['budgets'])} budget(s) with a convex parabola over >= 3 sizes; "
                                              "N*(C) and D*(C) need at least 2")
            entry["tokens_per_param"]["isoflop"] = [b["D_opt"] / b["N_opt"] for b in iso["budgets"]]
        except Exception as e:  # noqa: BLE001
            entry["isoflop"] = {"reason": f"IsoFLOP fit failed: {type(e).__name__}: {e}"}
    else:
        entry["isoflop"] = {"reason": "no sweep runs (runs with a budget)"}

    # Approach 1: envelope of the held-out curves.
    curves = [{"flops": [e["flops"] for e in r["evals"]], "loss": [e["eval_bpb"] for e in r["evals"]],
               "tokens": [e["tokens"] for e in r["evals"]], "params": r["params"]}
              for r in ok if len(r["evals"]) >= 2]
    if len({c["params"] for c in curves}) >= 3:
        try:
            a1 = F.fit_approach1(curves)
            entry["approach1"] = {k: a1[k] for k in ("a", "G", "b", "G_prime", "n_grid_used")}
        except Exception as e:  # noqa: BLE001
            entry["approach1"] = {"reason": f"{type(e).__name__}: {e}"}
    else:
        entry["approach1"] = {"reason": "needs held-out curves of at least 3 model sizes"}

    # Approach 3: parametric L(N, D), when the grid is rich enough for 5 parameters.
    Ns = {r["params"] for r in ok}
    Ds = {r["tokens"] for r in ok}
    if len(ok) >= 8 and len(Ns) >= 3 and len(Ds) >= 3:
        try:
            ch = F.fit_chinchilla([r["params"] for r in ok], [r["tokens"] for r in ok], [r["eval_bpb"] for r in ok])
            entry["chinchilla"] = {k: ch[k] for k in ("E", "A", "B", "alpha", "beta")}
            entry["chinchilla"]["law"] = "L(N, D) = E + A / N**alpha + B / D**beta"
            if not (ch["alpha"] > 0 and ch["beta"] > 0):
                entry["chinchilla"]["reason"] = ("degenerate fit (an exponent <= 0): the grid does not constrain "
                                                 "L(N, D); widen the sizes around the compute-optimal ones")
        except Exception as e:  # noqa: BLE001
            entry["chinchilla"] = {"reason": f"{type(e).__name__}: {e}"}
    else:
        entry["chinchilla"] = {"reason": "needs >= 8 finished runs over >= 3 sizes and >= 3 token counts"}

    if notes:
        entry["note"] = " ; ".join(notes)
    return entry, extras


# --- cross-group comparisons ----------------------------------------------------------------------


def pick_reference(entries: dict[str, dict], reference: str | None) -> str | None:
    fitted = [k for k, e in entries.items() if e["status"] == "ok"]
    if reference:
        if reference not in entries:
            raise ConfigError(f"reference={reference!r} is not a group of this report; groups: {', '.join(entries)}")
        return reference
    for k in fitted:
        if k == "ar" or entries[k]["group"].get("arch") == "ar":
            return k
    return fitted[0] if fitted else None


def compute_multipliers(entries: dict[str, dict], extras: dict[str, dict], ref: str | None) -> dict[str, dict]:
    """C_group(L) / C_ref(L) from the fitted laws at the lowest loss both groups reached."""
    out: dict[str, dict] = {}
    if ref is None or entries[ref]["status"] != "ok":
        return out
    er, br = entries[ref], extras[ref]["boot"]
    for k, e in entries.items():
        if k == ref:
            continue
        m: dict[str, Any] = {"reference": ref, "L": None, "multiplier": None, "ci": [None, None]}
        out[k] = m
        if e["status"] != "ok":
            m["reason"] = f"no compute law for {k}: {e['reason']}"
            continue
        L_common = max(min(er["frontier"]["L"]), min(e["frontier"]["L"]))
        m["L"] = float(L_common)
        c_ref = float(compute_for_loss(L_common, er["E"], er["A"], er["alpha"]))
        c_g = float(compute_for_loss(L_common, e["E"], e["A"], e["alpha"]))
        m.update(C_reference=c_ref, C_group=c_g)
        if not (math.isfinite(c_ref) and math.isfinite(c_g)):
            m["reason"] = f"a fitted law does not reach L={L_common:.4g} (its E is above it)"
            continue
        m["multiplier"] = c_g / c_ref
        sg, sr = extras[k]["boot"]["samples"], br["samples"]
        n = min(len(sg["E"]), len(sr["E"]))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (compute_for_loss(L_common, sg["E"][:n], sg["A"][:n], sg["alpha"][:n])
                     / compute_for_loss(L_common, sr["E"][:n], sr["A"][:n], sr["alpha"][:n]))
        m["ci"] = _ci(ratio)
        m["n_bootstrap"] = int(np.isfinite(ratio).sum())
    return out


# --- tables --------------------------------------------------------------------------------------


def _num(x: Any, kind: str = "g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    x = float(x)
    if kind == "sci":
        return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
    if kind == "exp":
        return f"{x:.3f}"
    if kind == "x":
        return f"{x:.3g}x"
    return f"{x:.4g}"


def _with_ci(v: Any, ci: Sequence | None, kind: str) -> str:
    s = _num(v, kind)
    if ci and ci[0] is not None and ci[1] is not None:
        s += f" [{_num(ci[0], kind)}, {_num(ci[1], kind)}]"
    return s


def _tex_escape(s: str) -> str:
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
           "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(rep.get(c, c) for c in str(s))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _tex_table(caption: str, label: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cols = "l" + "r" * (len(header) - 1)
    body = [" & ".join(_tex_escape(c) for c in header) + r" \\", r"\midrule"]
    body += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows]
    return "\n".join([
        r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{_tex_escape(caption)}}}", rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{cols}}}", r"\toprule", *body, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def build_tables(entries: dict[str, dict], rows: list[dict], *, group_by: Sequence[str], reference: str | None,
                 lr_rows: list[dict]) -> list[tuple[str, str, str, list[str], list[list[str]]]]:
    """(title, caption, label, header, rows) of every table of the report."""
    out = []
    t = []
    for k, e in entries.items():
        note = e["reason"] or e.get("note") or ""
        t.append([k, str(e["n_runs"]), str(e.get("n_budgets", 0)), _with_ci(e["E"], e["ci"]["E"], "g"),
                  _with_ci(e["A"], e["ci"]["A"], "sci"), _with_ci(e["alpha"], e["ci"]["alpha"], "exp"),
                  str(e["n_failed"]), note])
    lvl = next((int(round(100 * e.get("ci_level", 0.95))) for e in entries.values() if e.get("ci_level")), 95)
    out.append(("Fitted compute laws",
                f"Compute law {LAW} fitted to the compute frontier (lowest loss per budget); loss in held-out "
                f"bits per byte, C in training FLOPs. Brackets: {lvl}% bootstrap percentile intervals.",
                "tab:compute-laws", ["group", "runs", "budgets", "E", "A", "alpha", "failed", "notes"], t))

    t = []
    for k, e in entries.items():
        m = e.get("compute_multiplier")
        if not m or k == reference:
            continue
        t.append([k, _num(m.get("L")), _num(m.get("C_reference"), "sci"), _num(m.get("C_group"), "sci"),
                  _with_ci(m.get("multiplier"), m.get("ci"), "x"), m.get("reason", "")])
    if reference is not None:
        out.append((f"Compute multiplier relative to {reference}",
                    f"C_group(L*) / C_{reference}(L*) from the fitted laws, at L* = the lowest loss both groups "
                    "reached (bits per byte). For reference, Nie et al. (2024) report that masked diffusion needs "
                    "about 16x the compute of autoregressive models for the same loss.",
                    "tab:compute-multiplier",
                    ["group", "L*", f"C_{reference}(L*)", "C_group(L*)", "multiplier", "notes"], t))

    t = []
    for k, e in entries.items():
        iso = e.get("isoflop") or {}
        per_budget = "; ".join(f"{b['C']:.2g}: {b['tokens_per_param']:.3g}" + ("" if b["in_range"] else "*")
                               for b in iso.get("budgets", []))
        front = "; ".join(f"{c:.2g}: {tp:.3g}" for c, tp in zip(e["frontier"]["budget"],
                                                                 e["tokens_per_param"]["frontier_runs"]))
        ci = iso.get("ci", {})
        t.append([k, _with_ci(iso.get("a"), ci.get("a"), "exp"), _with_ci(iso.get("b"), ci.get("b"), "exp"),
                  per_budget or "n/a", front or "n/a", iso.get("reason", "")])
    out.append(("Compute-optimal allocation",
                "IsoFLOP (approach 2): N*(C) ~ C^a and D*(C) ~ C^b from per-budget parabolas of loss in log N "
                "(N = all parameters). Tokens per parameter D*/N* per budget C (* = optimum outside the sizes "
                "trained), and D/N of the lowest-loss run at each budget.",
                "tab:compute-optimal", ["group", "a", "b", "D*/N* (IsoFLOP)", "D/N (best run)", "notes"], t))

    budgets = sorted({b for e in entries.values() for b in e["frontier"]["budget"]})
    if budgets:
        keys = list(entries)
        t = []
        for c in budgets:
            row = [f"{c:.3g}"]
            for k in keys:
                fb = entries[k]["frontier"]
                row.append(_num(fb["L"][fb["budget"].index(c)]) if c in fb["budget"] else "")
            t.append(row)
        out.append(("Loss at matched compute",
                    "Lowest held-out bits per byte at each compute budget (training FLOPs), per group: an "
                    f"ablation at matched compute (grouped by {', '.join(group_by)}).",
                    "tab:matched-compute", ["C (FLOPs)", *keys], t))

    if lr_rows:
        t = []
        for r in sorted(lr_rows, key=lambda r: (str(r["arch"]), str(r.get("size")), row_value(r, "optim.lr") or 0)):
            t.append([str(r["arch"]), str(r.get("size")), _num(row_value(r, "optim.lr")), _num(r.get("lr")),
                      _num(r.get("eval_bpb")) if r["status"] == "done" else r["status"]])
        out.append(("Learning-rate scans",
                    "lr_scan sweeps: base rate optim.lr (at width 128) and the peak rate used after the width "
                    "rule lr * (128 / d_model)^0.5; held-out bits per byte.",
                    "tab:lr-scan", ["arch", "size", "optim.lr", "peak lr", "bpb"], t))

    t = []
    for k, e in entries.items():
        t += [[f["run_id"], k, "failed", (f["error"] or "")[:120]] for f in e["failed_runs"]]
        t += [[rid, k, "incomplete", "still running or interrupted"] for rid in e["incomplete_runs"]]
    out.append(("Failed and incomplete runs", "Runs excluded from every fit.", "tab:failed",
                ["run", "group", "status", "error"], t))
    return out


def write_tables(out: Path, entries: dict[str, dict], rows: list[dict], *, group_by: Sequence[str],
                 reference: str | None, lr_rows: list[dict]) -> None:
    tabs = build_tables(entries, rows, group_by=group_by, reference=reference, lr_rows=lr_rows)
    md = ["# Scaling-law report", "",
          f"Loss: {LOSS}. Compute: training FLOPs (analytic count, archs/flops.py). Groups: {', '.join(group_by)}. "
          f"{len(rows)} runs in the database.", ""]
    tex = ["% Scaling-law report tables (needs \\usepackage{booktabs})", ""]
    for title, caption, label, header, body in tabs:
        md += [f"## {title}", "", caption, ""]
        md += [_md_table(header, body) if body else "(none)", ""]
        if body:
            tex.append(_tex_table(caption, label, header, body))
    (out / "tables.md").write_text("\n".join(md))
    (out / "tables.tex").write_text("\n".join(tex))


# --- the report ----------------------------------------------------------------------------------


def make_report(root: str | Path, *, group_by: Iterable[str] | str | None = ("arch",), n_boot: int = 1000,
                reference: str | None = None, exclude_sweeps: Iterable[str] = DEFAULT_EXCLUDE, seed: int = 0,
                figures: bool = True) -> Path:
    """Fit and draw everything in ROOT/results.sqlite into ROOT/report; returns that directory."""
    t0 = time.time()
    root = Path(root)
    group_by = parse_group_by(group_by if not isinstance(group_by, (list, tuple)) else list(group_by))
    exclude = set(exclude_sweeps or ())
    rows = load_rows(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)

    scaling = {r["run_id"] for r in rows if r.get("sweep") not in exclude}
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for r in rows:
        key, vals = group_of(r, group_by)
        groups.setdefault(key, (vals, []))
        if r["run_id"] in scaling:
            groups[key][1].append(r)
    entries, extras = {}, {}
    for key in sorted(groups):
        vals, grows = groups[key]
        entries[key], extras[key] = analyse_group(key, vals, grows, n_boot=n_boot, seed=seed)
        if not grows:
            entries[key].update(status="insufficient",
                                reason=f"all runs of this group belong to excluded sweeps ({', '.join(sorted(exclude))})")
    ref = pick_reference(entries, reference)
    mult = compute_multipliers(entries, extras, ref)
    for k, m in mult.items():
        entries[k]["compute_multiplier"] = m
    if ref is not None:
        entries[ref]["compute_multiplier"] = {"reference": ref, "multiplier": 1.0, "note": "reference group"}

    lr_rows = [r for r in rows if r.get("sweep") == "lr_scan"]
    meta = {"root": str(root), "group_by": group_by, "reference": ref, "n_rows": len(rows),
            "excluded_sweeps": sorted(exclude), "n_bootstrap": n_boot, "law": LAW, "loss": LOSS,
            "created_at": time.time()}
    (out / "fits.json").write_text(json.dumps(_clean(entries), indent=1, sort_keys=False) + "\n")

    write_tables(out, entries, rows, group_by=group_by, reference=ref, lr_rows=lr_rows)
    drawn = []
    if figures:
        from sweeps import plots

        drawn = plots.draw_all(out, entries, extras, rows=rows, lr_rows=lr_rows, group_by=group_by)
    meta["figures"] = drawn
    meta["seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(_clean(meta), indent=1) + "\n")
    return out


# --- command line ---------------------------------------------------------------------------------

USAGE = ("usage: python -m sweeps.report root=DIR [group_by=KEY[,KEY...]] [bootstrap=N] [reference=GROUP] "
         "[exclude_sweeps=NAME[,NAME...]] [figures=true|false]")


def _parse_args(argv: Sequence[str]) -> dict:
    known = {"root", "group_by", "bootstrap", "reference", "exclude_sweeps", "figures", "seed"}
    args: dict[str, str] = {}
    for a in argv:
        if a in ("-h", "--help"):
            print(USAGE + "\n\n" + __doc__)
            sys.exit(0)
        a = a.lstrip("+")
        if "=" not in a:
            raise ConfigError(f"argument {a!r} is not key=value; {USAGE}")
        k, v = a.split("=", 1)
        k = {"sweep.group_by": "group_by", "sweep.bootstrap": "bootstrap", "n_boot": "bootstrap"}.get(k, k)
        if k not in known:
            raise ConfigError(f"unknown argument {k!r}; known: {', '.join(sorted(known))}")
        args[k] = v
    if "root" not in args:
        raise ConfigError(f"root=DIR is required; {USAGE}")
    try:
        n_boot = int(float(args.get("bootstrap", 1000)))
        seed = int(args.get("seed", 0))
    except ValueError:
        raise ConfigError(f"bootstrap and seed must be integers; {USAGE}") from None
    if n_boot < 0:
        raise ConfigError("bootstrap must be >= 0")
    excl = args.get("exclude_sweeps")
    return {
        "root": args["root"], "group_by": parse_group_by(args.get("group_by")), "n_boot": n_boot, "seed": seed,
        "reference": args.get("reference") or None,
        "exclude_sweeps": DEFAULT_EXCLUDE if excl is None else [s for s in parse_group_by(excl) if s not in ("none", "")],
        "figures": args.get("figures", "true").lower() not in ("false", "0", "no"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    try:
        kw = _parse_args(sys.argv[1:] if argv is None else argv)
        out = make_report(kw.pop("root"), **kw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fits = json.loads((out / "fits.json").read_text())
    for k, e in fits.items():
        if e["status"] == "ok":
            lo, hi = e["ci"]["alpha"]
            print(f"{k}: L(C) = {e['E']:.4g} + {e['A']:.4g} C^-{e['alpha']:.4f}  (alpha 95% CI "
                  f"{lo if lo is None else round(lo, 4)}..{hi if hi is None else round(hi, 4)}; {e['n_runs']} runs)",
                  file=sys.stderr)
        else:
            print(f"{k}: no fit: {e['reason']}", file=sys.stderr)
    print(f"report written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
