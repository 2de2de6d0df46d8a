"""Figures of the scaling-law report (PNG and PDF), drawn from typed group analyses.

- loss_vs_compute: every finished run, the frontier (mean over seeds, with the seed spread), the compute laws with
  bootstrap bands;
- isoflop: loss against parameters per budget; parabolas (with bands) and optima only where the grid brackets
  the minimum;
- optimal_allocation: bracketed optima and N*(C), D*(C) with bands, drawn only from enough optima;
- residuals: log residuals of every run against its group's compute law;
- curves: held-out loss during training, coloured by size and styled by budget;
- recall: MQAR accuracy against state size per arch (when the database holds probe runs);
- lr_scan: held-out loss against the base learning rate (when the database holds scans).

A fit that is not ok says so in its legend entry; a law that was not fitted says why in the legend. Legends sit
under the axes, so they never cover data, and every log axis gets at most a few round, compact tick labels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from sweeps.analysis.approaches import AllocationLaw, IsoflopFit
from sweeps.analysis.group import GroupAnalysis, budget_of, row_value
from sweeps.analysis.laws import ComputeLaw
from sweeps.analysis.recall import RecallPoint, line_key
from sweeps.analysis.status import DATA_MARK, NoFit, Status

# Okabe-Ito: distinguishable for colour-blind readers and in greyscale print.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DASHES = ["-", (0, (6, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)), (0, (2, 3)), (0, (5, 2, 1, 2, 1, 2)), (0, (10, 3))]
LOSS_LABEL = "held-out bits per byte"
MAX_TICKS = {"x": 5, "y": 7}  # labels on a horizontal axis need more room than stacked ones


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7.5,
        "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.5, "savefig.dpi": 200,
        "savefig.bbox": "tight", "pdf.fonttype": 42, "lines.linewidth": 1.4,
    })
    return plt


def _save(fig, out: Path, name: str, drawn: list[str]) -> None:
    import matplotlib.pyplot as plt

    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}")
        drawn.append(f"{name}.{ext}")
    plt.close(fig)


# --- readable log axes ---------------------------------------------------------------------------------------


def _eng(v: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _sci(v: float) -> str:
    e = math.floor(math.log10(v) + 1e-9)
    m = v / 10**e
    return f"1e{e}" if abs(m - 1) < 1e-6 else f"{m:g}e{e}"


FORMATS = {"count": _eng, "flops": _sci, "plain": lambda v: f"{v:g}"}


def _log_ticks(lo: float, hi: float, most: int) -> list[float]:
    """At most MAX_TICKS round values in [lo, hi]: 1-2-5 per decade, thinned to decades when crowded; linear
    round values when the range is under a decade (a loss axis from 2.5 to 4 gets 2.5, 3, 3.5, 4)."""
    from matplotlib.ticker import MaxNLocator

    if hi / lo < 10:
        t = [v for v in MaxNLocator(nbins=most - 1, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
             if lo <= v <= hi and v > 0]
        if len(t) >= 2:
            return t
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mant in ((1, 2, 5), (1, 3), (1,)):
        t = [m * 10.0**e for e in range(e0, e1 + 1) for m in mant if lo <= m * 10.0**e <= hi]
        if len(t) <= most:
            return t
    step = math.ceil(len(t) / most)
    return t[::step]


def _readable(ax, x: str | None, y: str | None) -> None:
    """Fixed round ticks with compact labels on the log axes of ``ax`` (call after everything is drawn)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    for axis, kind, lim, most in ((ax.xaxis, x, ax.get_xlim(), MAX_TICKS["x"]),
                                  (ax.yaxis, y, ax.get_ylim(), MAX_TICKS["y"])):
        if kind is None:
            continue
        fmt = FORMATS[kind]
        axis.set_major_locator(FixedLocator(_log_ticks(*lim, most)))
        axis.set_major_formatter(FuncFormatter(lambda v, _, f=fmt: f(v)))
        axis.set_minor_formatter(NullFormatter())


def _style(i: int) -> dict:
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}


def _legend(lg, ax, notes: Sequence[str] = (), handles=None, ncol: int = 1) -> None:
    """The legend of ``ax`` in its own axes ``lg`` under it (never over the data), then ``notes`` (why a law is
    not drawn) as text entries."""
    from matplotlib.lines import Line2D

    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    handles = list(handles) + [Line2D([], [], linestyle="none", label=n) for n in notes]
    if handles:
        lg.legend(handles=handles, frameon=False, fontsize=6.5, loc="upper center", ncol=1 if notes else ncol,
                  handlelength=2.5, borderaxespad=0.0)


def _empty(ax, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4", wrap=True)


def _tag(status) -> str:
    return "" if status == Status.OK else f" [{status}]"


def _band(ax, x, curves: np.ndarray, color) -> None:
    if curves.shape[0] >= 20:
        ax.fill_between(x, np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0), color=color,
                        alpha=0.15, linewidth=0)


def _panels(plt, n: int, *, w: float, h: float, legend_rows: int, ncol_max: int = 3):
    """``n`` panels in rows of at most ``ncol_max``, each with an axes for its legend under it (room for
    ``legend_rows`` entries). Returns the figure and a list of (axes, legend axes)."""
    ncol = min(ncol_max, max(1, n))
    nrow = (max(1, n) + ncol - 1) // ncol
    lh = 0.25 + 0.13 * legend_rows
    fig = plt.figure(figsize=(w * ncol, (h + lh) * nrow))
    gs = fig.add_gridspec(2 * nrow, ncol, height_ratios=[h, lh] * nrow)
    pairs = []
    for i in range(nrow * ncol):
        r, c = divmod(i, ncol)
        ax, lg = fig.add_subplot(gs[2 * r, c]), fig.add_subplot(gs[2 * r + 1, c])
        lg.axis("off")
        if i >= n:
            ax.set_visible(False)
            lg.set_visible(False)
        pairs.append((ax, lg))
    return fig, pairs


# --- figures -------------------------------------------------------------------------------------------------


def loss_vs_compute(out: Path, groups: Sequence[GroupAnalysis], drawn: list[str]) -> None:
    plt = _plt()
    fig, [(ax, lg)] = _panels(plt, 1, w=6.4, h=4.0, legend_rows=len(groups))
    for i, g in enumerate(groups):
        if not g.ok:
            continue
        st = _style(i)
        ax.scatter([r["flops"] for r in g.ok], [r["eval_bpb"] for r in g.ok], s=12, facecolors="none",
                   edgecolors=st["color"], marker=st["marker"], linewidths=0.7, alpha=0.6)
        Cf = np.array([p.C for p in g.frontier])
        Lf = np.array([p.L for p in g.frontier])
        label = g.key + (f" {DATA_MARK}" if g.data_flag else "")
        law = g.law
        if isinstance(law, ComputeLaw):
            grid = np.logspace(np.log10(Cf.min()) - 0.15, np.log10(Cf.max()) + 0.3, 200)
            if law.boot.samples:
                _band(ax, grid, law.predict_samples(grid), st["color"])
            ax.plot(grid, law.predict(grid), color=st["color"], linestyle="-" if law.status == Status.OK else "--")
            label += f": {law.E:.3g} + {law.A:.3g} C^-{law.alpha:.3f}{_tag(law.status)}"
        else:
            label += f": no law: {law.reason}"
        yerr = [p.L_std if p.n_seeds > 1 else 0.0 for p in g.frontier]
        ax.errorbar(Cf, Lf, yerr=yerr if any(yerr) else None, linestyle="none", markersize=5, label=label,
                    capsize=2, **st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Loss vs compute: frontier (filled; bars: std over seeds), all runs (hollow),\n"
                 "compute laws with 95% bootstrap bands (dashed: not ok)")
    if any(g.ok for g in groups):
        notes = [f"{DATA_MARK} data-constrained: points repeat their data more than 4 times"] * any(
            g.data_flag for g in groups)
        _legend(lg, ax, notes)
        _readable(ax, "flops", "plain")
    else:
        _empty(ax, "no finished runs")
    fig.tight_layout()
    _save(fig, out, "loss_vs_compute", drawn)


def isoflop(out: Path, groups: Sequence[GroupAnalysis], drawn: list[str]) -> None:
    plt = _plt()
    rows = max([len({p.budget for p in g.points}) + 1 for g in groups] or [1])
    fig, pairs = _panels(plt, len(groups), w=3.6, h=3.0, legend_rows=rows)
    cmap = plt.get_cmap("viridis")
    for (ax, lg), g in zip(pairs, groups):
        ax.set_title(g.key)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel(LOSS_LABEL)
        swept = [p for p in g.points if p.rows[0].get("budget")]
        if not swept:
            _empty(ax, "no sweep runs")
            continue
        budgets = sorted({p.budget for p in swept})
        colors = {c: cmap(0.1 + 0.8 * i / max(1, len(budgets) - 1)) for i, c in enumerate(budgets)}
        iso = g.isoflop
        pars = iso.parabolas if isinstance(iso, IsoflopFit) else []
        for c in budgets:
            pts = sorted((p.N, p.L, p.L_std if p.n_seeds > 1 else 0.0) for p in swept if p.budget == c)
            par = [q for q in pars if abs(math.log(q.C / c)) < 0.01]
            bracketed = bool(par) and par[0].bracketed
            n, l, s = (np.array(v) for v in zip(*pts))
            ax.errorbar(n, l, yerr=s if s.any() else None, fmt="o", color=colors[c], markersize=4, capsize=2,
                        label=f"C={_sci(c)}" + ("" if bracketed else " (minimum not bracketed)"))
            ax.plot(n, l, ":", color=colors[c], linewidth=0.7, alpha=0.6)
            if not bracketed:
                continue
            q = par[0]
            x = np.linspace(np.log(n.min()) - 0.2, np.log(n.max()) + 0.2, 100)
            c0, c1, c2 = q.coef
            ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, color=colors[c], linewidth=1.0)
            if q.boot_coef is not None:
                bc = q.boot_coef[np.all(np.isfinite(q.boot_coef), axis=1)]
                _band(ax, np.exp(x), bc[:, :1] + bc[:, 1:2] * x + bc[:, 2:3] * x * x, colors[c])
            ax.plot([q.N_opt], [q.L_opt], marker="*", color=colors[c], markersize=10, markeredgecolor="k",
                    markeredgewidth=0.5, linestyle="none")
        notes = []
        if isinstance(iso, NoFit):
            notes.append(iso.reason)
        elif isinstance(iso.N_law, NoFit):
            notes.append(f"N*(C) {iso.N_law.reason}")
        _legend(lg, ax, notes)
        _readable(ax, "count", None)
    fig.suptitle("IsoFLOP curves: loss vs parameters per budget; parabolas with 95% bands\n"
                 "and their optima (stars) only where the sizes trained bracket the minimum", fontsize=9)
    fig.tight_layout()
    _save(fig, out, "isoflop", drawn)


def _allocation_panel(ax, i: int, g: GroupAnalysis, which: str, notes: list[str]) -> bool:
    st = _style(i)
    iso = g.isoflop
    drew = False
    if g.frontier:
        y = [p.N if which == "N" else p.D for p in g.frontier]
        ax.plot([p.budget for p in g.frontier], y, linestyle="none", markerfacecolor="none", markersize=5,
                color=st["color"], marker=st["marker"], alpha=0.6, label=f"{g.key} (best point)")
        drew = True
    if not isinstance(iso, IsoflopFit):
        return drew
    br = iso.bracketed
    law = iso.N_law if which == "N" else iso.D_law
    if br:
        ax.plot([p.C for p in br], [p.N_opt if which == "N" else p.D_opt for p in br], linestyle="none",
                markersize=5, label=f"{g.key} (bracketed IsoFLOP optima)", **st)
        drew = True
    sym = "a" if which == "N" else "b"
    if isinstance(law, AllocationLaw):
        C = np.array([p.C for p in br])
        grid = np.logspace(np.log10(C.min()) - 0.2, np.log10(C.max()) + 0.2, 50)
        if law.samples:
            ok = np.isfinite(law.samples["G"]) & np.isfinite(law.samples["p"])
            _band(ax, grid, law.samples["G"][ok, None] * grid[None, :] ** law.samples["p"][ok, None], st["color"])
        lo, hi = law.ci.get("p", (math.nan, math.nan))
        ci = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else ""
        ax.plot(grid, law.predict(grid), color=st["color"], linewidth=1.0,
                linestyle="-" if law.status == Status.OK else "--",
                label=f"{g.key}: {sym} = {law.p:.2f}{ci}{_tag(law.status)}")
        notes += [f"{g.key}: {f}" for f in law.flags]
    else:
        notes.append(f"{g.key}: {law.reason}")
    return drew


def optimal_allocation(out: Path, groups: Sequence[GroupAnalysis], drawn: list[str]) -> None:
    plt = _plt()
    fig, pairs = _panels(plt, 2, w=4.0, h=3.2, legend_rows=4 * len(groups))
    for (ax, lg), which, name in zip(pairs, "ND", ("N*(C)  parameters", "D*(C)  tokens")):
        notes: list[str] = []
        drew = False
        for i, g in enumerate(groups):
            drew |= _allocation_panel(ax, i, g, which, notes)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(name)
        if drew:
            _legend(lg, ax, notes)
            _readable(ax, "flops", "count")
        else:
            _empty(ax, "no finished sweep runs")
    fig.suptitle("Compute-optimal allocation (IsoFLOP, approach 2): laws with 95% bands, only from >= 3 "
                 "bracketed optima", fontsize=9)
    fig.tight_layout()
    _save(fig, out, "optimal_allocation", drawn)


def residuals(out: Path, groups: Sequence[GroupAnalysis], drawn: list[str]) -> None:
    plt = _plt()
    fig, [(ax, lg)] = _panels(plt, 1, w=6.4, h=3.0, legend_rows=len(groups))
    any_fit = False
    for i, g in enumerate(groups):
        law = g.law
        if not isinstance(law, ComputeLaw):
            continue
        any_fit = True
        st = _style(i)
        C = np.array([r["flops"] for r in g.ok], float)
        L = np.array([r["eval_bpb"] for r in g.ok], float)
        ax.scatter(C, np.log(L) - np.log(law.predict(C)), s=12, facecolors="none", edgecolors=st["color"],
                   marker=st["marker"], linewidths=0.7, alpha=0.6)
        Cf = np.array([p.C for p in g.frontier])
        Lf = np.array([p.L for p in g.frontier])
        ax.plot(Cf, np.log(Lf) - np.log(law.predict(Cf)), linestyle="none", markersize=5,
                label=f"{g.key} (rms {law.rms_log_residual:.3g}){_tag(law.status)}", **st)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("log L - log L_fit(C)")
    ax.set_title("Residuals of the compute laws (frontier filled, other runs hollow)")
    if any_fit:
        _legend(lg, ax)
        _readable(ax, "flops", None)
    else:
        _empty(ax, "no fitted compute law (see fits.json: reason)")
    fig.tight_layout()
    _save(fig, out, "residuals", drawn)


def curves(out: Path, groups: Sequence[GroupAnalysis], drawn: list[str]) -> None:
    from matplotlib.lines import Line2D

    plt = _plt()
    n_entries = [len({r["params"] for r in g.ok}) + len({budget_of(r) for r in g.ok}) for g in groups]
    fig, pairs = _panels(plt, len(groups), w=3.8, h=3.0, legend_rows=(max(n_entries or [1]) + 1) // 2)
    cmap = plt.get_cmap("viridis")
    for (ax, lg), g in zip(pairs, groups):
        ax.set_title(g.key)
        runs = [r for r in g.ok if any(e.get("eval_bpb") is not None for e in r["evals"])]
        if not runs:
            _empty(ax, "no held-out curves")
            continue
        sizes = sorted({r["params"] for r in runs})
        budgets = sorted({budget_of(r) for r in runs})
        color = {n: cmap(0.9 * i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}
        dash = {b: DASHES[i % len(DASHES)] for i, b in enumerate(budgets)}
        for r in runs:
            ev = [e for e in r["evals"] if e.get("eval_bpb") is not None and e.get("flops")]
            ax.plot([e["flops"] for e in ev], [e["eval_bpb"] for e in ev], color=color[r["params"]],
                    linestyle=dash[budget_of(r)], linewidth=1.0, alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute so far (FLOPs)")
        ax.set_ylabel(LOSS_LABEL)
        handles = [Line2D([], [], color=color[n], label=f"N={_eng(n)}") for n in sizes]
        handles += [Line2D([], [], color="0.3", linestyle=dash[b], label=f"C={_sci(b)}") for b in budgets]
        _legend(lg, ax, handles=handles, ncol=2)
        _readable(ax, "flops", "plain")
    fig.suptitle("Held-out loss during training: colour = model size, line style = budget", fontsize=9)
    fig.tight_layout()
    _save(fig, out, "curves", drawn)


def recall(out: Path, points: Sequence[RecallPoint], drawn: list[str]) -> None:
    plt = _plt()
    archs = sorted({p.arch for p in points})
    rows = max(len({(p.pairs, p.d_model) for p in points if p.arch == a}) for a in archs)
    fig, pairs = _panels(plt, len(archs), w=3.4, h=2.8, legend_rows=rows)
    for (ax, lg), a in zip(pairs, archs):
        pts = [p for p in points if p.arch == a]
        ax.set_title(a)
        ax.set_xlabel("decode state at train.seq_len (bytes per sequence)")
        ax.set_ylabel("MQAR accuracy")
        ax.set_ylim(-0.02, 1.02)
        have = [p for p in pts if p.state_bytes]
        if not have:
            _empty(ax, "no state_bytes recorded")
            continue
        key = line_key(have)
        for i, v in enumerate(sorted({getattr(p, key) for p in have}, key=lambda v: (v is None, v))):
            line = sorted((p for p in have if getattr(p, key) == v), key=lambda p: p.state_bytes)
            err = [0.0 if math.isnan(p.acc_std) else p.acc_std for p in line]
            ax.errorbar([p.state_bytes for p in line], [p.acc for p in line], yerr=err if any(err) else None,
                        capsize=2, markersize=4, label=f"{key}={v}", **_style(i))
        ax.set_xscale("log")
        _legend(lg, ax)
        _readable(ax, "count", None)
    fig.suptitle("Recall probe (MQAR): accuracy vs state size (bars: std over seeds)", fontsize=9)
    fig.tight_layout()
    _save(fig, out, "recall", drawn)


def lr_scan(out: Path, lr_rows: Sequence[dict], drawn: list[str]) -> None:
    plt = _plt()
    archs = sorted({str(r["arch"]) for r in lr_rows})
    fig, [(ax, lg)] = _panels(plt, 1, w=4.5, h=3.0, legend_rows=len(archs))
    for i, a in enumerate(archs):
        pts = sorted((float(row_value(r, "optim.lr")), r["eval_bpb"]) for r in lr_rows
                     if str(r["arch"]) == a and r["status"] == "done" and r["eval_bpb"] is not None
                     and row_value(r, "optim.lr") is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=a, markersize=4, **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate optim.lr (at width 128)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Learning-rate scan (smallest size, same budget per arch)")
    _legend(lg, ax)
    _readable(ax, "plain", None)
    fig.tight_layout()
    _save(fig, out, "lr_scan", drawn)


def draw_all(out: Path, groups: Sequence[GroupAnalysis], *, lr_rows: Sequence[dict],
             recall_points: Sequence[RecallPoint]) -> list[str]:
    drawn: list[str] = []
    for fn in (loss_vs_compute, isoflop, optimal_allocation, residuals, curves) if groups else ():
        fn(out, groups, drawn)
    if recall_points:
        recall(out, recall_points, drawn)
    if lr_rows:
        lr_scan(out, lr_rows, drawn)
    return drawn
