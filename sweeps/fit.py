"""Scaling-law fitting: Chinchilla approaches 1, 2 and 3, compute laws, bootstrap CIs.

All functions are pure numpy/scipy, keep no global state and do no work at import time.
Natural logarithms are used throughout.

Approach 3 (parametric fit), ``fit_chinchilla(N, D, L)``
    ``L = E + A / N**alpha + B / D**beta`` fitted as
    ``log L = LSE(a - alpha log N, b - beta log D, e)`` (``A = e^a, B = e^b, E = e^e``) by minimising the
    *sum* of Huber losses (``huber_delta = 1e-3``) of the log-loss residuals. Robust starts without
    thousands of L-BFGS runs: for fixed exponents the model is linear in ``(E, A, B) >= 0``, so a dense
    (alpha, beta) grid on (0, 2.5] is profiled with non-negative weighted least squares (weights ``1 / L^2``
    turn linear residuals into log residuals to first order) plus a few Huber IRLS re-weightings. The best
    distinct grid points start a batched, damped Gauss-Newton / IRLS solver (Levenberg-Marquardt on the true
    Huber objective, analytic Jacobian), and the best few local optima are polished with L-BFGS-B
    (``scipy.optimize.minimize``, analytic gradient). Internally ``log N`` and ``log D`` are centred for
    conditioning; the returned ``a, b`` are the uncentred ones.

``fit_compute_law(C, L)``
    ``L = E + A * C**(-alpha)``, i.e. ``log L = LSE(a - alpha log C, e)``, same machinery (1-D alpha grid).
    By default the data are first reduced to the lowest loss per distinct budget (``compute_frontier``
    without the monotone filter); pass ``frontier=False`` to fit the points as given, or pass a frontier.

``compute_frontier(C, L, n_bins=None, monotone=True)``
    Lower envelope: min loss per distinct budget (or per log-spaced bin), sorted by compute and, with
    ``monotone=True``, restricted to points that improve on every smaller budget (non-increasing).

Bootstrap API (percentile intervals; resamples rows with replacement)
    ``bootstrap(fit_fn, *arrays, n=1000, seed=0, ci=0.95)`` -- generic: calls ``fit_fn`` on every resample.
    ``fit_chinchilla_bootstrap(N, D, L, n=1000, seed=0, ci=0.95)`` and
    ``fit_compute_law_bootstrap(C, L, n=1000, seed=0, ci=0.95)`` -- fast: a resample is a vector of
    multiplicity weights on the original points, and all resamples are solved at once by the batched
    solver, warm-started from the full-data optimum and the other best local optima / grid starts.
    For a given ``seed`` the resamples are identical to those of ``bootstrap``.
    All three return a dict::

        {<param>: point estimate (full data), ...,
         "fit": full-data fit dict, "ci": {<param>: (lo, hi)}, "samples": {<param>: array},
         "n": number of successful resamples, "n_requested": n, "ci_level": ci}

Approach 2 (IsoFLOP), ``fit_isoflop(C, N, L, ...)``
    Groups points by budget (relative tolerance ``rtol=0.05``), fits ``L = c0 + c1 x + c2 x^2`` with
    ``x = log N`` per budget (>= 3 points, distinct sizes and ``c2 > 0``; other budgets are reported in
    ``skipped``), takes the vertex ``N*`` and ``L*``, ``D* = C / (6 N*)`` (factor ``flops_per_param_token``;
    or, when ``D`` is passed, ``D*`` from a per-budget log-log line of D on N evaluated at ``N*``), and fits
    ``N* = G C^a`` and ``D* = G' C^b`` by least squares in log-log. Bootstrap CIs on ``a, b`` resample points
    within each budget.

Approach 1, ``fit_approach1(curves)``
    ``curves``: list of dicts with arrays ``flops`` and ``loss``, the run's ``params`` (N) and optionally
    ``tokens``. On a log-spaced flop grid the loss of every run is interpolated (linear in log flops), the
    envelope (minimum over runs) and its argmin run give ``N_opt(C)``; ``D_opt`` from the run's ``tokens``
    (interpolated) or ``C / (6 N)``. By default a grid point is kept only if the winning size is bracketed
    by data of both neighbouring sizes at that compute (drops the smallest / largest model and runs whose
    neighbours had ended or not yet started: the optimum could lie outside the runs available). Power laws
    fitted by least squares in log-log.

``extrapolation_check(C, L, fit=fit_compute_law)``
    Holds out the largest budget of the frontier, fits the rest and compares prediction and actual loss.

Helpers: ``chinchilla_loss``, ``compute_optimal_allocation`` (closed-form compute-optimal N, D of a fitted
Chinchilla law: ``N_opt = G (C/6)^(beta/(alpha+beta))``, ``G = (alpha A / (beta B))^(1/(alpha+beta))``),
``huber``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "huber",
    "fit_chinchilla",
    "fit_chinchilla_bootstrap",
    "fit_compute_law",
    "fit_compute_law_bootstrap",
    "compute_frontier",
    "bootstrap",
    "fit_isoflop",
    "fit_approach1",
    "extrapolation_check",
    "chinchilla_loss",
    "compute_optimal_allocation",
    "fit_power_law",
]

_DEFAULT_EXPONENT_MAX = 2.5


# ----------------------------------------------------------------------------------------------------------
# Huber loss
# ----------------------------------------------------------------------------------------------------------


def huber(r: np.ndarray, delta: float = 1e-3) -> np.ndarray:
    """Elementwise Huber loss: ``r^2 / 2`` for ``|r| <= delta``, else ``delta (|r| - delta / 2)``."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


# ----------------------------------------------------------------------------------------------------------
# Generic engine: log L = LSE(a_1 - alpha_1 z_1, ..., a_K - alpha_K z_K, e), z centred log features.
# Internal parameter vector theta = (a'_1..a'_K, alpha_1..alpha_K, e) with a'_k = a_k - alpha_k * z0_k.
# ----------------------------------------------------------------------------------------------------------


def _res_jac(theta: np.ndarray, Z: np.ndarray, y: np.ndarray, jac: bool = True):
    """Residuals r = model - y (M, n) and transposed Jacobian JT (M, P, n) for parameter vectors (M, P)."""
    M = theta.shape[0]
    n, K = Z.shape
    terms = [theta[:, k, None] - theta[:, K + k, None] * Z[None, :, k] for k in range(K)]
    e = np.broadcast_to(theta[:, 2 * K, None], (M, n))
    m = e
    for t in terms:
        m = np.maximum(m, t)
    ex = [np.exp(t - m) for t in terms]
    ee = np.exp(e - m)
    s = ee + sum(ex)
    r = m + np.log(s) - y[None, :]
    if not jac:
        return r, None
    inv = 1.0 / s
    JT = np.empty((M, 2 * K + 1, n))
    for k in range(K):
        p = ex[k] * inv
        JT[:, k] = p
        np.multiply(p, -Z[None, :, k], out=JT[:, K + k])
    np.multiply(ee, inv, out=JT[:, 2 * K])
    return r, JT


def _huber_sum(r: np.ndarray, W: np.ndarray, delta: float) -> np.ndarray:
    f = (huber(r, delta) * W).sum(axis=-1)
    return np.where(np.isfinite(f), f, np.inf)


def _lm_batch(
    theta0: np.ndarray,
    Z: np.ndarray,
    y: np.ndarray,
    W: np.ndarray,
    delta: float,
    *,
    max_iter: int = 300,
    ftol: float = 1e-13,
    xtol: float = 1e-9,
    outlier_weight: float = 0.01,
):
    """Batched damped Gauss-Newton / IRLS (Levenberg-Marquardt) on the Huber objective.

    The gradient ``J^T psi(r)`` is exact. The quadratic model weights points in the quadratic zone by 1 and
    the others by ``outlier_weight * delta / |r|`` (``outlier_weight = 1`` is the classic IRLS majoriser;
    small values approach the semismooth Gauss-Newton model of the Huber loss, which needs far fewer
    iterations -- median ~16 instead of ~80 on the Chinchilla data -- while a floor of curvature keeps the
    system well posed). A step is accepted only if it lowers the true Huber objective (else more damping).
    ``W`` (M, n) or (n,) are per-point multiplicities (bootstrap counts). Finished problems are removed
    from the working arrays in batches. Returns ``theta, f, converged, n_iter``.
    """
    theta_out = np.array(theta0, dtype=float, copy=True)
    M, P = theta_out.shape
    W_all = np.broadcast_to(np.asarray(W, dtype=float), (M, y.shape[0]))
    r, JT = _res_jac(theta_out, Z, y)
    f = _huber_sum(r, W_all, delta)
    f_out = f.copy()
    converged = np.zeros(M, dtype=bool)
    n_iter = np.zeros(M, dtype=int)
    # working set (compacted as problems finish): live maps rows to problem indices
    live = np.flatnonzero(np.isfinite(f))
    th, r, JT, f, Wl = theta_out[live], r[live], JT[live], f[live], np.ascontiguousarray(W_all[live])
    lam = np.full(live.size, 1e-3)
    done = np.zeros(live.size, dtype=bool)
    eye = np.eye(P)

    def flush(rows):
        theta_out[live[rows]] = th[rows]
        f_out[live[rows]] = f[rows]

    for it in range(1, max_iter + 1):
        if live.size == 0:
            break
        absr = np.abs(r)
        psi = np.clip(r, -delta, delta) * Wl
        wq = Wl * np.where(absr <= delta, 1.0, outlier_weight * delta / np.maximum(absr, delta))
        g = np.matmul(JT, psi[:, :, None])[:, :, 0]
        H = np.matmul(JT * wq[:, None, :], JT.transpose(0, 2, 1))
        dH = np.einsum("mpp->mp", H)
        damp = lam[:, None] * dH + 1e-14 * dH.max(axis=1)[:, None] + 1e-300
        A = H + damp[:, :, None] * eye[None]
        try:
            step = -np.linalg.solve(A, g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.stack([-np.linalg.lstsq(A[i], g[i], rcond=None)[0] for i in range(live.size)])
        t_new = th + step
        r_new, JT_new = _res_jac(t_new, Z, y)
        f_new = _huber_sum(r_new, Wl, delta)
        acc = np.isfinite(f_new) & (f_new <= f) & np.all(np.isfinite(step), axis=1)
        small_f = (f - f_new) <= ftol * np.maximum(f, 1e-300)
        # keep the old state in rejected rows, then swap (copies only the rejected rows)
        rej = ~acc
        t_new[rej], r_new[rej], JT_new[rej], f_new[rej] = th[rej], r[rej], JT[rej], f[rej]
        th, r, JT, f = t_new, r_new, JT_new, f_new
        lam = np.where(acc, np.maximum(lam / 3.0, 1e-10), lam * 6.0)
        small_x = np.max(np.abs(step), axis=1) <= xtol * (1.0 + np.max(np.abs(th), axis=1))
        newly = ~done & ((acc & small_f & small_x) | (rej & (lam > 1e12)))
        converged[live[newly]] = True
        n_iter[live[newly]] = it
        done |= newly
        if done.sum() >= max(1, live.size // 8) or it == max_iter:
            flush(done)
            keep = ~done
            live, th, r, JT = live[keep], th[keep], r[keep], JT[keep]
            f, Wl, lam, done = f[keep], Wl[keep], lam[keep], done[keep]
    if live.size:
        flush(np.ones(live.size, dtype=bool))
        n_iter[live] = max_iter
    return theta_out, f_out, converged, n_iter


def _profile_grid(
    Z: np.ndarray,
    L: np.ndarray,
    W: np.ndarray,
    delta: float,
    grids: Sequence[np.ndarray],
    *,
    irls_iter: int = 6,
    chunk: int = 2048,
):
    """For every exponent combination on the grid, fit the linear coefficients (E, A_k) >= 0.

    Minimises ``sum w_i (E + sum_k A_k x_ik - L_i)^2`` with ``x_ik = exp(-alpha_k z_ik)`` and weights
    ``w = W / L^2`` times Huber IRLS weights of the log residual (a few re-weightings). NNLS over K+1
    coefficients is done exactly by enumerating active sets. Returns (alphas (G, K), theta (G, P),
    objective (G,)) where objective is the true Huber sum of log residuals.
    """
    n, K = Z.shape
    alphas = np.stack([g.ravel() for g in np.meshgrid(*grids, indexing="ij")], axis=1)
    y = np.log(L)
    base_w = W / L**2
    subsets = [s for k in range(1, K + 2) for s in itertools.combinations(range(K + 1), k)]
    thetas, objs = [], []
    floor = 1e-8 * float(np.median(L))
    for start in range(0, alphas.shape[0], chunk):
        al = alphas[start : start + chunk]
        B = al.shape[0]
        F = np.empty((B, n, K + 1))
        F[:, :, 0] = 1.0
        F[:, :, 1:] = np.exp(-al[:, None, :] * Z[None, :, :])
        hw = np.ones((B, n))
        for it in range(irls_iter + 1):
            w = base_w[None, :] * hw
            Fw = F * w[:, :, None]
            G = np.matmul(Fw.transpose(0, 2, 1), F)
            h = np.einsum("bni,n->bi", Fw, L)
            best_q = np.full(B, np.inf)
            coef = np.zeros((B, K + 1))
            for s in subsets:
                s = list(s)
                Gs = G[:, s][:, :, s]
                ridge = 1e-13 * np.einsum("bii->b", Gs)[:, None, None] * np.eye(len(s))[None]
                try:
                    cs = np.linalg.solve(Gs + ridge, h[:, s][:, :, None])[:, :, 0]
                except np.linalg.LinAlgError:
                    cs = np.stack([np.linalg.lstsq(Gs[i], h[i, s], rcond=None)[0] for i in range(B)])
                full = np.zeros((B, K + 1))
                full[:, s] = cs
                q = np.einsum("bi,bij,bj->b", full, G, full) - 2.0 * np.einsum("bi,bi->b", full, h)
                ok = np.all(cs >= 0, axis=1) & np.all(np.isfinite(cs), axis=1) & (q < best_q)
                best_q = np.where(ok, q, best_q)
                coef[ok] = full[ok]
            pred = np.einsum("bni,bi->bn", F, coef)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.log(np.maximum(pred, 1e-300)) - y[None, :]
            if it < irls_iter:
                hw = delta / np.maximum(np.abs(r), delta)
        obj = _huber_sum(r, W[None, :], delta)
        c = np.maximum(coef, floor)
        th = np.empty((B, 2 * K + 1))
        th[:, :K] = np.log(c[:, 1:])
        th[:, K : 2 * K] = al
        th[:, 2 * K] = np.log(c[:, 0])
        thetas.append(th)
        objs.append(obj)
    return alphas, np.concatenate(thetas), np.concatenate(objs)


def _select_distinct(alphas: np.ndarray, obj: np.ndarray, k: int, radius: float) -> np.ndarray:
    """Indices of the ``k`` best grid points, greedily skipping points within ``radius`` (max-norm)."""
    order = np.argsort(obj, kind="stable")
    chosen: list[int] = []
    for i in order:
        if not np.isfinite(obj[i]):
            break
        if all(np.max(np.abs(alphas[i] - alphas[j])) > radius for j in chosen):
            chosen.append(int(i))
            if len(chosen) >= k:
                break
    return np.asarray(chosen, dtype=int)


def _lbfgs_polish(theta0: np.ndarray, Z: np.ndarray, y: np.ndarray, W: np.ndarray, delta: float):
    """L-BFGS-B (scipy) on the Huber objective (scaled by 1/delta), analytic gradient."""

    def fun(t):
        r, J = _res_jac(t[None, :], Z, y)
        psi = np.clip(r[0], -delta, delta) * W
        f = float((huber(r[0], delta) * W).sum())
        g = J[0] @ psi
        if not np.isfinite(f):
            return 1e300, np.zeros_like(t)
        return f / delta, g / delta

    res = minimize(
        fun,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20000, "maxfun": 50000, "ftol": 1e-15, "gtol": 1e-11, "maxcor": 30},
    )
    return res.x, res.fun * delta, res


def _fit_power_sum(
    logX: np.ndarray,
    L: np.ndarray,
    *,
    delta: float,
    weights: np.ndarray | None = None,
    grid_size: int | None = None,
    exponent_max: float = _DEFAULT_EXPONENT_MAX,
    n_starts: int = 8,
    n_polish: int = 3,
):
    """Core robust fit of ``log L = LSE(a_k - alpha_k logX_k, e)``; returns an internal result dict."""
    logX = np.asarray(logX, dtype=float)
    if logX.ndim == 1:
        logX = logX[:, None]
    L = np.asarray(L, dtype=float)
    n, K = logX.shape
    if L.shape != (n,):
        raise ValueError("inputs must be 1-D arrays of equal length")
    if not (np.all(np.isfinite(logX)) and np.all(np.isfinite(L)) and np.all(L > 0)):
        raise ValueError("inputs must be finite and losses positive")
    if n < 2 * K + 1:
        raise ValueError(f"need at least {2 * K + 1} points, got {n}")
    W = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    z0 = logX.mean(axis=0)
    Z = logX - z0
    y = np.log(L)
    if grid_size is None:
        grid_size = 100 if K == 2 else 500 if K == 1 else 24
    step = exponent_max / grid_size
    grid = np.linspace(step, exponent_max, grid_size)
    alphas, thetas, objs = _profile_grid(Z, L, W, delta, [grid] * K)
    radius = max(0.1, 3 * step)
    sel = _select_distinct(alphas, objs, n_starts, radius)
    if sel.size == 0:
        raise ValueError("no finite starting point found on the exponent grid")
    starts = thetas[sel]
    th, f, conv, _ = _lm_batch(starts, Z, y, W, delta)
    order = np.argsort(f, kind="stable")
    # distinct local optima (by exponents)
    optima: list[int] = []
    for i in order:
        exps = th[i, K : 2 * K]
        if np.isfinite(f[i]) and all(np.max(np.abs(exps - th[j, K : 2 * K])) > 1e-4 for j in optima):
            optima.append(int(i))
    best_theta, best_f, best_res = th[order[0]], f[order[0]], None
    for i in optima[:n_polish]:
        tp, fp, res = _lbfgs_polish(th[i], Z, y, W, delta)
        if fp < best_f:
            best_theta, best_f, best_res = tp, fp, res
    r, J = _res_jac(best_theta[None, :], Z, y)
    grad = J[0] @ (np.clip(r[0], -delta, delta) * W)
    return {
        "theta": best_theta,
        "objective": float(best_f),
        "z0": z0,
        "K": K,
        "grad_norm": float(np.linalg.norm(grad)),
        "residuals": r[0],
        "lm_thetas": th[order],
        "lm_objectives": f[order],
        "lm_converged": conv[order],
        "optima_thetas": th[optima],
        "optima_objectives": f[optima],
        "n_grid": int(alphas.shape[0]),
        "grid_best_objective": float(np.min(objs)),
        "n_starts": int(sel.size),
        "n_local_optima": len(optima),
        "lbfgs_message": None if best_res is None else str(best_res.message),
        "polished_from": "lbfgs" if best_res is not None else "lm",
        "starts": starts,
        "Z": Z,
        "y": y,
    }


def _theta_to_public(theta: np.ndarray, z0: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(a_k uncentred, alpha_k, e) from an internal parameter vector."""
    ap = theta[:K]
    al = theta[K : 2 * K]
    return ap + al * z0, al, float(theta[2 * K])


# ----------------------------------------------------------------------------------------------------------
# Approach 3
# ----------------------------------------------------------------------------------------------------------


def _chinchilla_params(theta: np.ndarray, z0: np.ndarray) -> dict[str, float]:
    a, al, e = _theta_to_public(theta, z0, 2)
    with np.errstate(over="ignore"):  # a degenerate bootstrap resample may have A = inf; say nothing
        return {
            "E": float(np.exp(e)),
            "A": float(np.exp(a[0])),
            "B": float(np.exp(a[1])),
            "alpha": float(al[0]),
            "beta": float(al[1]),
            "a": float(a[0]),
            "b": float(a[1]),
            "e": e,
        }


def _chinchilla_inputs(N, D, L):
    N = np.asarray(N, dtype=float).ravel()
    D = np.asarray(D, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    if not (N.shape == D.shape == L.shape):
        raise ValueError("N, D, L must have the same length")
    if np.any(N <= 0) or np.any(D <= 0):
        raise ValueError("N and D must be positive")
    return np.stack([np.log(N), np.log(D)], axis=1), L


def fit_chinchilla(N, D, L, *, huber_delta: float = 1e-3, n_starts: int = 8,
                   n_polish: int = 3) -> dict[str, Any]:
    """Approach-3 fit of ``L = E + A / N**alpha + B / D**beta`` (Huber on log residuals, summed).

    Returns a dict with ``E, A, B, alpha, beta`` (and ``a, b, e`` = logs), ``objective`` (sum of Huber
    losses), ``huber_delta``, ``n_points``, ``grad_norm``, ``rms_log_residual``, ``n_grid`` (profiled
    exponent pairs), ``n_starts`` (local solves), ``n_local_optima`` (distinct optima found),
    ``local_optima`` (list of (objective, params) for the distinct optima) and ``method``.
    """
    logX, L = _chinchilla_inputs(N, D, L)
    core = _fit_power_sum(logX, L, delta=huber_delta, n_starts=n_starts, n_polish=n_polish)
    out = _chinchilla_params(core["theta"], core["z0"])
    out.update(_diagnostics(core, huber_delta, L.size))
    out["local_optima"] = [(float(f), _chinchilla_params(t, core["z0"]))
                           for f, t in zip(core["optima_objectives"], core["optima_thetas"])]
    return out


def _diagnostics(core: dict, delta: float, n: int) -> dict[str, Any]:
    r = core["residuals"]
    return {
        "objective": core["objective"],
        "huber_delta": float(delta),
        "n_points": int(n),
        "grad_norm": core["grad_norm"],
        "rms_log_residual": float(np.sqrt(np.mean(r * r))),
        "n_grid": core["n_grid"],
        "grid_best_objective": core["grid_best_objective"],
        "n_starts": core["n_starts"],
        "n_local_optima": core["n_local_optima"],
        "method": f"NNLS exponent grid -> batched LM/IRLS -> L-BFGS-B (best from {core['polished_from']})",
    }


def chinchilla_loss(N, D, params: dict[str, float]) -> np.ndarray:
    """Evaluate ``E + A / N**alpha + B / D**beta`` with a parameter dict (e.g. a fit result)."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    return params["E"] + params["A"] * N ** (-params["alpha"]) + params["B"] * D ** (-params["beta"])


def compute_optimal_allocation(C, E=None, A=None, B=None, alpha=None, beta=None, *, params=None,
                               flops_per_param_token: float = 6.0) -> dict[str, Any]:
    """Closed-form compute-optimal allocation of a Chinchilla law under ``C = k N D`` (k = 6).

    ``N_opt = G (C/k)^a``, ``D_opt = (C/k)^b / G`` with ``a = beta/(alpha+beta)``, ``b = alpha/(alpha+beta)``,
    ``G = (alpha A / (beta B))^(1/(alpha+beta))``. Pass the law either as keywords or as ``params`` (a fit).
    Returns ``N_opt, D_opt, L_opt, a, b, G``.
    """
    if params is not None:
        E, A, B, alpha, beta = (params[k] for k in ("E", "A", "B", "alpha", "beta"))
    C = np.asarray(C, dtype=float)
    s = alpha + beta
    G = (alpha * A / (beta * B)) ** (1.0 / s)
    Ck = C / flops_per_param_token
    N_opt = G * Ck ** (beta / s)
    D_opt = Ck / N_opt
    L_opt = E + A * N_opt ** (-alpha) + B * D_opt ** (-beta)
    return {"N_opt": N_opt, "D_opt": D_opt, "L_opt": L_opt, "a": beta / s, "b": alpha / s, "G": G}


# ----------------------------------------------------------------------------------------------------------
# Compute law and frontier
# ----------------------------------------------------------------------------------------------------------


def compute_frontier(C, L, n_bins: int | None = None, *, monotone: bool = True,
                     return_index: bool = False):
    """Lower envelope of loss vs compute.

    ``n_bins=None``: minimum loss per distinct budget; otherwise per log-spaced bin over [min C, max C]
    (the point achieving the bin minimum keeps its own C). Sorted by C. With ``monotone=True`` only points
    strictly below every smaller budget's frontier loss are kept, so the result is non-increasing.
    Returns ``(C_f, L_f)`` (plus the indices into the inputs if ``return_index``).
    """
    C = np.asarray(C, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    if C.shape != L.shape:
        raise ValueError("C and L must have the same length")
    ok = np.isfinite(C) & np.isfinite(L) & (C > 0)
    idx_all = np.flatnonzero(ok)
    if n_bins is None:
        keys = C[idx_all]
    else:
        lc = np.log(C[idx_all])
        edges = np.linspace(lc.min(), lc.max(), int(n_bins) + 1)
        keys = np.clip(np.searchsorted(edges, lc, side="right") - 1, 0, int(n_bins) - 1).astype(float)
    # sort by (key, loss): the first row of each key is its minimum
    order = np.lexsort((L[idx_all], keys))
    k_sorted = keys[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = k_sorted[1:] != k_sorted[:-1]
    sel = idx_all[order[first]]
    sel = sel[np.argsort(C[sel], kind="stable")]
    if monotone and sel.size:
        running = np.minimum.accumulate(L[sel])
        keep = np.ones(sel.size, dtype=bool)
        keep[1:] = L[sel][1:] < running[:-1]
        sel = sel[keep]
    if return_index:
        return C[sel], L[sel], sel
    return C[sel], L[sel]


def _compute_law_params(theta: np.ndarray, z0: np.ndarray) -> dict[str, float]:
    a, al, e = _theta_to_public(theta, z0, 1)
    with np.errstate(over="ignore"):  # as in _chinchilla_params: A = inf is the honest value
        return {"E": float(np.exp(e)), "A": float(np.exp(a[0])), "alpha": float(al[0]), "a": float(a[0]), "e": e}


def _compute_law_inputs(C, L, frontier, n_bins, monotone):
    C = np.asarray(C, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    if C.shape != L.shape:
        raise ValueError("C and L must have the same length")
    if frontier:
        C, L = compute_frontier(C, L, n_bins=n_bins, monotone=monotone)
    if np.any(C <= 0):
        raise ValueError("C must be positive")
    return C, L


def fit_compute_law(C, L, *, huber_delta: float = 1e-3, frontier: bool = True, n_bins: int | None = None,
                    monotone: bool = False, n_starts: int = 6, n_polish: int = 3) -> dict[str, Any]:
    """Fit ``L = E + A * C**(-alpha)`` as ``log L = LSE(a - alpha log C, e)`` with Huber on log residuals.

    With ``frontier=True`` (default) the data are first reduced by ``compute_frontier(C, L, n_bins,
    monotone=monotone)`` -- by default the lowest loss per distinct budget, which leaves one-point-per-budget
    data (e.g. an already computed frontier) unchanged. Returns ``E, A, alpha, a, e`` plus the diagnostics of
    ``fit_chinchilla`` and the fitted arrays ``C``, ``L``.
    """
    C, L = _compute_law_inputs(C, L, frontier, n_bins, monotone)
    core = _fit_power_sum(np.log(C)[:, None], L, delta=huber_delta, n_starts=n_starts, n_polish=n_polish)
    out = _compute_law_params(core["theta"], core["z0"])
    out.update(_diagnostics(core, huber_delta, L.size))
    out["C"] = C
    out["L"] = L
    return out


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------


def _resample_indices(m: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, m, size=(n, m))


def _percentile_ci(samples: dict[str, np.ndarray], ci: float) -> dict[str, tuple[float, float]]:
    lo_q, hi_q = 100.0 * (1.0 - ci) / 2.0, 100.0 * (1.0 + ci) / 2.0
    out = {}
    for k, v in samples.items():
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            out[k] = (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q)))
        else:
            out[k] = (np.nan, np.nan)
    return out


def _scalar_items(d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, np.bool_)):
            continue
        if isinstance(v, (int, float, np.integer, np.floating)):
            out[k] = float(v)
    return out


def bootstrap(fit_fn: Callable[..., dict], *arrays, n: int = 1000, seed: int = 0, ci: float = 0.95,
              keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Generic nonparametric bootstrap: resample rows of ``arrays`` jointly, refit with ``fit_fn``.

    ``fit_fn(*arrays)`` must return a dict; its numeric scalar entries (or ``keys``) are collected. Failed
    resamples (exceptions) are skipped and counted in ``n_failed``. Returns the dict described in the module
    docstring. Slow for expensive fits -- see ``fit_chinchilla_bootstrap`` / ``fit_compute_law_bootstrap``.
    """
    arrays = [np.asarray(a) for a in arrays]
    m = arrays[0].shape[0]
    if any(a.shape[0] != m for a in arrays):
        raise ValueError("all arrays must have the same length")
    est = fit_fn(*arrays)
    names = list(keys) if keys is not None else list(_scalar_items(est))
    idx = _resample_indices(m, n, seed)
    samples = {k: np.full(n, np.nan) for k in names}
    failed = 0
    for i in range(n):
        try:
            res = fit_fn(*[a[idx[i]] for a in arrays])
        except Exception:  # noqa: BLE001 - a failed resample is reported, not fatal
            failed += 1
            continue
        for k in names:
            samples[k][i] = float(res[k])
    out = {k: est[k] for k in names}
    out.update({"fit": est, "ci": _percentile_ci(samples, ci), "samples": samples, "n": n - failed,
                "n_requested": n, "n_failed": failed, "ci_level": ci})
    return out


def _fast_bootstrap(L, core, delta, n, seed, to_params, chunk=1000, extra_starts=3):
    """Batched bootstrap for the power-sum engine (resamples as multiplicity weights)."""
    m = L.size
    K = core["K"]
    Z, y = core["Z"], core["y"]
    idx = _resample_indices(m, n, seed)
    counts = np.zeros((n, m))
    np.add.at(counts, (np.repeat(np.arange(n), m), idx.ravel()), 1.0)
    # warm starts: full-data optimum, the other local optima, then the best grid starts
    cand = [core["theta"]] + list(core["optima_thetas"]) + list(core["starts"])
    starts: list[np.ndarray] = []
    for t in cand:
        if all(np.max(np.abs(t[K:] - s[K:])) > 1e-3 for s in starts):
            starts.append(t)
        if len(starts) >= 1 + extra_starts:
            break
    S = np.asarray(starts)
    best_theta = np.full((n, S.shape[1]), np.nan)
    best_f = np.full(n, np.inf)
    n_conv = 0
    per = max(1, chunk // S.shape[0])
    for c0 in range(0, n, per):
        cw = counts[c0 : c0 + per]
        b = cw.shape[0]
        th0 = np.tile(S, (b, 1))
        Wb = np.repeat(cw, S.shape[0], axis=0)
        th, f, conv, _ = _lm_batch(th0, Z, y, Wb, delta)
        f = f.reshape(b, S.shape[0])
        j = np.argmin(f, axis=1)
        th = th.reshape(b, S.shape[0], -1)
        best_theta[c0 : c0 + b] = th[np.arange(b), j]
        best_f[c0 : c0 + b] = f[np.arange(b), j]
        n_conv += int(conv.reshape(b, S.shape[0])[np.arange(b), j].sum())
    ok = np.isfinite(best_f)
    plist = [to_params(best_theta[i], core["z0"]) if ok[i] else None for i in range(n)]
    names = [k for k in to_params(core["theta"], core["z0"])]
    samples = {k: np.array([p[k] if p is not None else np.nan for p in plist]) for k in names}
    return samples, int(ok.sum()), n_conv, S.shape[0]


def _bootstrapped(Lv, core, huber_delta, n, seed, ci, to_params) -> dict[str, Any]:
    """Point estimate of a fitted core plus its fast bootstrap, in the bootstrap result format."""
    est = to_params(core["theta"], core["z0"])
    est_full = dict(est)
    est_full.update(_diagnostics(core, huber_delta, Lv.size))
    samples, n_ok, n_conv, n_ws = _fast_bootstrap(Lv, core, huber_delta, n, seed, to_params)
    out = dict(est)
    out.update({"fit": est_full, "ci": _percentile_ci(samples, ci), "samples": samples, "n": n_ok,
                "n_requested": n, "n_converged": n_conv, "n_warm_starts": n_ws, "ci_level": ci})
    return out


def fit_chinchilla_bootstrap(N, D, L, n: int = 1000, seed: int = 0, ci: float = 0.95, *,
                             huber_delta: float = 1e-3) -> dict[str, Any]:
    """Approach-3 fit plus ``n`` bootstrap refits (batched, warm-started); see the module docstring."""
    logX, Lv = _chinchilla_inputs(N, D, L)
    core = _fit_power_sum(logX, Lv, delta=huber_delta)
    return _bootstrapped(Lv, core, huber_delta, n, seed, ci, _chinchilla_params)


def fit_compute_law_bootstrap(C, L, n: int = 1000, seed: int = 0, ci: float = 0.95, *,
                              huber_delta: float = 1e-3, frontier: bool = True, n_bins: int | None = None,
                              monotone: bool = False) -> dict[str, Any]:
    """``fit_compute_law`` plus ``n`` bootstrap refits of the (frontier) points; see the module docstring."""
    Cv, Lv = _compute_law_inputs(C, L, frontier, n_bins, monotone)
    logX = np.log(Cv)[:, None]
    core = _fit_power_sum(logX, Lv, delta=huber_delta, n_starts=6)
    return _bootstrapped(Lv, core, huber_delta, n, seed, ci, _compute_law_params)


# ----------------------------------------------------------------------------------------------------------
# Power laws in log-log, approach 2 (IsoFLOP) and approach 1 (envelope)
# ----------------------------------------------------------------------------------------------------------


def fit_power_law(x, y) -> tuple[float, float]:
    """Least squares ``log y = log k + p log x``; returns ``(k, p)``."""
    lx = np.log(np.asarray(x, dtype=float))
    ly = np.log(np.asarray(y, dtype=float))
    if lx.size < 2 or np.ptp(lx) == 0:
        raise ValueError("need at least two distinct x values")
    p, c = np.polyfit(lx, ly, 1)
    return float(np.exp(c)), float(p)


def _group_budgets(C: np.ndarray, rtol: float) -> list[np.ndarray]:
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


def _batched_parabola(x: np.ndarray, L: np.ndarray):
    """Least-squares parabolas L = c0 + c1 u + c2 u^2 in u = x - xc for batches (B, m); returns coefs, xc."""
    xc = x.mean(axis=-1, keepdims=True)
    u = x - xc
    V = np.stack([np.ones_like(u), u, u * u], axis=-1)
    G = np.matmul(V.transpose(0, 2, 1), V)
    h = np.einsum("bmi,bm->bi", V, L)
    det = np.linalg.det(G)
    scale = np.einsum("bii->b", G) ** 3
    good = np.abs(det) > 1e-10 * scale
    coef = np.full(h.shape, np.nan)
    if good.any():
        coef[good] = np.linalg.solve(G[good], h[good][:, :, None])[:, :, 0]
    return coef, xc[..., 0]


def fit_isoflop(C, N, L, *, D=None, rtol: float = 0.05, flops_per_param_token: float = 6.0,
                min_points: int = 3, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Approach 2: per-budget parabola of L in log N, vertex N*(C), power laws N* = G C^a, D* = G' C^b.

    Budgets are groups of points whose C agree within relative tolerance ``rtol`` (budget value = geometric
    mean of the group's C). Budgets with fewer than ``min_points`` points, fewer than 3 distinct sizes or a
    non-convex parabola are listed in ``skipped``. ``D* = C / (flops_per_param_token * N*)`` unless ``D`` is
    given, in which case ``log D`` is regressed on ``log N`` within the budget and evaluated at ``N*``.

    Returns ``budgets`` (list of dicts: ``C, n_points, coef`` = (c0, c1, c2) of ``L = c0 + c1 x + c2 x^2`` in
    ``x = ln N``, ``N_opt, D_opt, L_opt, in_range``), ``skipped``, arrays ``C_opt, N_opt, D_opt, L_opt``,
    ``a, G`` (``N* = G C^a``), ``b, G_prime`` (``D* = G' C^b``), and bootstrap ``ci`` / ``samples`` for
    ``a, b`` with ``n_boot_valid`` successful resamples (points resampled within budgets).
    """
    C = np.asarray(C, dtype=float).ravel()
    N = np.asarray(N, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    Dv = None if D is None else np.asarray(D, dtype=float).ravel()
    if not (C.shape == N.shape == L.shape) or (Dv is not None and Dv.shape != C.shape):
        raise ValueError("C, N, L (and D) must have the same length")
    budgets, skipped, groups_used = [], [], []
    for g in _group_budgets(C, rtol):
        Cg = float(np.exp(np.mean(np.log(C[g]))))
        x = np.log(N[g])
        if g.size < min_points or np.unique(x).size < 3:
            skipped.append({"C": Cg, "n_points": int(g.size), "reason": f"fewer than {min_points} points "
                            "or 3 distinct sizes"})
            continue
        coef, xc = _batched_parabola(x[None, :], L[g][None, :])
        c0, c1, c2 = coef[0]
        if not np.isfinite(c2) or c2 <= 0:
            skipped.append({"C": Cg, "n_points": int(g.size), "reason": "parabola not convex"})
            continue
        u_opt = -c1 / (2 * c2)
        x_opt = float(xc[0] + u_opt)
        L_opt = float(c0 - c1 * c1 / (4 * c2))
        if Dv is None:
            D_opt = Cg / (flops_per_param_token * np.exp(x_opt))
        else:
            q, p = np.polyfit(x, np.log(Dv[g]), 1)
            D_opt = float(np.exp(p + q * x_opt))
        # uncentred coefficients in x = ln N
        xc0 = float(xc[0])
        coef_unc = (float(c0 - c1 * xc0 + c2 * xc0**2), float(c1 - 2 * c2 * xc0), float(c2))
        budgets.append({"C": Cg, "n_points": int(g.size), "coef": coef_unc, "N_opt": float(np.exp(x_opt)),
                        "D_opt": float(D_opt), "L_opt": L_opt,
                        "in_range": bool(x.min() <= x_opt <= x.max())})
        groups_used.append((g, Cg))
    out: dict[str, Any] = {"budgets": budgets, "skipped": skipped}
    C_opt = np.array([b["C"] for b in budgets])
    N_opt = np.array([b["N_opt"] for b in budgets])
    D_opt = np.array([b["D_opt"] for b in budgets])
    L_opt = np.array([b["L_opt"] for b in budgets])
    out.update({"C_opt": C_opt, "N_opt": N_opt, "D_opt": D_opt, "L_opt": L_opt})
    if len(budgets) < 2:
        out.update({"a": np.nan, "G": np.nan, "b": np.nan, "G_prime": np.nan, "ci": {}, "samples": {},
                    "n_boot_valid": 0})
        return out
    G, a = fit_power_law(C_opt, N_opt)
    Gp, b = fit_power_law(C_opt, D_opt)
    out.update({"a": a, "G": G, "b": b, "G_prime": Gp})
    if n_boot and n_boot > 0:
        rng = np.random.default_rng(seed)
        lx_all = np.full((n_boot, len(groups_used)), np.nan)
        ld_all = np.full((n_boot, len(groups_used)), np.nan)
        for j, (g, Cg) in enumerate(groups_used):
            ii = g[rng.integers(0, g.size, size=(n_boot, g.size))]
            x = np.log(N[ii])
            coef, xc = _batched_parabola(x, L[ii])
            with np.errstate(invalid="ignore", divide="ignore"):
                x_opt = xc - coef[:, 1] / (2 * coef[:, 2])
            x_opt[~(coef[:, 2] > 0)] = np.nan
            lx_all[:, j] = x_opt
            if Dv is None:
                ld_all[:, j] = np.log(Cg / flops_per_param_token) - x_opt
            else:
                ld = np.log(Dv[ii])
                xm = x.mean(axis=1, keepdims=True)
                dm = ld.mean(axis=1, keepdims=True)
                with np.errstate(invalid="ignore", divide="ignore"):
                    q = ((x - xm) * (ld - dm)).sum(1) / ((x - xm) ** 2).sum(1)
                ld_all[:, j] = dm[:, 0] + q * (x_opt - xm[:, 0])
        lc = np.log(C_opt)[None, :]

        def slope(lyv):
            w = np.isfinite(lyv).astype(float)
            cnt = w.sum(1)
            ly0 = np.where(w > 0, lyv, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mx = (w * lc).sum(1) / cnt
                my = (w * ly0).sum(1) / cnt
                sxx = (w * (lc - mx[:, None]) ** 2).sum(1)
                s = (w * (lc - mx[:, None]) * (ly0 - my[:, None])).sum(1) / sxx
            s[(cnt < 2) | ~(sxx > 0)] = np.nan
            return s

        samples = {"a": slope(lx_all), "b": slope(ld_all)}
        out.update({"ci": _percentile_ci(samples, ci), "samples": samples,
                    "n_boot_valid": int(np.sum(np.isfinite(samples["a"]))), "ci_level": ci})
    else:
        out.update({"ci": {}, "samples": {}, "n_boot_valid": 0})
    return out


def fit_approach1(curves: Sequence[dict], *, n_grid: int = 200, flops_per_param_token: float = 6.0,
                  exclude_edges: bool = True, min_runs: int = 2) -> dict[str, Any]:
    """Approach 1: lower envelope of the loss-vs-flops curves of all runs, power laws for N_opt and D_opt.

    Each curve is a dict with arrays ``flops`` and ``loss``, scalar ``params`` (N) and optional ``tokens``.
    On ``n_grid`` log-spaced flop values spanning all curves, every run's loss is interpolated linearly in
    log flops (only inside the run's own flop range); the envelope at C is the minimum over the runs present
    (at least ``min_runs`` of them), its argmin gives ``N_opt(C)`` and ``D_opt(C)`` (the run's tokens at C,
    interpolated in log-log, else ``C / (6 N)``). With ``exclude_edges`` a grid point is kept only if the
    next smaller and the next larger model size both have data at that compute (so the winner is bracketed:
    this drops points won by the smallest / largest model and points where a neighbouring run had already
    ended or not yet started, where the optimum could lie outside the runs available). Fits
    ``N_opt = G C^a`` and ``D_opt = G' C^b`` (least squares, log-log).

    Returns ``a, G, b, G_prime`` and the envelope arrays ``C, L_env, N_opt, D_opt, run_index``.
    """
    if len(curves) < 2:
        raise ValueError("need at least two runs")
    Ns = np.array([float(c["params"]) for c in curves])
    lf = [np.log(np.asarray(c["flops"], dtype=float)) for c in curves]
    lo = min(v.min() for v in lf)
    hi = max(v.max() for v in lf)
    grid = np.linspace(lo, hi, n_grid)
    R = len(curves)
    loss = np.full((R, n_grid), np.nan)
    ltok = np.full((R, n_grid), np.nan)
    for i, c in enumerate(curves):
        o = np.argsort(lf[i])
        x = lf[i][o]
        inside = (grid >= x[0]) & (grid <= x[-1])
        loss[i, inside] = np.interp(grid[inside], x, np.asarray(c["loss"], dtype=float)[o])
        if "tokens" in c and c["tokens"] is not None:
            ltok[i, inside] = np.interp(grid[inside], x, np.log(np.asarray(c["tokens"], dtype=float)[o]))
        else:
            ltok[i, inside] = grid[inside] - np.log(flops_per_param_token * Ns[i])
    present = np.isfinite(loss).sum(0)
    cols = np.flatnonzero(present >= min_runs)
    arg = np.argmin(np.where(np.isfinite(loss[:, cols]), loss[:, cols], np.inf), axis=0)
    if exclude_edges:
        sizes = np.unique(Ns)
        size_of_run = np.searchsorted(sizes, Ns)
        size_present = np.zeros((sizes.size, n_grid), dtype=bool)
        np.logical_or.at(size_present, size_of_run, np.isfinite(loss))
        k = size_of_run[arg]
        below = np.where(k > 0, size_present[np.maximum(k - 1, 0), cols], False)
        above = np.where(k < sizes.size - 1, size_present[np.minimum(k + 1, sizes.size - 1), cols], False)
        keep = below & above
        cols, arg = cols[keep], arg[keep]
    if cols.size < 2:
        raise ValueError("envelope has fewer than two usable points")
    C = np.exp(grid[cols])
    N_opt = Ns[arg]
    D_opt = np.exp(ltok[arg, cols])
    G, a = fit_power_law(C, N_opt)
    Gp, b = fit_power_law(C, D_opt)
    return {"a": a, "G": G, "b": b, "G_prime": Gp, "C": C, "L_env": loss[arg, cols], "N_opt": N_opt,
            "D_opt": D_opt, "run_index": arg, "n_grid_used": int(cols.size)}


# ----------------------------------------------------------------------------------------------------------
# Extrapolation
# ----------------------------------------------------------------------------------------------------------


def extrapolation_check(C, L, fit: Callable[..., dict] = fit_compute_law, *, frontier: bool = True,
                        n_bins: int | None = None, monotone: bool = False) -> dict[str, Any]:
    """Hold out the largest budget, fit ``fit`` on the rest, compare prediction and actual loss there.

    With ``frontier=True`` the points are first reduced to the lowest loss per budget (``compute_frontier``
    with ``n_bins`` / ``monotone``); the actual held-out loss is the frontier loss at the largest budget.
    ``fit(C, L)`` must return ``E, A, alpha``. Returns ``C_heldout, predicted, actual, rel_error``
    (= (predicted - actual) / actual), ``abs_rel_error`` and the ``fit``.
    """
    C = np.asarray(C, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    if frontier:
        C, L = compute_frontier(C, L, n_bins=n_bins, monotone=monotone)
    cmax = C.max()
    held = C == cmax
    if np.count_nonzero(~held) < 3:
        raise ValueError("need at least three budgets besides the held-out one")
    res = fit(C[~held], L[~held])
    pred = float(res["E"] + res["A"] * cmax ** (-res["alpha"]))
    actual = float(L[held].min())
    rel = (pred - actual) / actual
    return {"C_heldout": float(cmax), "predicted": pred, "actual": actual, "rel_error": float(rel),
            "abs_rel_error": float(abs(rel)), "fit": res}
