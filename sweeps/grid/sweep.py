"""The sweep driver: from a command line to launched grid points, then the report.

The composed config names the grid (`sweep.budgets`, `sweep.sizes`, `sweep.grid`, ...);
sweeps.grid.isoflop derives each point's token budget from the analytic FLOP count, and each
point becomes one job whose overrides are the original command line plus `arch.size=S
train.tokens=D budget=C` (plus its `sweep.grid` / comma-list combination). Before anything is
launched every job's config is composed, typed and planned (the model built abstractly): a bad
override or a config that cannot train stops the sweep with one line and nothing written.

Points already done in ROOT/results.sqlite are not launched again (failed ones neither, unless
`sweep.retry_failed=true`); interrupted ones are launched and resume from their checkpoint. A
preempted (SIGTERM) or interrupted (Ctrl-C) job stops the sweep: finished rows stay, re-running
the command resumes. After the jobs the report is rebuilt unless `sweep.report=false`. With no
`sweep.budgets` the driver behaves like Hydra's basic sweeper (Cartesian product of comma lists
and `sweep.grid`).

The driver talks to Hydra through two callables that the plugin provides: `job_config(overrides)`
(the composed config of one job) and `launch(list of override lists, first job index)`, which
returns, per job, the exception it raised or None.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
from omegaconf import OmegaConf

from archs.errors import ConfigError
from sweeps.analysis.report import make_report
from sweeps.config import Config, ReportConfig, to_typed
from sweeps.engine.dataset import fit_vocab
from sweeps.engine.interrupts import Interrupted, Preempted
from sweeps.engine.loop import check_root
from sweeps.engine.plan import plan_run, run_id_for
from sweeps.engine.records import ResultsDB
from sweeps.grid.isoflop import (GRID_KEYS, cooldown_plans, describe_cooldowns, describe_grid, expand_grid,
                                 hydra_value, isoflop_grid, with_extra)

# Keys the driver sets on cooldown trunks and branches, and on the seeds of a point.
COOLDOWN_KEYS = ("optim.schedule", "optim.warmup_steps", "optim.decay_steps", "optim.decay_shape", "role",
                 "train.branch_from", "train.keep_steps")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_arguments(parsed_overrides, cfg: Config):
    """Plain command-line overrides (kept on every job) and comma/range sweeps (extra grid axes)."""
    base, axes = [], []
    reserved = set(GRID_KEYS if cfg.sweep.budgets else ()) | set(COOLDOWN_KEYS if cfg.sweep.cooldowns else ())
    if cfg.sweep.seeds > 1:
        reserved.add("seed")
    for ov in parsed_overrides:
        key = ov.key_or_group
        if key in reserved:
            raise ConfigError(f"{key} is set per run by the sweep ({'sweep.seeds' if key == 'seed' else 'the grid'}); "
                              f"drop {ov.input_line!r} (or use sweep=none for a single run)")
        if ov.is_sweep_override():
            if not ov.is_discrete_sweep():
                raise ConfigError(f"{ov.input_line!r}: only comma lists and range() sweeps are supported")
            k = ov.get_key_element()
            axes.append([f"{k}={v}" for v in ov.sweep_string_iterator()])
        else:
            base.append(ov.input_line)
    return base, axes


def grid_jobs(cfg: Config, base: list[str], axes: list[list[str]], job_config: Callable):
    """Job overrides of every point in launch phases (cooldown trunks before their branches), and
    the lines that describe the grid. The IsoFLOP grid is derived separately for every combination
    of the extra axes (sweep.grid, comma lists, seeds), from the config composed with that
    combination: an axis that changes the arch (arch.pattern), the sequence length or the batch
    changes the FLOPs per token, hence every point's token count."""
    seeds = [()] if cfg.sweep.seeds == 1 else [(f"seed={cfg.seed + j}",) for j in range(cfg.sweep.seeds)]
    extras = [tuple(a) + tuple(b) + s for a in expand_grid(cfg.sweep.grid, GRID_KEYS if cfg.sweep.budgets else ())
              for b in itertools.product(*axes)
              for s in seeds]
    if not cfg.sweep.budgets:
        return [[base + list(e) for e in extras]], []
    points, dropped = [], []
    for extra in extras:
        c = to_typed(job_config(base + list(extra))) if extra else cfg
        sw = c.sweep
        arch = fit_vocab(c.arch, c.data)  # the data's vocabulary: the head's FLOPs depend on it
        p, d = isoflop_grid(arch, list(sw.budgets), [str(x) for x in sw.sizes], seq_len=c.train.seq_len,
                            batch_size=c.train.batch_size, min_steps=sw.min_steps,
                            min_tokens_per_param=sw.min_tokens_per_param, max_tokens_per_param=sw.max_tokens_per_param)
        points += with_extra(p, [extra])
        dropped += [(x, extra) for x in d]
    notes = [f"warning: dropping C={d.budget:.3g} size={d.size}{' ' + ' '.join(extra) if extra else ''}: {d.reason}"
             for d, extra in dropped]
    if not points:
        raise ConfigError(
            f"every point of sweep {cfg.sweep.name!r} was dropped ({'; '.join(d.reason for d, _ in dropped[:3])}"
            f"{'; ...' if len(dropped) > 3 else ''}); raise sweep.budgets, use smaller sizes or relax "
            "sweep.min_steps / the tokens-per-parameter bounds")
    notes.append(describe_grid(points))
    if not cfg.sweep.cooldowns:
        return [[base + p.overrides() for p in points]], notes
    sw, o = cfg.sweep, cfg.optim
    plans = cooldown_plans(points, cooldown_frac=sw.cooldown_frac, warmup_frac=o.warmup_frac,
                           warmup_steps=o.warmup_steps, tokens_per_step=cfg.train.batch_size * cfg.train.seq_len)
    trunks, branches = [], []
    for plan in plans:
        wsd = ["optim.schedule=wsd", f"optim.warmup_steps={plan.warmup}", f"optim.decay_shape={sw.cooldown_shape}"]
        trunk = [*base, *plan.extra, f"arch.size={hydra_value(plan.size)}",
                 f"train.tokens={plan.trunk_steps * plan.tokens_per_step}", *wsd, "optim.decay_steps=0", "role=trunk",
                 f"train.keep_steps={hydra_value(plan.forks)}"]
        trunk_cfg = to_typed(job_config(trunk))
        trunks.append(trunk)
        for point, decay in plan.branches:
            branches.append([*base, *point.overrides(), *wsd, f"optim.decay_steps={decay}", "role=branch",
                             f"train.branch_from={trunk_cfg.run_id or run_id_for(trunk_cfg)}"])
    notes.append(describe_cooldowns(plans))
    return [trunks, branches], notes


def run_sweep(cfg: Config, parsed_overrides, *, job_config: Callable, launch: Callable,
              max_batch_size: int | None, sequential: bool, sweep_dir: Path, raw_config) -> list[Any]:
    base, axes = split_arguments(parsed_overrides, cfg)
    phases, notes = grid_jobs(cfg, base, axes, job_config)
    n_jobs = sum(map(len, phases))
    if n_jobs > 1 and cfg.run_id:
        raise ConfigError("run_id is set, but a sweep trains many runs; drop run_id=... (ids are derived)")

    # Compose, type and plan every job now: a bad override or a config that cannot train stops the
    # sweep before anything is written. Then skip finished runs.
    planned = []
    n_devices = jax.device_count()
    for phase, jobs in enumerate(phases):
        for ov in jobs:
            job = to_typed(job_config(ov))
            plan_run(job, n_devices)
            planned.append((job.run_id or run_id_for(job), ov, phase))
    for line in notes:
        say(line)
    check_root(cfg.root)
    db = ResultsDB(cfg.root)
    todo, skipped, busy = [], [], []
    for rid, ov, phase in planned:
        row = db.get(rid)
        if row is not None and row["status"] == "done":
            skipped.append((rid, "done"))
        elif row is not None and row["status"] == "running" and db.is_alive(rid):
            busy.append(rid)
        elif row is not None and not db.is_resumable(row) and not cfg.sweep.retry_failed:
            skipped.append((rid, "failed earlier (sweep.retry_failed=true trains it again)"))
        else:
            todo.append((rid, ov, row, phase))
    for rid, why in skipped:
        say(f"  skip {rid}: {why}")
    for rid in busy:
        say(f"  skip {rid}: being trained by another live process")
    resumed = sum(1 for _, _, row, _ in todo if row is not None)
    say(f"sweep {cfg.sweep.name!r}: {n_jobs} runs, {len(skipped)} already recorded, {len(busy)} busy elsewhere, "
        f"{len(todo)} to train ({resumed} resumed) -> {Path(cfg.root) / 'results.sqlite'}")

    returns: list[Any] = []
    errors: list[str] = []
    if cfg.sweep.dry_run:
        for rid, ov, _, _ in todo:
            say(f"  would train {rid}: {' '.join(ov)}")
        return returns
    if todo:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(raw_config, sweep_dir / "multirun.yaml")
    idx = 0
    for phase in range(len(phases)):  # a phase starts when the one before it has finished
        jobs = [t for t in todo if t[3] == phase]
        batch_size = max_batch_size or (1 if sequential else max(1, len(jobs)))
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i:i + batch_size]
            results = launch([ov for _, ov, _, _ in batch], idx)
            idx += len(batch)
            returns.append(results)
            for (rid, _, _, _), exc in zip(batch, results):
                if exc is None:
                    continue
                if isinstance(exc, (Preempted, Interrupted)):
                    say(str(exc))
                    say("sweep stopped; finished runs are recorded, re-run the same command to resume")
                    sys.exit(exc.exit_code)
                errors.append(f"{rid}: {type(exc).__name__}: {exc}")
                say(f"run failed: {errors[-1]}")

    if cfg.sweep.report:
        t0 = time.time()
        out = make_report(ReportConfig(root=cfg.root, group_by=list(cfg.sweep.group_by), bootstrap=cfg.sweep.bootstrap))
        say(f"report: {out} ({time.time() - t0:.1f}s)")
    if errors:
        print(f"error: {len(errors)} of {len(todo)} sweep runs raised an error (first: {errors[0]})", file=sys.stderr)
        sys.exit(1)
    return returns

