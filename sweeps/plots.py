"""Figures of the scaling-law report (PNG and PDF), drawn from the fits of sweeps.report.

- loss_vs_compute: every finished run, the compute frontier, the fitted laws with bootstrap bands;
- isoflop: loss against parameters per budget, the parabolas in log N and their optima;
- optimal_allocation: N*(C) and D*(C) with their power laws;
- residuals: log residuals of every run against its group's fitted law (frontier filled);
- curves: held-out loss against FLOPs during training for every run, and the envelope;
- lr_scan: held-out loss against the base learning rate (when the database holds scans).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Okabe-Ito: distinguishable for colour-blind readers and in greyscale print.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LOSS_LABEL = "held-out bits per byte"


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
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}")
        drawn.append(f"{name}.{ext}")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _plain_log(axis) -> None:
    """Log axis with plain tick labels (3.8, 4, 5 rather than 4 x 10^0); matplotlib thins the minor labels."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _count_log(axis) -> None:
    """Log axis of counts: 87k, 140k, 1.2M."""
    from matplotlib.ticker import EngFormatter

    lo, hi = axis.get_view_interval()
    axis.set_major_formatter(EngFormatter(sep=""))
    if hi / max(lo, 1e-300) < 10:
        axis.set_minor_formatter(EngFormatter(sep=""))


def _style(i: int) -> dict:
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}


def _empty(ax, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4", wrap=True)


def loss_vs_compute(out: Path, entries: dict, extras: dict, drawn: list[str]) -> None:
    from sweeps.report import law

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    any_pts = False
    for i, (k, e) in enumerate(entries.items()):
        st, ex = _style(i), extras[k]
        ok = ex["ok"]
        if not ok:
            continue
        any_pts = True
        ax.scatter([r["flops"] for r in ok], [r["eval_bpb"] for r in ok], s=12, facecolors="none",
                   edgecolors=st["color"], marker=st["marker"], linewidths=0.7, alpha=0.6)
        Cf, Lf = np.asarray(e["frontier"]["C"], float), np.asarray(e["frontier"]["L"], float)
        label = k
        if e["status"] == "ok":
            lo, hi = float(Cf.min()), float(Cf.max())
            grid = np.logspace(np.log10(lo) - 0.15, np.log10(hi) + 0.3, 200)
            s = ex["boot"]["samples"]
            good = np.isfinite(s["E"]) & np.isfinite(s["A"]) & np.isfinite(s["alpha"])
            if good.sum() >= 20:
                curves = law(grid[None, :], s["E"][good, None], s["A"][good, None], s["alpha"][good, None])
                ax.fill_between(grid, np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0),
                                color=st["color"], alpha=0.15, linewidth=0)
            ax.plot(grid, law(grid, e["E"], e["A"], e["alpha"]), color=st["color"])
            label = f"{k}: {e['E']:.3g} + {e['A']:.3g} C^-{e['alpha']:.3f}"
        ax.plot(Cf, Lf, linestyle="none", markersize=5, label=label, **st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Loss vs compute: frontier (filled), all runs (hollow), fit with 95% bootstrap band")
    if any_pts:
        ax.legend(frameon=False, loc="upper right")
        _plain_log(ax.yaxis)
    else:
        _empty(ax, "no finished runs")
    _save(fig, out, "loss_vs_compute", drawn)


def isoflop(out: Path, entries: dict, extras: dict, drawn: list[str]) -> None:
    plt = _plt()
    keys = list(entries)
    n = max(1, len(keys))
    ncol = min(3, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(4.6, 3.3 * ncol), 3.2 * nrow), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keys):
        ex = extras[k]
        swept = [r for r in ex["ok"] if r.get("budget")]
        ax.set_title(k)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel(LOSS_LABEL)
        if not swept:
            _empty(ax, "no sweep runs")
            continue
        budgets = sorted({float(r["budget"]) for r in swept})
        colors = {c: cmap(0.1 + 0.8 * i / max(1, len(budgets) - 1)) for i, c in enumerate(budgets)}
        for c in budgets:
            pts = sorted((r["params"], r["eval_bpb"]) for r in swept if float(r["budget"]) == c)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=colors[c], markersize=4,
                    label=f"C={c:.2g}")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ":", color=colors[c], linewidth=0.7, alpha=0.6)
        iso = ex.get("isoflop") or {}
        for b in iso.get("budgets", []):
            c = min(budgets, key=lambda x: abs(np.log(x / b["C"])))
            ns = [r["params"] for r in swept if float(r["budget"]) == c]
            x = np.linspace(np.log(min(ns)) - 0.2, np.log(max(ns)) + 0.2, 100)
            c0, c1, c2 = b["coef"]
            ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, color=colors[c], linewidth=1.0)
            # a hollow star: the optimum lies outside the sizes trained (an extrapolation)
            ax.plot([b["N_opt"]], [b["L_opt"]], marker="*", color=colors[c], markersize=10,
                    markerfacecolor=colors[c] if b["in_range"] else "white",
                    markeredgecolor="k", markeredgewidth=0.5, linestyle="none")
        if not iso.get("budgets"):
            ax.text(0.02, 0.02, "no parabola (needs >= 3 sizes per budget)", transform=ax.transAxes,
                    fontsize=7, color="0.4")
        ax.legend(frameon=False, fontsize=6.5)
        _count_log(ax.xaxis)
    fig.suptitle("IsoFLOP curves: loss vs parameters per budget; parabolas in log N\n"
                 "and their optima (stars; hollow: outside the sizes trained)",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, out, "isoflop", drawn)


def optimal_allocation(out: Path, entries: dict, extras: dict, drawn: list[str]) -> None:
    plt = _plt()
    fig, (axn, axd) = plt.subplots(1, 2, figsize=(7.0, 3.0))
    any_pts = False
    for i, (k, e) in enumerate(entries.items()):
        st = _style(i)
        iso = extras[k].get("isoflop") or {}
        if iso.get("budgets"):
            C = np.asarray(iso["C_opt"], float)
            for ax, y, p, g in ((axn, iso["N_opt"], iso.get("a"), iso.get("G")),
                                (axd, iso["D_opt"], iso.get("b"), iso.get("G_prime"))):
                ax.plot(C, y, linestyle="none", markersize=5, label=f"{k} (IsoFLOP)", **st)
                if p is not None and np.isfinite(p):
                    grid = np.logspace(np.log10(C.min()) - 0.2, np.log10(C.max()) + 0.2, 50)
                    ax.plot(grid, g * grid ** p, color=st["color"], linewidth=1.0, label=f"{k}: ~C^{p:.2f}")
            any_pts = True
        front = e["frontier"]
        if front["budget"]:
            axn.plot(front["budget"], front["params"], linestyle="none", markerfacecolor="none", markersize=5,
                     color=st["color"], marker=st["marker"], alpha=0.6, label=f"{k} (best run)")
            axd.plot(front["budget"], front["tokens"], linestyle="none", markerfacecolor="none", markersize=5,
                     color=st["color"], marker=st["marker"], alpha=0.6, label=f"{k} (best run)")
            any_pts = True
    for ax, name in ((axn, "N*(C)  parameters"), (axd, "D*(C)  tokens")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(name)
        if any_pts:
            _count_log(ax.yaxis)
            ax.legend(frameon=False, fontsize=6.5)
        else:
            _empty(ax, "no finished sweep runs")
    fig.suptitle("Compute-optimal allocation", fontsize=9)
    fig.tight_layout()
    _save(fig, out, "optimal_allocation", drawn)


def residuals(out: Path, entries: dict, extras: dict, drawn: list[str]) -> None:
    from sweeps.report import law

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    any_fit = False
    for i, (k, e) in enumerate(entries.items()):
        if e["status"] != "ok":
            continue
        any_fit = True
        st = _style(i)
        ok = extras[k]["ok"]
        C = np.array([r["flops"] for r in ok], float)
        L = np.array([r["eval_bpb"] for r in ok], float)
        ax.scatter(C, np.log(L) - np.log(law(C, e["E"], e["A"], e["alpha"])), s=12, facecolors="none",
                   edgecolors=st["color"], marker=st["marker"], linewidths=0.7, alpha=0.6)
        Cf = np.asarray(e["frontier"]["C"], float)
        ax.plot(Cf, e["frontier"]["residual_log"], linestyle="none", markersize=5,
                label=f"{k} (rms {e.get('rms_log_residual') or 0:.3g})", **st)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("log L - log L_fit(C)")
    ax.set_title("Residuals of the compute laws (frontier filled, other runs hollow)")
    if any_fit:
        ax.legend(frameon=False)
    else:
        _empty(ax, "no fitted compute law (see fits.json: reason)")
    _save(fig, out, "residuals", drawn)


def curves(out: Path, entries: dict, extras: dict, drawn: list[str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    anything = False
    for i, k in enumerate(entries):
        st = _style(i)
        first = True
        for r in extras[k]["ok"]:
            ev = [e for e in r["evals"] if e.get("eval_bpb") is not None]
            if len(ev) < 1:
                continue
            anything = True
            ax.plot([e["flops"] for e in ev], [e["eval_bpb"] for e in ev], color=st["color"], alpha=0.55,
                    linewidth=0.9, marker=".", markersize=3, label=k if first else None)
            first = False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute so far (FLOPs)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Held-out loss during training (one line per run)")
    if anything:
        ax.legend(frameon=False)
        _plain_log(ax.yaxis)
    else:
        _empty(ax, "no held-out curves")
    _save(fig, out, "curves", drawn)


def lr_scan(out: Path, lr_rows: list[dict], drawn: list[str]) -> None:
    from sweeps.report import row_value

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    archs = sorted({str(r["arch"]) for r in lr_rows})
    for i, a in enumerate(archs):
        pts = sorted((float(row_value(r, "optim.lr")), r["eval_bpb"]) for r in lr_rows
                     if str(r["arch"]) == a and r["status"] == "done" and r["eval_bpb"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=a, markersize=4, **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate optim.lr (at width 128)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Learning-rate scan (smallest size, same budget per arch)")
    ax.legend(frameon=False)
    _save(fig, out, "lr_scan", drawn)


def draw_all(out: Path, entries: dict, extras: dict, *, rows: Sequence[dict], lr_rows: Sequence[dict],
             group_by: Sequence[str]) -> list[str]:
    drawn: list[str] = []
    for fn in (loss_vs_compute, isoflop, optimal_allocation, residuals, curves):
        fn(out, entries, extras, drawn)
    if lr_rows:
        lr_scan(out, list(lr_rows), drawn)
    return drawn


__all__: list[Any] = ["draw_all"]
