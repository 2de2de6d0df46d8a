"""What a fit can claim: one status per fit, with the rules that assign it.

Every fitted law in the report carries a ``status`` and a list of ``flags`` (plain sentences naming each rule that
fired). Tables print the status beside the numbers and figure legends carry it, so no figure claims more than the
data support. The rules, in order of precedence:

``insufficient``
    Not fitted: fewer points than the law needs. The compute law ``L(C) = E + A C^-alpha`` needs 3 distinct
    budgets; Chinchilla's ``L(N, D)`` needs 8 finished runs over 3 sizes and 3 token counts; an allocation law
    ``N*(C) = G C^a`` (or ``D*(C)``) needs ``MIN_OPTIMA`` = 3 optima (IsoFLOP: bracketed optima; approach 1:
    distinct winning sizes), since a line through 2 points constrains nothing.
``failed``
    The solver raised or returned non-finite parameters.
``degenerate``
    Fitted, but the optimum sits where the data do not hold it:
    - ``E`` below ``E_FLOOR`` (1e-3) times the lowest loss fitted: the irreducible loss is at its bound 0;
    - a law exponent (alpha, beta) at or below the exponent grid's first value (``PowerSumFit.exponent_step``)
      or at or above its last (``solver.EXPONENT_MAX``): the data do not bound it;
    - the bootstrap interval of a law exponent has its lower end <= 0 or spans more than ``CI_SPAN`` (100x,
      two orders of magnitude) between its ends;
    - an allocation exponent outside (0, 1) (an optimal size that shrinks with compute, or grows faster than it),
      or its bootstrap interval wider than 1 (wider than every physically possible value).
``saturated``
    As many distinct abscissae as parameters (3 budgets for ``L(C)``, 5 distinct (N, D) for ``L(N, D)``): the
    law interpolates its points, so residuals are zero by construction and bootstrap intervals mean little (the
    interval rule of ``degenerate`` is not applied to a saturated fit; the point-estimate rules are).
``ok``
    None of the above.

Independently of the status, a fit whose points repeat their training data more than ``MAX_EPOCHS`` = 4 times is
marked data-constrained (Muennighoff et al. 2023: beyond about 4 epochs repeated tokens are worth measurably less
than fresh ones, so the law describes a different regime).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from sweeps.analysis.solver import EXPONENT_MAX

E_FLOOR = 1e-3
CI_SPAN = 100.0
MIN_OPTIMA = 3
MAX_EPOCHS = 4.0
DATA_MARK = "†"  # marks data-constrained fits in tables and legends


class Status(enum.StrEnum):
    OK = "ok"
    SATURATED = "saturated"
    DEGENERATE = "degenerate"
    INSUFFICIENT = "insufficient"
    FAILED = "failed"


@dataclass
class NoFit:
    """A law that was not fitted, and why (status insufficient or failed)."""

    status: Status
    reason: str


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def law_status(*, n_distinct: int, n_params: int, E: float, L_min: float, exponents: dict[str, float],
               ci: dict[str, tuple[float, float]], exponent_step: float) -> tuple[Status, list[str]]:
    """Status and flags of a fitted power-sum law (see the module docstring)."""
    values = [E, *exponents.values()]
    if not all(_finite(v) for v in values):
        return Status.FAILED, ["non-finite fitted parameters"]
    degenerate: list[str] = []
    if E < E_FLOOR * L_min:
        degenerate.append(f"E = {E:.2g} is at its bound 0 (below {E_FLOOR:g} x the lowest loss)")
    for name, v in exponents.items():
        if v <= exponent_step:
            degenerate.append(f"{name} = {_fmt(v)} is at the low edge of the exponent grid ({_fmt(exponent_step)})")
        elif v >= EXPONENT_MAX:
            degenerate.append(f"{name} = {_fmt(v)} is at the high edge of the exponent grid ({EXPONENT_MAX:g})")
    saturated = n_distinct <= n_params
    for name in exponents if not saturated else ():  # a saturated fit's intervals are wide by construction
        lo, hi = ci.get(name, (math.nan, math.nan))
        if _finite(lo) and _finite(hi) and (lo <= 0 or hi / lo > CI_SPAN):
            degenerate.append(f"the interval of {name} [{_fmt(lo)}, {_fmt(hi)}] spans orders of magnitude")
    if degenerate:
        return Status.DEGENERATE, degenerate
    if saturated:
        return Status.SATURATED, [f"{n_distinct} distinct points for {n_params} parameters: the law interpolates "
                                  "them; add points for meaningful intervals"]
    return Status.OK, []


def allocation_status(p: float, ci: tuple[float, float] | None, name: str) -> tuple[Status, list[str]]:
    """Status and flags of an allocation exponent (``N* ~ C^a`` or ``D* ~ C^b``)."""
    if not _finite(p):
        return Status.FAILED, [f"non-finite exponent {name}"]
    flags = []
    if not 0.0 < p < 1.0:
        flags.append(f"{name} = {_fmt(p)} is outside (0, 1)")
    if ci is not None and _finite(ci[0]) and _finite(ci[1]) and ci[1] - ci[0] > 1.0:
        flags.append(f"the interval of {name} [{_fmt(ci[0])}, {_fmt(ci[1])}] is wider than (0, 1)")
    return (Status.DEGENERATE, flags) if flags else (Status.OK, [])


def epochs_flag(epochs) -> str | None:
    """The data-constrained flag of a fit whose points have these epoch counts (None when not constrained)."""
    e = [float(x) for x in epochs if _finite(x)]
    if e and max(e) > MAX_EPOCHS:
        n = sum(x > MAX_EPOCHS for x in e)
        return (f"data-constrained: {n} point(s) repeat their data up to {max(e):.3g} epochs (> {MAX_EPOCHS:g}, "
                "Muennighoff et al. 2023)")
    return None
