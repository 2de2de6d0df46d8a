"""IsoFLOP grid logic of the sweep engine, importable and testable without Hydra.

A sweep names compute budgets C (training FLOPs) and model sizes (`arch.size` values). Every
(budget, size) pair becomes one run whose token budget is derived from the analytic FLOP count:

    tokens = steps * batch_size * seq_len,   steps = round(C / (flops_per_token(size) * batch_size * seq_len))

so that `flops_per_token(size) * tokens` equals C up to the rounding to whole steps (relative error
at most 1 / (2 * steps)). The grid is a list of (size, tokens) pairs per budget, never a Cartesian
product of independent size and token lists. Points with fewer than `min_steps` steps are dropped
(a model too large for its budget would not train long enough to mean anything).

On top of every point, `grid` (a dict of override lists) adds a Cartesian product of extra Hydra
overrides, e.g. {"optim.lr": [1e-3, 3e-3]} for a learning-rate scan.

The sweep driver (sweeps.grid.sweep) turns these points into job overrides; the Hydra plugin
(hydra_plugins/isoflop_sweeper) launches them with whatever launcher is configured.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterable, Mapping, Sequence

from archs.config import ModelConfig
from archs.errors import ConfigError
from archs.flops import flops_per_token
from archs.sizes import resolve

# Keys the grid sets on every point; the user may not set them on the command line of a sweep.
GRID_KEYS = ("arch.size", "train.tokens", "budget")


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One run of an IsoFLOP sweep."""

    budget: float  # the budget C this point belongs to (training FLOPs)
    size: str  # arch.size
    steps: int
    tokens: int  # steps * batch_size * seq_len
    flops_per_token: float
    params_shape: tuple[int, int]  # (d_model, n_layers) the size resolves to
    extra: tuple[str, ...] = ()  # further overrides (from sweep.grid)

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def rel_error(self) -> float:
        """(flops - budget) / budget: the rounding to whole steps."""
        return self.flops / self.budget - 1.0

    def overrides(self) -> list[str]:
        """Hydra overrides that turn the base config into this point's run."""
        return [f"arch.size={hydra_value(self.size)}", f"train.tokens={self.tokens}",
                f"budget={hydra_value(float(self.budget))}", *self.extra]

    def describe(self) -> str:
        extra = (" " + " ".join(self.extra)) if self.extra else ""
        return (f"C={self.budget:.3g} size={self.size} (d={self.params_shape[0]}, L={self.params_shape[1]}) "
                f"tokens={self.tokens:,} steps={self.steps}{extra}")


@dataclasses.dataclass(frozen=True)
class DroppedPoint:
    budget: float
    size: str
    steps: int
    reason: str


def hydra_value(v: Any) -> str:
    """Format a Python value as a Hydra override value (round-trips through the override grammar)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ConfigError(f"sweep value {v!r} is not a finite number")
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    # Plain identifiers, numbers-with-suffix ("3M") and paths pass unquoted; anything Hydra would read
    # as another type ("3e5" -> float, "true", "null") or that holds grammar characters is quoted.
    try:
        float(s)
        numeric = True
    except ValueError:
        numeric = False
    if s and not numeric and s.lower() not in ("true", "false", "null") and all(c.isalnum() or c in "._-/+" for c in s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _as_budget(b: Any) -> float:
    try:
        c = float(b)
    except (TypeError, ValueError):
        raise ConfigError(f"sweep.budgets entry {b!r} is not a number of FLOPs (e.g. 3e11)") from None
    if not math.isfinite(c) or c <= 0:
        raise ConfigError(f"sweep.budgets entry {b!r} must be a positive number of FLOPs")
    return c


def isoflop_grid(
    model_cfg: ModelConfig,
    budgets: Sequence[Any],
    sizes: Sequence[Any],
    *,
    seq_len: int,
    batch_size: int,
    min_steps: int = 1,
    min_tokens_per_param: float | None = None,
    max_tokens_per_param: float | None = None,
) -> tuple[list[GridPoint], list[DroppedPoint]]:
    """The IsoFLOP points (budget ascending, size in the given order) and the points dropped.

    A point is dropped when it has fewer than `min_steps` steps, or when its tokens per parameter
    fall outside [min_tokens_per_param, max_tokens_per_param] (parameters counted as
    flops_per_token / 6, the C = 6 N D convention; None: no bound): far from the compute-optimal
    ratio a point costs its budget and adds nothing to the IsoFLOP parabola.

    `model_cfg` is the composed arch; each size replaces its `size` (explicit width/depth
    overrides of the arch stay, which is why sizes that resolve to the same shape are refused).
    """
    if not budgets:
        raise ConfigError("sweep.budgets is empty: name at least one compute budget in FLOPs")
    if not sizes:
        raise ConfigError("sweep.sizes is empty: name at least one model size (arch.size value)")
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"train.seq_len={seq_len} and train.batch_size={batch_size} must be positive")
    tokens_per_step = seq_len * batch_size
    per_size: dict[str, tuple[float, tuple[int, int]]] = {}
    shapes: dict[tuple, str] = {}
    for s in sizes:
        s = str(s)
        if s in per_size:
            raise ConfigError(f"sweep.sizes lists {s!r} twice")
        mc = resolve(dataclasses.replace(model_cfg, size=s))
        shape = (mc.d_model, mc.n_layers)
        if shape in shapes:
            raise ConfigError(
                f"sweep sizes {shapes[shape]!r} and {s!r} resolve to the same model (d_model={mc.d_model}, "
                f"n_layers={mc.n_layers}); pick distinct sizes, and do not fix arch.d_model/arch.n_layers in a sweep"
            )
        shapes[shape] = s
        per_size[s] = (flops_per_token(mc, seq_len), (mc.d_model, mc.n_layers))
    points, dropped = [], []
    for c in sorted({_as_budget(b) for b in budgets}):
        for s in map(str, sizes):
            fpt, shape = per_size[s]
            steps = int(round(c / (fpt * tokens_per_step)))
            if steps < max(1, min_steps):
                dropped.append(DroppedPoint(c, s, steps, f"{steps} steps < sweep.min_steps={min_steps}"))
                continue
            ratio = 6.0 * steps * tokens_per_step / fpt
            if min_tokens_per_param is not None and ratio < min_tokens_per_param:
                dropped.append(DroppedPoint(c, s, steps, f"{ratio:.3g} tokens/param < sweep.min_tokens_per_param="
                                                        f"{min_tokens_per_param:g}"))
                continue
            if max_tokens_per_param is not None and ratio > max_tokens_per_param:
                dropped.append(DroppedPoint(c, s, steps, f"{ratio:.3g} tokens/param > sweep.max_tokens_per_param="
                                                        f"{max_tokens_per_param:g}"))
                continue
            points.append(GridPoint(c, s, steps, steps * tokens_per_step, fpt, shape))
    return points, dropped


def expand_grid(grid: Mapping[str, Iterable[Any]] | None, reserved: Sequence[str] = GRID_KEYS) -> list[tuple[str, ...]]:
    """Cartesian product of override lists: {"a": [1, 2], "b": [x]} -> [("a=1", "b=x"), ("a=2", "b=x")].
    `reserved` keys are refused (an IsoFLOP grid derives them; a sweep without budgets may set them)."""
    if not grid:
        return [()]
    axes = []
    for key, values in grid.items():
        if key in reserved:
            raise ConfigError(f"sweep.grid may not set {key}: the IsoFLOP grid derives it")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            values = [values]
        values = list(values)
        if not values:
            raise ConfigError(f"sweep.grid.{key} is an empty list")
        axes.append([f"{key}={hydra_value(v)}" for v in values])
    return [tuple(combo) for combo in itertools.product(*axes)]


def with_extra(points: Sequence[GridPoint], extras: Sequence[tuple[str, ...]]) -> list[GridPoint]:
    """Every point once per extra-override combination (point-major order)."""
    return [dataclasses.replace(p, extra=tuple(p.extra) + tuple(e)) for p in points for e in extras]


def describe_grid(points: Sequence[GridPoint], dropped: Sequence[DroppedPoint] = ()) -> str:
    lines = [f"IsoFLOP sweep: {len(points)} runs"]
    lines += ["  " + p.describe() + f"  flops={p.flops:.3g} ({p.rel_error:+.1%})" for p in points]
    lines += [f"  dropped: C={d.budget:.3g} size={d.size}: {d.reason}" for d in dropped]
    return "\n".join(lines)


# --- WSD cooldown branches ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cooldowns:
    """One size's trunk and branches (Hagele et al. 2024): the trunk trains warmup + constant rate
    to the last fork step and keeps a checkpoint at every fork; branch i starts from the trunk at
    fork_i = steps_i - decay_i and decays over its last decay_i steps, so it computes exactly
    what a separate warmup-stable-decay run of steps_i steps would (same batches, same rates)."""

    size: str
    extra: tuple[str, ...]
    warmup: int  # shared by the trunk and every branch
    branches: tuple[tuple[GridPoint, int], ...]  # (point, decay steps), by steps ascending
    tokens_per_step: int

    @property
    def forks(self) -> list[int]:
        return [p.steps - d for p, d in self.branches]

    @property
    def trunk_steps(self) -> int:
        return max(self.forks)

    def compute_ratio(self) -> float:
        """FLOPs trained (trunk once + every cooldown) / FLOPs of the points as separate runs."""
        own = self.trunk_steps + sum(d for _, d in self.branches)
        return own / sum(p.steps for p, _ in self.branches)


def cooldown_plans(points: Sequence[GridPoint], *, cooldown_frac: float, warmup_frac: float,
                   warmup_steps: int | None, tokens_per_step: int) -> list[Cooldowns]:
    """Group IsoFLOP points by (size, extra overrides) into trunks with branches. The warmup is
    that of the group's shortest point (warmup_frac of its steps, or warmup_steps), so every
    branch forks after it."""
    groups: dict[tuple, list[GridPoint]] = {}
    for p in points:
        groups.setdefault((p.size, tuple(p.extra)), []).append(p)
    plans = []
    for (size, extra), pts in groups.items():
        pts = sorted(pts, key=lambda p: p.steps)
        warmup = warmup_steps if warmup_steps is not None else max(1, int(round(warmup_frac * pts[0].steps)))
        branches = tuple((p, max(1, int(round(cooldown_frac * p.steps)))) for p in pts)
        for p, d in branches:
            if p.steps - d <= warmup:
                raise ConfigError(
                    f"size {size} at C={p.budget:.3g}: {p.steps} steps leave no stable phase after a {warmup}-step "
                    f"warmup and a {d}-step cooldown; raise the budget, lower sweep.cooldown_frac or optim.warmup_frac")
        plans.append(Cooldowns(size, extra, warmup, branches, tokens_per_step))
    return plans


def describe_cooldowns(plans: Sequence[Cooldowns]) -> str:
    lines = [f"WSD cooldowns: {len(plans)} trunks, {sum(len(c.branches) for c in plans)} branches"]
    for c in plans:
        extra = (" " + " ".join(c.extra)) if c.extra else ""
        lines.append(f"  trunk size={c.size}{extra}: warmup {c.warmup}, {c.trunk_steps} steps, forks at "
                     f"{', '.join(map(str, c.forks))}; compute {c.compute_ratio():.2f}x of separate runs")
    return "\n".join(lines)
