"""Compute-optimal allocation (Chinchilla approaches 1 and 2) and extrapolation checks of the laws.

Approach 2 (IsoFLOP), ``fit_isoflop``: per budget, a parabola of loss in ``x = ln N`` through the points (per-point
means over seeds) and its vertex ``N*``, ``L*``; ``D*`` from a per-budget line of ``ln D`` on ``ln N`` at the vertex.
A budget's optimum counts only when the grid brackets it: the lowest point is not the smallest or largest size
trained and the vertex lies inside the sizes trained. ``N* = G C^a`` and ``D* = G' C^b`` are fitted (least squares
in log-log) to bracketed optima only, and only from ``status.MIN_OPTIMA`` of them; their bootstrap resamples points
within each bracketed budget.

Approach 1 (envelope), ``fit_approach1``: the loss-vs-compute curves of many runs (held-out evaluations during
training, or the endpoints of one size's cooldown branches) interpolated on a log-spaced compute grid; the lower
envelope's winning size gives ``N*(C)``. A grid point counts only when the winning size is bracketed by data of
both neighbouring sizes at that compute.

Extrapolation, ``leave_one_out``: refit a law without one budget and predict that budget's frontier loss; the
mean absolute error over budgets is the report's figure of merit for every law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from sweeps.analysis.solver import percentile_ci, power_law, power_law_batch
from sweeps.analysis.status import MIN_OPTIMA, NoFit, Status, allocation_status


@dataclass
class AllocationLaw:
    """``y = G * C**p`` (N*(C) or D*(C)) through ``n_points`` optima, with bootstrap samples of (G, p)."""

    G: float
    p: float
    n_points: int
    status: Status
    flags: list[str]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)

    def predict(self, C) -> np.ndarray:
        return self.G * np.power(np.asarray(C, dtype=float), self.p)


def _allocation_law(C, y, name: str, log_samples: tuple[np.ndarray, np.ndarray] | None, level: float,
                    what: str) -> AllocationLaw | NoFit:
    C, y = np.asarray(C, dtype=float), np.asarray(y, dtype=float)
    if C.size < MIN_OPTIMA:
        return NoFit(Status.INSUFFICIENT, f"not fitted: {C.size} {what} (needs {MIN_OPTIMA})")
    G, p = power_law(C, y)
    ci, samples = {}, {}
    if log_samples is not None:
        lg, ps = log_samples
        samples = {"G": np.exp(lg), "p": ps}
        ci = {"p": percentile_ci(ps, level)}
    status, flags = allocation_status(p, ci.get("p"), name)
    return AllocationLaw(G=G, p=p, n_points=int(C.size), status=status, flags=flags, ci=ci, samples=samples)


# --- approach 2 ----------------------------------------------------------------------------------------------


@dataclass
class Parabola:
    """One budget's IsoFLOP parabola ``L = c0 + c1 x + c2 x^2`` in ``x = ln N`` and its vertex."""

    C: float
    N: np.ndarray  # the points' sizes and (mean) losses
    L: np.ndarray
    coef: tuple[float, float, float]
    N_opt: float
    D_opt: float
    L_opt: float
    in_range: bool  # vertex inside the sizes trained
    bracketed: bool  # ... and the lowest point is not at either end
    boot_coef: np.ndarray | None = None  # (n_boot, 3) refits of resampled points, for bands

    @property
    def n_points(self) -> int:
        return int(self.N.size)


@dataclass
class IsoflopFit:
    parabolas: list[Parabola]  # every budget with a convex parabola over >= 3 sizes
    skipped: list[dict]  # the other budgets, with reasons
    N_law: AllocationLaw | NoFit
    D_law: AllocationLaw | NoFit

    @property
    def bracketed(self) -> list[Parabola]:
        return [p for p in self.parabolas if p.bracketed]


def group_budgets(C: np.ndarray, rtol: float) -> list[np.ndarray]:
    """Indices grouped by budget: sorted log C, a new group when C exceeds the group's first by > rtol."""
    order = np.argsort(C, kind="stable")
    lc = np.log(C[order])
    tol = np.log1p(rtol)
    groups, start = [], 0
    for i in range(1, order.size + 1):
        if i == order.size or lc[i] - lc[start] > tol:
            groups.append(order[start:i])
            start = i
    return groups


def _parabolas(x: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares parabolas in u = x - xc for batches (B, m); returns centred coefficients (B, 3) and xc (B,)."""
    xc = x.mean(axis=-1, keepdims=True)
    u = x - xc
    V = np.stack([np.ones_like(u), u, u * u], axis=-1)
    G = np.matmul(V.transpose(0, 2, 1), V)
    h = np.einsum("bmi,bm->bi", V, L)
    good = np.abs(np.linalg.det(G)) > 1e-10 * np.einsum("bii->b", G) ** 3
    coef = np.full(h.shape, np.nan)
    if good.any():
        coef[good] = np.linalg.solve(G[good], h[good][:, :, None])[:, :, 0]
    return coef, xc[..., 0]


def _uncentred(coef: np.ndarray, xc: np.ndarray) -> np.ndarray:
    c0, c1, c2 = coef[..., 0], coef[..., 1], coef[..., 2]
    return np.stack([c0 - c1 * xc + c2 * xc**2, c1 - 2 * c2 * xc, c2], axis=-1)


def fit_isoflop(C, N, L, D, *, rtol: float = 0.01, min_points: int = 3, n_boot: int = 0, seed: int = 0,
                level: float = 0.95) -> IsoflopFit:
    """Approach 2 on points ``(C, N, L, D)`` (one per (budget, size); average seeds first)."""
    C, N, L, D = (np.asarray(v, dtype=float).ravel() for v in (C, N, L, D))
    parabolas, skipped, groups = [], [], []
    for g in group_budgets(C, rtol):
        Cg = float(np.exp(np.mean(np.log(C[g]))))
        x = np.log(N[g])
        if g.size < min_points or np.unique(x).size < 3:
            skipped.append({"C": Cg, "n_points": int(g.size),
                            "reason": f"fewer than {min_points} points or 3 distinct sizes"})
            continue
        coef, xc = _parabolas(x[None, :], L[g][None, :])
        c0, c1, c2 = coef[0]
        if not np.isfinite(c2) or c2 <= 0:
            skipped.append({"C": Cg, "n_points": int(g.size), "reason": "parabola not convex"})
            continue
        x_opt = float(xc[0] - c1 / (2 * c2))
        q, p = np.polyfit(x, np.log(D[g]), 1)
        in_range = bool(x.min() <= x_opt <= x.max())
        lowest = x[np.argmin(L[g])]
        parabolas.append(Parabola(
            C=Cg, N=N[g], L=L[g], coef=tuple(float(v) for v in _uncentred(coef[0], xc[0])),
            N_opt=float(np.exp(x_opt)), D_opt=float(np.exp(p + q * x_opt)), L_opt=float(c0 - c1 * c1 / (4 * c2)),
            in_range=in_range, bracketed=in_range and x.min() < lowest < x.max()))
        groups.append(g)
    used = [(p, g) for p, g in zip(parabolas, groups) if p.bracketed]
    Cb = np.array([p.C for p, _ in used])
    boot_n = boot_d = None
    if n_boot > 0 and used:
        rng = np.random.default_rng(seed)
        lx = np.full((n_boot, len(used)), np.nan)
        ld = np.full((n_boot, len(used)), np.nan)
        for j, (par, g) in enumerate(used):
            ii = g[rng.integers(0, g.size, size=(n_boot, g.size))]
            x = np.log(N[ii])
            coef, xc = _parabolas(x, L[ii])
            par.boot_coef = _uncentred(coef, xc)
            with np.errstate(invalid="ignore", divide="ignore"):
                x_opt = xc - coef[:, 1] / (2 * coef[:, 2])
                x_opt[~(coef[:, 2] > 0)] = np.nan
                lD = np.log(D[ii])
                xm, dm = x.mean(1, keepdims=True), lD.mean(1, keepdims=True)
                q = ((x - xm) * (lD - dm)).sum(1) / ((x - xm) ** 2).sum(1)
            lx[:, j] = x_opt
            ld[:, j] = dm[:, 0] + q * (x_opt - xm[:, 0])
        if len(used) >= MIN_OPTIMA:
            boot_n, boot_d = power_law_batch(np.log(Cb), lx), power_law_batch(np.log(Cb), ld)
    what = "bracketed optimum" if len(used) == 1 else "bracketed optima"
    return IsoflopFit(
        parabolas=parabolas, skipped=skipped,
        N_law=_allocation_law(Cb, [p.N_opt for p, _ in used], "a", boot_n, level, what),
        D_law=_allocation_law(Cb, [p.D_opt for p, _ in used], "b", boot_d, level, what))


# --- approach 1 ----------------------------------------------------------------------------------------------


@dataclass
class Curve:
    """One model's loss against compute: held-out evaluations during a run, or one size's branch endpoints."""

    params: float
    flops: np.ndarray
    loss: np.ndarray
    tokens: np.ndarray


@dataclass
class Envelope:
    source: str  # what the curves are
    C: np.ndarray  # compute grid points kept
    L_env: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray
    N_law: AllocationLaw | NoFit
    D_law: AllocationLaw | NoFit

    @property
    def sizes_won(self) -> int:
        return int(np.unique(self.N_opt).size)

    def loss_at(self, C: float) -> float:
        """The envelope's loss at C (linear in log C); NaN outside the kept grid."""
        if not self.C.size or not self.C[0] <= C <= self.C[-1]:
            return math.nan
        return float(np.interp(np.log(C), np.log(self.C), self.L_env))


def fit_approach1(curves: Sequence[Curve], *, source: str, n_grid: int = 200, min_runs: int = 2) -> Envelope:
    """Lower envelope of ``curves`` on ``n_grid`` log-spaced compute values (see the module docstring)."""
    if len(curves) < 2:
        raise ValueError("need at least two curves")
    Ns = np.array([float(c.params) for c in curves])
    lf = [np.log(np.asarray(c.flops, dtype=float)) for c in curves]
    grid = np.linspace(min(v.min() for v in lf), max(v.max() for v in lf), n_grid)
    loss = np.full((len(curves), n_grid), np.nan)
    ltok = np.full((len(curves), n_grid), np.nan)
    for i, c in enumerate(curves):
        o = np.argsort(lf[i])
        x = lf[i][o]
        inside = (grid >= x[0]) & (grid <= x[-1])
        loss[i, inside] = np.interp(grid[inside], x, np.asarray(c.loss, dtype=float)[o])
        ltok[i, inside] = np.interp(grid[inside], x, np.log(np.asarray(c.tokens, dtype=float)[o]))
    cols = np.flatnonzero(np.isfinite(loss).sum(0) >= min_runs)
    arg = np.argmin(np.where(np.isfinite(loss[:, cols]), loss[:, cols], np.inf), axis=0)
    # keep a grid point only if the next smaller and next larger size both have data there
    sizes = np.unique(Ns)
    size_of_run = np.searchsorted(sizes, Ns)
    present = np.zeros((sizes.size, n_grid), dtype=bool)
    np.logical_or.at(present, size_of_run, np.isfinite(loss))
    k = size_of_run[arg]
    below = np.where(k > 0, present[np.maximum(k - 1, 0), cols], False)
    above = np.where(k < sizes.size - 1, present[np.minimum(k + 1, sizes.size - 1), cols], False)
    keep = below & above
    cols, arg = cols[keep], arg[keep]
    C, N_opt, D_opt = np.exp(grid[cols]), Ns[arg], np.exp(ltok[arg, cols])
    won = int(np.unique(N_opt).size)
    if won < MIN_OPTIMA:
        reason = f"not fitted: the bracketed envelope is won by {won} size(s) (needs {MIN_OPTIMA})"
        laws = (NoFit(Status.INSUFFICIENT, reason), NoFit(Status.INSUFFICIENT, reason))
    else:
        what = "grid points"
        laws = (_allocation_law(C, N_opt, "a", None, 0.95, what), _allocation_law(C, D_opt, "b", None, 0.95, what))
    return Envelope(source=source, C=C, L_env=loss[arg, cols], N_opt=N_opt, D_opt=D_opt, N_law=laws[0],
                    D_law=laws[1])


# --- extrapolation -------------------------------------------------------------------------------------------


@dataclass
class Holdout:
    C: float  # compute of the held-out budget's frontier point
    predicted: float
    actual: float

    @property
    def error(self) -> float:
        return self.predicted - self.actual

    @property
    def rel_error(self) -> float:
        return self.error / self.actual


@dataclass
class LeaveOneOut:
    """Each budget held out in turn: the law refitted without it predicts its frontier loss."""

    holdouts: list[Holdout]
    failed: list[float] = field(default_factory=list)  # held-out budgets whose refit gave no finite prediction

    @property
    def mae(self) -> float:
        """Mean absolute error in bits per byte (NaN when nothing was held out)."""
        return float(np.mean([abs(h.error) for h in self.holdouts])) if self.holdouts else math.nan

    @property
    def mean_abs_rel_error(self) -> float:
        return float(np.mean([abs(h.rel_error) for h in self.holdouts])) if self.holdouts else math.nan


def leave_one_out(budget_of_row: np.ndarray, targets: Sequence[tuple[float, float]],
                  fit_predict: Callable[[np.ndarray, int], float | None]) -> LeaveOneOut:
    """Hold out budget k = 0..len(targets)-1 in turn: ``fit_predict(mask of the other rows, k)`` refits and returns
    the prediction at ``targets[k] = (C, actual)``, or None when the remaining rows cannot constrain the law.
    A refit whose prediction is not finite is listed in ``failed`` and left out of the mean errors."""
    budget_of_row = np.asarray(budget_of_row)
    out, failed = [], []
    for k, (C, actual) in enumerate(targets):
        try:
            pred = fit_predict(budget_of_row != k, k)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):  # a refit that breaks counts as failed
            pred = math.nan
        if pred is None:
            continue
        if math.isfinite(pred):
            out.append(Holdout(C=float(C), predicted=float(pred), actual=float(actual)))
        else:
            failed.append(float(C))
    return LeaveOneOut(out, failed)
