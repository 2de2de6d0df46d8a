"""The report's tables, in Markdown (tables.md) and LaTeX booktabs (tables.tex), from typed group analyses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sweeps.analysis.approaches import AllocationLaw, LeaveOneOut
from sweeps.analysis.group import GroupAnalysis, row_value
from sweeps.analysis.laws import LAW, ComputeLaw
from sweeps.analysis.recall import RecallPoint
from sweeps.analysis.status import DATA_MARK, MAX_EPOCHS, NoFit

LOSS = "held-out bits per byte (eval_bpb; for diffusion the NELBO upper bound)"


@dataclass
class Table:
    title: str
    caption: str
    label: str
    header: list[str]
    rows: list[list[str]]


def num(x: Any, kind: str = "g") -> str:
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


def with_ci(v: Any, ci: Sequence | None, kind: str) -> str:
    s = num(v, kind)
    if ci and all(c is not None and math.isfinite(c) for c in ci):
        s += f" [{num(ci[0], kind)}, {num(ci[1], kind)}]"
    return s


def _name(g: GroupAnalysis) -> str:
    return g.key + (f" {DATA_MARK}" if g.data_flag else "")


def _notes(status_flags: Sequence[str], *more: str | None) -> str:
    return "; ".join(s for s in (*status_flags, *more) if s)


def _mae(loo: LeaveOneOut | None) -> str:
    return num(loo.mae) if loo and loo.holdouts else "n/a"


def _law_table(groups: Sequence[GroupAnalysis]) -> Table:
    mixed_tok = any(len(g.tokenizers) > 1 for g in groups)
    saved = any(g.compute_saved is not None for g in groups)
    header = ["group", "status", "runs", "budgets", "E", "A", "alpha", "LOO MAE", "failed"]
    header += ["tokenizer/vocab"] * mixed_tok + ["compute spent/flops"] * saved + ["notes"]
    rows = []
    for g in groups:
        law = g.law
        if isinstance(law, ComputeLaw):
            params = [with_ci(law.E, law.boot.ci.get("E"), "g"), with_ci(law.A, law.boot.ci.get("A"), "sci"),
                      with_ci(law.alpha, law.boot.ci.get("alpha"), "exp")]
            notes = _notes(law.flags, *g.notes)
        else:
            params = ["n/a"] * 3
            notes = _notes([law.reason], *g.notes)
        row = [_name(g), str(g.status), str(len(g.ok)), str(len(g.frontier)), *params, _mae(g.loo), str(len(g.failed))]
        row += [", ".join(g.tokenizers) or "n/a"] * mixed_tok + [num(g.compute_saved)] * saved
        rows.append(row + [notes])
    level = next((int(round(100 * g.law.boot.level)) for g in groups if isinstance(g.law, ComputeLaw)), 95)
    caption = (f"Compute law {LAW} fitted to the compute frontier (lowest mean loss over seeds per budget); loss in "
               f"held-out bits per byte, C in training FLOPs. Brackets: {level}% bootstrap percentile intervals "
               "(whole points resampled). LOO MAE: mean absolute error (bits per byte) of each budget's frontier "
               "loss predicted by the law refitted without that budget. Status: ok, saturated (as many budgets as "
               "parameters), degenerate (see notes), insufficient, failed.")
    if any(g.data_flag for g in groups):
        caption += f" {DATA_MARK}: points repeat their data more than {MAX_EPOCHS:g} times (data-constrained)."
    if mixed_tok:
        caption += " Bits per byte are normalised by text bytes, so they stay comparable across tokenizers."
    if saved:
        caption += " Compute spent/flops: FLOPs actually trained over the FLOPs of the points they stand for."
    return Table("Fitted compute laws", caption, "tab:compute-laws", header, rows)


def _multiplier_table(groups: Sequence[GroupAnalysis], reference: str) -> Table:
    rows = []
    for g in groups:
        m = g.multiplier
        if m is None or g.key == reference:
            continue
        note = m.reason or ("" if g.status == "ok" else f"from a {g.status} fit")
        rows.append([g.key, num(m.L), num(m.C_reference, "sci"), num(m.C_group, "sci"),
                     with_ci(m.multiplier, m.ci, "x"), note])
    return Table(f"Compute multiplier relative to {reference}",
                 f"C_group(L*) / C_{reference}(L*) from the fitted laws, at L* = the lowest loss both groups reached "
                 "(bits per byte). For reference, Nie et al. (2024) report that masked diffusion needs about 16x "
                 "the compute of autoregressive models for the same loss.", "tab:compute-multiplier",
                 ["group", "L*", f"C_{reference}(L*)", "C_group(L*)", "multiplier", "notes"], rows)


def _alloc(law: AllocationLaw | NoFit) -> tuple[str, str]:
    if isinstance(law, NoFit):
        return "n/a", law.reason
    return with_ci(law.p, law.ci.get("p"), "exp"), _notes(law.flags)


def _allocation_table(groups: Sequence[GroupAnalysis]) -> Table:
    rows = []
    for g in groups:
        iso = g.isoflop
        front = "; ".join(f"{p.budget:.2g}: {p.D / p.N:.3g}" for p in g.frontier)
        if isinstance(iso, NoFit):
            rows.append([g.key, "n/a", "n/a", str(iso.status), "n/a", front or "n/a", iso.reason])
            continue
        a, na = _alloc(iso.N_law)
        b, nb = _alloc(iso.D_law)
        per = "; ".join(f"{p.C:.2g}: {p.D_opt / p.N_opt:.3g}" + ("" if p.bracketed else "*") for p in iso.parabolas)
        rows.append([g.key, a, b, str(iso.N_law.status), per or "n/a", front or "n/a",
                     _notes([na, nb if nb != na else ""])])
    return Table("Compute-optimal allocation",
                 "IsoFLOP (approach 2): N*(C) ~ C^a and D*(C) ~ C^b from the optima of per-budget parabolas of loss "
                 "in log N (N = all parameters), fitted only to optima the grid brackets (lowest point inside the "
                 "sizes trained) and only from 3 of them. Tokens per parameter D*/N* per budget C (* = not bracketed: "
                 "not used), and D/N of the lowest-loss point at each budget.",
                 "tab:compute-optimal", ["group", "a", "b", "status", "D*/N* (IsoFLOP)", "D/N (best point)", "notes"],
                 rows)


def _agreement_table(groups: Sequence[GroupAnalysis]) -> Table:
    rows = []
    for g in groups:
        ag = g.agreement
        if ag is None:
            continue
        for r in ag.rows:
            rows.append([g.key, r["approach"], with_ci(r["a"], r["a_ci"], "exp"), num(r["L_pred"]),
                         num(ag.L_actual), f"{ag.C_max:.3g}", str(r["status"])])
    return Table("Agreement of the approaches",
                 "Compute-optimal size exponent a (N* ~ C^a) from approach 1 (envelope of loss-vs-compute curves), "
                 "approach 2 (IsoFLOP parabolas) and approach 3 (L(N, D), a = beta / (alpha + beta)), and the loss "
                 "each predicts at the largest budget C_max (approach 1: envelope; approach 2: parabola minimum; "
                 "approach 3: the law at its compute-optimal N, D) against the frontier loss there.",
                 "tab:agreement", ["group", "approach", "a", "L(C_max) predicted", "L(C_max) actual", "C_max",
                                   "status"], rows)


def _loo_table(groups: Sequence[GroupAnalysis]) -> Table:
    rows = []
    for g in groups:
        for name, loo in (("L(C)", g.loo), ("L(N, D)", g.chinchilla_loo)):
            if not loo or not (loo.holdouts or loo.failed):
                continue
            for h in loo.holdouts:
                rows.append([g.key, name, f"{h.C:.3g}", num(h.predicted), num(h.actual), f"{h.error:+.4f}",
                             f"{100 * h.rel_error:+.2f}%"])
            rows += [[g.key, name, f"{c:.3g}", "refit failed", num(None), "", ""] for c in loo.failed]
            rows.append([g.key, name, "mean |error|", "", "", num(loo.mae), f"{100 * loo.mean_abs_rel_error:.2f}%"])
    return Table("Leave-one-budget-out extrapolation",
                 "Each budget held out in turn: the law refitted without its runs predicts its frontier loss (bits "
                 "per byte). The largest budget held out is a true extrapolation; inner budgets test interpolation.",
                 "tab:loo", ["group", "law", "held-out C", "predicted", "actual", "error", "rel. error"], rows)


def _chinchilla_table(groups: Sequence[GroupAnalysis]) -> Table:
    rows = []
    for g in groups:
        ch = g.chinchilla
        if isinstance(ch, NoFit):
            rows.append([g.key, str(ch.status)] + ["n/a"] * 6 + [ch.reason])
            continue
        ci = ch.boot.ci
        rows.append([_name(g), str(ch.status), with_ci(ch.E, ci.get("E"), "g"), num(ch.A, "sci"), num(ch.B, "sci"),
                     with_ci(ch.alpha, ci.get("alpha"), "exp"), with_ci(ch.beta, ci.get("beta"), "exp"),
                     _mae(g.chinchilla_loo), _notes(ch.flags)])
    return Table("Parametric law L(N, D)",
                 "Chinchilla approach 3: L(N, D) = E + A / N^alpha + B / D^beta fitted to every finished run (Huber "
                 "delta 1e-3 on log residuals); brackets: bootstrap intervals resampling whole points (all seeds).",
                 "tab:chinchilla", ["group", "status", "E", "A", "B", "alpha", "beta", "LOO MAE", "notes"], rows)


def _seed_table(groups: Sequence[GroupAnalysis]) -> Table | None:
    rows = []
    for g in groups:
        s = g.seeds
        if s is None:
            continue
        ci = g.law.boot.ci.get("alpha") if isinstance(g.law, ComputeLaw) else None
        per = ", ".join(f"{k}: {num(v, 'exp')}" for k, v in s.alpha_per_seed.items())
        rows.append([g.key, str(s.n_seeds), str(s.n_points), num(s.bpb_std_mean), num(s.bpb_std_max), per or "n/a",
                     num(s.alpha_std, "exp"), with_ci(getattr(g.law, "alpha", None), ci, "exp")])
    if not rows:
        return None
    return Table("Seed spread",
                 "Seeds per point, the standard deviation of the held-out loss over the seeds of a point (mean and "
                 "max over points with >= 2 seeds, bits per byte), the compute law's alpha fitted to each seed's "
                 "runs alone and its standard deviation, beside the all-seed fit with its bootstrap interval.",
                 "tab:seeds", ["group", "seeds", "points", "bpb std (mean)", "bpb std (max)", "alpha per seed",
                               "alpha std", "alpha (all seeds)"], rows)


def _matched_table(groups: Sequence[GroupAnalysis], group_by: Sequence[str]) -> Table | None:
    budgets = sorted({p.budget for g in groups for p in g.frontier})
    if not budgets:
        return None
    rows = []
    for c in budgets:
        row = [f"{c:.3g}"]
        for g in groups:
            at = [p for p in g.frontier if p.budget == c]
            row.append(num(at[0].L) if at else "")
        rows.append(row)
    return Table("Loss at matched compute",
                 "Lowest held-out bits per byte (mean over seeds) at each compute budget (training FLOPs), per group: "
                 f"an ablation at matched compute (grouped by {', '.join(group_by)}).",
                 "tab:matched-compute", ["C (FLOPs)", *[g.key for g in groups]], rows)


def _recall_table(points: Sequence[RecallPoint]) -> Table:
    rows = [[p.arch, num(p.d_model), num(p.pairs), num(p.state_bytes, "sci"),
             num(p.acc) + ("" if math.isnan(p.acc_std) else f" ± {num(p.acc_std)}"), str(p.n_seeds)] for p in points]
    return Table("Recall probe (MQAR)",
                 "Held-out multi-query associative recall accuracy (mean ± std over seeds) against the model's state "
                 "size (decode-state bytes per sequence at the run's train.seq_len: recurrent state, or the KV cache "
                 "for attention). Probe runs are "
                 "not part of any scaling-law fit.", "tab:recall",
                 ["arch", "d_model", "pairs", "state bytes", "accuracy", "seeds"], rows)


def _lr_table(lr_rows: Sequence[dict]) -> Table:
    rows = []
    for r in sorted(lr_rows, key=lambda r: (str(r["arch"]), str(r.get("size")), row_value(r, "optim.lr") or 0)):
        rows.append([str(r["arch"]), str(r.get("size")), num(row_value(r, "optim.lr")), num(r.get("lr")),
                     num(r.get("eval_bpb")) if r["status"] == "done" else r["status"]])
    return Table("Learning-rate scans",
                 "lr_scan sweeps: base rate optim.lr (at width 128) and the peak rate used after the width rule "
                 "lr * (128 / d_model)^0.5; held-out bits per byte.", "tab:lr-scan",
                 ["arch", "size", "optim.lr", "peak lr", "bpb"], rows)


def _failed_table(groups: Sequence[GroupAnalysis]) -> Table:
    rows = []
    for g in groups:
        rows += [[r["run_id"], g.key, "failed", (r.get("error") or "no final eval_bpb")[:120]] for r in g.failed]
        rows += [[r["run_id"], g.key, "incomplete", "still running or interrupted"] for r in g.incomplete]
    return Table("Failed and incomplete runs", "Runs excluded from every fit.", "tab:failed",
                 ["run", "group", "status", "error"], rows)


def build_tables(groups: Sequence[GroupAnalysis], *, group_by: Sequence[str], reference: str | None,
                 lr_rows: Sequence[dict], recall: Sequence[RecallPoint]) -> list[Table]:
    out = [_law_table(groups)]
    if reference is not None:
        out.append(_multiplier_table(groups, reference))
    out += [_allocation_table(groups), _agreement_table(groups), _loo_table(groups), _chinchilla_table(groups)]
    out += [t for t in (_seed_table(groups), _matched_table(groups, group_by)) if t is not None]
    if recall:
        out.append(_recall_table(recall))
    if lr_rows:
        out.append(_lr_table(lr_rows))
    out.append(_failed_table(groups))
    return out


def _tex_escape(s: str) -> str:
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
           "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "†": r"\dag{}",
           "±": r"$\pm$"}
    return "".join(rep.get(c, c) for c in str(s))


def _md(t: Table) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, t.header)) + " |", "|" + "|".join("---" for _ in t.header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in t.rows])


def _tex(t: Table) -> str:
    cols = "l" + "r" * (len(t.header) - 1)
    body = [" & ".join(_tex_escape(c) for c in t.header) + r" \\", r"\midrule"]
    body += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in t.rows]
    return "\n".join([
        r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{_tex_escape(t.caption)}}}", rf"\label{{{t.label}}}",
        rf"\begin{{tabular}}{{{cols}}}", r"\toprule", *body, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def write_tables(out: Path, tables: Sequence[Table], *, n_rows: int, group_by: Sequence[str]) -> None:
    md = ["# Scaling-law report", "",
          f"Loss: {LOSS}. Compute: training FLOPs (analytic count, archs/flops.py). Groups: {', '.join(group_by)}. "
          f"{n_rows} runs in the database.", ""]
    tex = ["% Scaling-law report tables (needs \\usepackage{booktabs})", ""]
    for t in tables:
        md += [f"## {t.title}", "", t.caption, "", _md(t) if t.rows else "(none)", ""]
        if t.rows:
            tex.append(_tex(t))
    (out / "tables.md").write_text("\n".join(md))
    (out / "tables.tex").write_text("\n".join(tex))

