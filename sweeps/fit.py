"""The public fit functions (outside tools call exactly these); the analysis itself lives in sweeps.analysis.

- ``fit_chinchilla(N, D, L, *, huber_delta=1e-3)``: Chinchilla approach 3, ``L = E + A / N**alpha + B / D**beta``
  fitted as ``log L = LSE(a - alpha log N, b - beta log D, e)`` by minimising the sum of Huber losses of the log
  residuals (``sweeps.analysis.laws.fit_chinchilla``).
- ``fit_compute_law(C, L, *, huber_delta=1e-3)``: ``L = E + A * C**(-alpha)``, fitted to the lowest loss at each
  distinct C (pass ``frontier=False`` to fit the points as given).

Both return plain dicts of floats: the parameters, their logs (``a, b, e``: ``A = e^a`` ...), the Huber
``objective``, ``grad_norm`` at the optimum, ``rms_log_residual``, ``n_points`` and the ``status`` of the fit
(``sweeps.analysis.status``).
"""

from __future__ import annotations

import numpy as np

from sweeps.analysis.laws import fit_chinchilla as _fit_chinchilla
from sweeps.analysis.laws import fit_compute_law as _fit_compute_law
from sweeps.analysis.laws import frontier as _frontier

__all__ = ["fit_chinchilla", "fit_compute_law"]


def fit_chinchilla(N, D, L, *, huber_delta: float = 1e-3) -> dict:
    law = _fit_chinchilla(N, D, L, huber_delta=huber_delta)
    a, _, e = law.core.public()
    return {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta, "a": float(a[0]),
            "b": float(a[1]), "e": float(e), "objective": law.objective, "grad_norm": law.grad_norm,
            "rms_log_residual": law.rms_log_residual, "n_points": law.n_rows, "status": str(law.status)}


def fit_compute_law(C, L, *, huber_delta: float = 1e-3, frontier: bool = True) -> dict:
    C = np.asarray(C, dtype=float).ravel()
    L = np.asarray(L, dtype=float).ravel()
    if frontier:
        keep = _frontier(C, L)
        C, L = C[keep], L[keep]
    law = _fit_compute_law(C, L, huber_delta=huber_delta)
    return {"E": law.E, "A": law.A, "alpha": law.alpha, "a": float(np.log(law.A)), "e": float(np.log(law.E)),
            "objective": law.objective, "grad_norm": law.grad_norm, "rms_log_residual": law.rms_log_residual,
            "n_points": int(C.size), "status": str(law.status)}
