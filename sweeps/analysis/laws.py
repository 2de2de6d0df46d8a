"""Scaling laws: the compute frontier, the compute law L(C), Chinchilla's L(N, D) (approach 3), and compute
multipliers between groups. Natural logarithms throughout; losses in held-out bits per byte.

- ``frontier(keys, L)``: the lowest loss per budget, the one frontier every fit and table uses.
- ``fit_compute_law(C, L)``: ``L = E + A C^-alpha`` as ``log L = LSE(a - alpha log C, e)`` (``solver``).
- ``fit_chinchilla(N, D, L)``: ``L = E + A / N^alpha + B / D^beta`` (Hoffmann et al. 2022, approach 3; Huber
  delta 1e-3 on log residuals), and its closed-form compute-optimal allocation under ``C = 6 N D``.
- ``compute_multiplier(law, ref, L)``: ``C_law(L) / C_ref(L)``, the compute a group needs relative to the
  reference for the same loss, with a bootstrap interval from the two laws' resamples.

Both fits take ``clusters`` (one id per row) and ``n_boot``: the bootstrap draws whole clusters (all seeds of a
(budget, size) point together) and refits every resample (``solver.bootstrap_power_sum``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sweeps.analysis.solver import PowerSumFit, bootstrap_power_sum, fit_power_sum, percentile_ci, resample_counts
from sweeps.analysis.status import Status, law_status

LAW = "L(C) = E + A * C**(-alpha)"
CHINCHILLA_LAW = "L(N, D) = E + A / N**alpha + B / D**beta"
FLOPS_PER_PARAM_TOKEN = 6.0


def frontier(keys, L) -> np.ndarray:
    """Indices of the lowest loss per distinct key (a budget), sorted by key; ties go to the first row."""
    keys = np.asarray(keys, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    if keys.shape != L.shape:
        raise ValueError("keys and L must have the same length")
    idx = np.flatnonzero(np.isfinite(keys) & np.isfinite(L))
    order = idx[np.lexsort((L[idx], keys[idx]))]  # stable: equal (key, loss) keep their input order
    first = np.ones(order.size, dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    return order[first]


def _clusters(clusters, n: int) -> tuple[np.ndarray, int]:
    """Cluster id per row renumbered 0..m-1 in order of first appearance, and m."""
    if clusters is None:
        return np.arange(n), n
    c = np.asarray(clusters).ravel()
    if c.shape != (n,):
        raise ValueError("clusters must have one id per row")
    _, first, inv = np.unique(c, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=int)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inv], first.size


@dataclass
class Bootstrap:
    """Percentile intervals of bootstrap refits (whole clusters resampled)."""

    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    level: float = 0.95
    n: int = 0  # successful resamples
    n_requested: int = 0


def _bootstrap(core: PowerSumFit, clusters, n_boot: int, seed: int, level: float, to_params,
               extra_starts: int = 3) -> Bootstrap:
    cl, m = _clusters(clusters, core.y.size)
    thetas = bootstrap_power_sum(core, resample_counts(m, n_boot, seed, cl), extra_starts=extra_starts)
    with np.errstate(over="ignore", invalid="ignore"):  # a wild resample may have A = inf: the honest value
        samples = to_params(core, thetas)
    return Bootstrap(ci={k: percentile_ci(v, level) for k, v in samples.items()}, samples=samples, level=level,
                     n=int(np.isfinite(thetas[:, 0]).sum()), n_requested=n_boot)


# --- the compute law -----------------------------------------------------------------------------------------


@dataclass
class ComputeLaw:
    """``L(C) = E + A * C**(-alpha)`` fitted to rows ``C, L``."""

    E: float
    A: float
    alpha: float
    C: np.ndarray
    L: np.ndarray
    rms_log_residual: float
    objective: float
    grad_norm: float
    status: Status
    flags: list[str]
    boot: Bootstrap
    core: PowerSumFit

    def predict(self, C) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(C, dtype=float), -self.alpha)

    def refit(self, keep: np.ndarray) -> dict[str, float]:
        """Parameters refitted to the rows where ``keep`` is true, warm-started from this fit's optima and grid
        starts (the bootstrap's solver with zero weight on the other rows; tests compare with full refits)."""
        theta = bootstrap_power_sum(self.core, np.asarray(keep, dtype=float)[None, :])
        with np.errstate(over="ignore", invalid="ignore"):
            return {k: float(v[0]) for k, v in _compute_law_params(self.core, theta).items()}

    def predict_samples(self, C) -> np.ndarray:
        """Bootstrap predictions (resamples with finite parameters, len(C))."""
        s = self.boot.samples
        good = np.isfinite(s["E"]) & np.isfinite(s["A"]) & np.isfinite(s["alpha"])
        C = np.asarray(C, dtype=float)[None, :]
        return s["E"][good, None] + s["A"][good, None] * np.power(C, -s["alpha"][good, None])


def compute_for_loss(L: float, E, A, alpha):
    """C(L) = (A / (L - E))^(1 / alpha) of compute laws (arrays broadcast); inf where L <= E."""
    E, A, alpha = (np.asarray(v, dtype=float) for v in (E, A, alpha))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.power(A / (L - E), 1.0 / alpha)
    return np.where(L > E, out, np.inf)


def _compute_law_params(core: PowerSumFit, theta) -> dict[str, np.ndarray]:
    a, al, e = core.public(theta)
    return {"E": np.exp(e), "A": np.exp(a[..., 0]), "alpha": al[..., 0]}


def fit_compute_law(C, L, *, clusters=None, n_boot: int = 0, seed: int = 0, level: float = 0.95,
                    huber_delta: float = 1e-3) -> ComputeLaw:
    """Fit ``L = E + A C^-alpha`` to the rows as given (pass frontier rows), with a whole-cluster bootstrap."""
    C = np.asarray(C, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    if C.shape != L.shape:
        raise ValueError("C and L must have the same length")
    if np.any(C <= 0):
        raise ValueError("C must be positive")
    core = fit_power_sum(np.log(C)[:, None], L, delta=huber_delta, n_starts=6)
    p = {k: float(v) for k, v in _compute_law_params(core, core.theta).items()}
    boot = _bootstrap(core, clusters, n_boot, seed, level, _compute_law_params) if n_boot > 0 else Bootstrap()
    status, flags = law_status(n_distinct=np.unique(C).size, n_params=3, E=p["E"], L_min=float(L.min()),
                               exponents={"alpha": p["alpha"]}, ci=boot.ci, exponent_step=core.exponent_step)
    return ComputeLaw(E=p["E"], A=p["A"], alpha=p["alpha"], C=C, L=L, rms_log_residual=core.rms_log_residual,
                      objective=core.objective, grad_norm=core.grad_norm, status=status, flags=flags, boot=boot,
                      core=core)


# --- Chinchilla approach 3 -----------------------------------------------------------------------------------


@dataclass
class Allocation:
    """Compute-optimal N and D of a Chinchilla law under ``C = k N D``: ``N_opt = G (C/k)^a``, ``D_opt = (C/k)/N_opt``."""

    N_opt: np.ndarray
    D_opt: np.ndarray
    L_opt: np.ndarray
    a: float
    b: float
    G: float


def compute_optimal_allocation(C, E, A, B, alpha, beta, *, k: float = FLOPS_PER_PARAM_TOKEN) -> Allocation:
    """Closed form: ``a = beta / (alpha + beta)``, ``b = alpha / (alpha + beta)``,
    ``G = (alpha A / (beta B))^(1 / (alpha + beta))`` (minimising the law along ``N D = C / k``)."""
    C = np.asarray(C, dtype=float)
    s = alpha + beta
    G = (alpha * A / (beta * B)) ** (1.0 / s)
    N_opt = G * (C / k) ** (beta / s)
    D_opt = C / k / N_opt
    return Allocation(N_opt=N_opt, D_opt=D_opt, L_opt=E + A * N_opt ** (-alpha) + B * D_opt ** (-beta),
                      a=beta / s, b=alpha / s, G=G)


@dataclass
class ChinchillaLaw:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (approach 3)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n_rows: int
    rms_log_residual: float
    objective: float
    grad_norm: float
    status: Status
    flags: list[str]
    boot: Bootstrap
    core: PowerSumFit

    def predict(self, N, D) -> np.ndarray:
        return chinchilla_loss(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    def allocation(self, C) -> Allocation:
        return compute_optimal_allocation(C, self.E, self.A, self.B, self.alpha, self.beta)

    def refit(self, keep: np.ndarray) -> dict[str, float]:
        """Parameters refitted to the rows where ``keep`` is true, warm-started from this fit's optima (the
        batched solver with zero weight on the other rows; a full refit finds the same optimum, tests check)."""
        theta = bootstrap_power_sum(self.core, np.asarray(keep, dtype=float)[None, :])
        with np.errstate(over="ignore", invalid="ignore"):
            return {k: float(v[0]) for k, v in _chinchilla_params(self.core, theta).items()}


def chinchilla_loss(N, D, E, A, B, alpha, beta) -> np.ndarray:
    """``E + A / N**alpha + B / D**beta`` (inf where a wild refit overflows)."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        return E + A * N ** (-alpha) + B * D ** (-beta)


def _chinchilla_params(core: PowerSumFit, theta) -> dict[str, np.ndarray]:
    a, al, e = core.public(theta)
    alpha, beta = al[..., 0], al[..., 1]
    return {"E": np.exp(e), "A": np.exp(a[..., 0]), "B": np.exp(a[..., 1]), "alpha": alpha, "beta": beta,
            "a": beta / (alpha + beta), "b": alpha / (alpha + beta)}  # a, b: exponents of N*(C), D*(C)


def fit_chinchilla(N, D, L, *, clusters=None, n_boot: int = 0, seed: int = 0, level: float = 0.95,
                   huber_delta: float = 1e-3, n_starts: int = 8, n_polish: int = 3) -> ChinchillaLaw:
    """Approach-3 fit (Huber on log residuals, summed) with a whole-cluster bootstrap."""
    N, D, L = (np.asarray(v, dtype=float).ravel() for v in (N, D, L))
    if not (N.shape == D.shape == L.shape):
        raise ValueError("N, D, L must have the same length")
    if np.any(N <= 0) or np.any(D <= 0):
        raise ValueError("N and D must be positive")
    core = fit_power_sum(np.stack([np.log(N), np.log(D)], axis=1), L, delta=huber_delta, n_starts=n_starts,
                         n_polish=n_polish)
    p = {k: float(v) for k, v in _chinchilla_params(core, core.theta).items()}
    # two warm starts per resample: the same intervals as four on the Chinchilla data (checked), half the time
    boot = (_bootstrap(core, clusters, n_boot, seed, level, _chinchilla_params, extra_starts=1) if n_boot > 0
            else Bootstrap())
    n_distinct = np.unique(np.stack([N, D], axis=1), axis=0).shape[0]
    status, flags = law_status(n_distinct=n_distinct, n_params=5, E=p["E"], L_min=float(L.min()),
                               exponents={"alpha": p["alpha"], "beta": p["beta"]}, ci=boot.ci,
                               exponent_step=core.exponent_step)
    return ChinchillaLaw(E=p["E"], A=p["A"], B=p["B"], alpha=p["alpha"], beta=p["beta"], n_rows=L.size,
                         rms_log_residual=core.rms_log_residual, objective=core.objective, grad_norm=core.grad_norm,
                         status=status, flags=flags, boot=boot, core=core)


# --- compute multipliers -------------------------------------------------------------------------------------


@dataclass
class Multiplier:
    """``C_group(L) / C_reference(L)`` from two compute laws at a loss both groups reached."""

    reference: str
    L: float | None = None
    C_reference: float | None = None
    C_group: float | None = None
    multiplier: float | None = None
    ci: tuple[float, float] = (math.nan, math.nan)
    n_bootstrap: int = 0
    reason: str | None = None


def compute_multiplier(law: ComputeLaw, ref: ComputeLaw, L_common: float, reference: str) -> Multiplier:
    """Point estimate from the two laws; interval from pairing their i-th bootstrap resamples."""
    m = Multiplier(reference=reference, L=float(L_common))
    m.C_reference = float(compute_for_loss(L_common, ref.E, ref.A, ref.alpha))
    m.C_group = float(compute_for_loss(L_common, law.E, law.A, law.alpha))
    if not (math.isfinite(m.C_reference) and math.isfinite(m.C_group)):
        m.reason = f"a fitted law does not reach L={L_common:.4g} (its E is above it)"
        return m
    m.multiplier = m.C_group / m.C_reference
    sg, sr = law.boot.samples, ref.boot.samples
    if sg and sr:
        n = min(len(sg["E"]), len(sr["E"]))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (compute_for_loss(L_common, sg["E"][:n], sg["A"][:n], sg["alpha"][:n])
                     / compute_for_loss(L_common, sr["E"][:n], sr["A"][:n], sr["alpha"][:n]))
        m.ci = percentile_ci(ratio, law.boot.level)
        m.n_bootstrap = int(np.isfinite(ratio).sum())
    return m
