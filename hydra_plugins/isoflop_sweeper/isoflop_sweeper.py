"""`hydra/sweeper=isoflop`: launch every point of an IsoFLOP grid as a Hydra job, then report.

The composed config names the grid (`sweep.budgets`, `sweep.sizes`, `sweep.grid`, `sweep.min_steps`);
`sweeps.sweeper` derives each point's token budget from the analytic FLOP count, and each point
becomes one job whose overrides are the original command line plus `arch.size=S train.tokens=D
budget=C` (plus the point's `sweep.grid` combination). Jobs go to the configured launcher
(`hydra/launcher=basic|joblib|submitit_slurm|...`), so the standard launchers apply unchanged.

Points already done in ROOT/results.sqlite are not launched again (failed ones neither, unless
`sweep.retry_failed=true`); interrupted ones are launched and resume from their checkpoint. After
the jobs the report (fits, figures, tables) is rebuilt from the database unless `sweep.report=false`.
With no `sweep.budgets` the sweeper behaves like Hydra's basic sweeper (Cartesian product of
comma-separated command-line values and `sweep.grid`).
"""
# No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations (every Hydra
# entry point of the lab would fail at start-up).

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


@dataclass
class IsoFLOPSweeperConf:
    _target_: str = "hydra_plugins.isoflop_sweeper.isoflop_sweeper.IsoFLOPSweeper"
    # Jobs handed to the launcher per call. null: all at once, except with the sequential (basic)
    # launcher, which gets one job per call so that a preempted job stops the sweep at once.
    max_batch_size: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="isoflop", node=IsoFLOPSweeperConf, provider="difflab")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class IsoFLOPSweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # -- entry point ---------------------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> Any:
        from archs.errors import ConfigError

        try:
            return self._sweep(list(arguments))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    # -- the work ------------------------------------------------------------------------------

    def _split_arguments(self, arguments: List[str]):
        """Plain command-line overrides (kept on every job) and comma/range sweeps (extra grid axes)."""
        from archs.errors import ConfigError
        from sweeps.sweeper import GRID_KEYS

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        base, axes = [], []
        for ov in parser.parse_overrides(arguments):
            key = ov.key_or_group
            if key in GRID_KEYS and self.config.sweep.budgets:
                raise ConfigError(
                    f"{key} is set per run by the IsoFLOP sweep; drop {ov.input_line!r} "
                    "(or use sweep=none for a single run)")
            if ov.is_sweep_override():
                if not ov.is_discrete_sweep():
                    raise ConfigError(f"{ov.input_line!r}: only comma lists and range() sweeps are supported")
                k = ov.get_key_element()
                axes.append([f"{k}={v}" for v in ov.sweep_string_iterator()])
            else:
                base.append(ov.input_line)
        return base, axes

    def _points(self, cfg: DictConfig, base: list[str], axes: list[list[str]]):
        """Job overrides of every point. The IsoFLOP grid is derived separately for every combination
        of the extra axes (sweep.grid, comma lists), from the config composed with that combination:
        an axis that changes the arch (arch.pattern), the sequence length or the batch changes the
        FLOPs per token, hence every point's token count."""
        import itertools

        from archs.errors import ConfigError
        from sweeps.sweeper import describe_grid, expand_grid, isoflop_grid, with_extra
        from sweeps.train import check_arch_chosen, to_model_config

        check_arch_chosen(cfg)
        grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True) if cfg.sweep.grid else {}
        extras = [tuple(a) + tuple(b) for a in expand_grid(grid) for b in itertools.product(*axes)]
        if not cfg.sweep.budgets:
            # No IsoFLOP grid: behave like the basic sweeper over the extra axes.
            return [list(e) for e in extras]
        points, dropped = [], []
        for extra in extras:
            c = self._job_config(base + list(extra)) if extra else cfg
            sw = c.sweep
            p, d = isoflop_grid(
                to_model_config(c.arch), list(sw.budgets), [str(x) for x in sw.sizes],
                seq_len=int(c.train.seq_len), batch_size=int(c.train.batch_size), min_steps=int(sw.min_steps),
                min_tokens_per_param=sw.get("min_tokens_per_param"), max_tokens_per_param=sw.get("max_tokens_per_param"))
            points += with_extra(p, [extra])
            dropped += [(x, extra) for x in d]
        for d, extra in dropped:
            _say(f"warning: dropping C={d.budget:.3g} size={d.size}{' ' + ' '.join(extra) if extra else ''}: {d.reason}")
        if not points:
            raise ConfigError(
                f"every point of sweep {cfg.sweep.name!r} was dropped (see the warnings); raise sweep.budgets, "
                "use smaller sizes or relax sweep.min_steps / the tokens-per-parameter bounds")
        _say(describe_grid(points))
        return [p.overrides() for p in points]

    def _job_config(self, overrides: Sequence[str]) -> DictConfig:
        job = self.hydra_context.config_loader.load_sweep_config(master_config=self.config,
                                                                 sweep_overrides=list(overrides))
        task_cfg = copy.deepcopy(job)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        return task_cfg

    def _sweep(self, arguments: List[str]) -> Any:
        from archs.errors import ConfigError
        from sweeps.results import ResultsDB, _alive, is_resumable
        from sweeps.train import run_id_for

        cfg = self.config
        base, axes = self._split_arguments(arguments)
        per_point = self._points(cfg, base, axes)
        jobs = [base + list(ov) for ov in per_point]
        if len(jobs) > 1 and cfg.get("run_id"):
            raise ConfigError("run_id is set, but a sweep trains many runs; drop run_id=... (ids are derived)")

        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")

        # Compose every job now (catches bad overrides before anything trains) and skip finished runs.
        db = ResultsDB(cfg.root)
        todo, skipped, busy = [], [], []
        now = time.time()
        for ov in jobs:
            job_cfg = self._job_config(ov)
            rid = job_cfg.get("run_id") or run_id_for(job_cfg)
            row = db.get(rid)
            if row is not None and row["status"] == "done":
                skipped.append((rid, "done"))
            elif (row is not None and row["status"] == "failed" and not is_resumable(row)
                  and not cfg.sweep.get("retry_failed", False)):  # interrupted (preempted, killed) ones resume
                skipped.append((rid, "failed earlier (sweep.retry_failed=true trains it again)"))
            elif row is not None and row["status"] == "running" and _alive(row["host"], row["pid"], row["heartbeat"], now):
                busy.append(rid)
            else:
                todo.append((rid, ov, row))
        for rid, why in skipped:
            _say(f"  skip {rid}: {why}")
        for rid in busy:
            _say(f"  skip {rid}: being trained by another live process")
        resumed = sum(1 for _, _, row in todo if row is not None)
        _say(f"sweep {cfg.sweep.name!r}: {len(jobs)} runs, {len(skipped)} already recorded, "
             f"{len(busy)} busy elsewhere, {len(todo)} to train ({resumed} resumed) -> {Path(cfg.root) / 'results.sqlite'}")

        returns: list[Sequence[JobReturn]] = []
        errors: list[str] = []
        if cfg.sweep.get("dry_run", False):
            for rid, ov, _ in todo:
                _say(f"  would train {rid}: {' '.join(ov)}")
            return returns
        if todo:
            batch_size = self.max_batch_size
            if batch_size is None:
                batch_size = 1 if type(self.launcher).__name__ == "BasicLauncher" else len(todo)
            idx = 0
            for i in range(0, len(todo), max(1, batch_size)):
                batch = todo[i:i + batch_size]
                results = self.launcher.launch([ov for _, ov, _ in batch], initial_job_idx=idx)
                idx += len(batch)
                returns.append(results)
                for (rid, _, _), r in zip(batch, results):
                    if r.status != JobStatus.FAILED:
                        continue
                    exc = r._return_value
                    from sweeps.train import Preempted

                    if isinstance(exc, Preempted):
                        _say(str(exc))
                        _say("sweep interrupted; re-run the same command to resume")
                        sys.exit(143)
                    errors.append(f"{rid}: {type(exc).__name__}: {exc}")
                    _say(f"run failed: {errors[-1]}")

        if cfg.sweep.report:
            from sweeps.report import make_report

            t0 = time.time()
            out = make_report(cfg.root, group_by=list(cfg.sweep.group_by), n_boot=int(cfg.sweep.bootstrap))
            _say(f"report: {out} ({time.time() - t0:.1f}s)")
        if errors:
            print(f"error: {len(errors)} of {len(todo)} sweep runs raised an error (first: {errors[0]})",
                  file=sys.stderr)
            sys.exit(1)
        return returns
