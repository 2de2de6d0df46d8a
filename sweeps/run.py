"""Main entry point: `python -m sweeps.run +arch=NAME [sweep=default|smoke|paper|lr_scan|none] [key=value ...]`.

With sweep=none it trains one model and writes its row to ROOT/results.sqlite; otherwise the sweep
config switches Hydra to multirun and the IsoFLOP sweeper (sweeps.grid.sweep, behind the Hydra
plugin hydra_plugins/isoflop_sweeper) launches every grid point as a Hydra job through the
configured launcher (sequential by default, `hydra/launcher=joblib` for parallel local jobs,
`hydra/launcher=slurm` for SLURM), then fits and draws the report. See docs/sweeps.md.
"""

from __future__ import annotations

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import Config, to_typed
from sweeps.engine.loop import train

SUMMARY = ("run_id", "status", "eval_bpb", "flops", "error")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _train(cfg: DictConfig) -> dict:
    row = train(to_typed(cfg))
    return {k: row[k] for k in SUMMARY}


def task(cfg: DictConfig):
    """Train the one run the composed config describes (a single run or one sweep point).

    A single run turns bad input into a one-line error and exit status 2. A sweep point raises
    instead: Hydra hands the exception to the sweeper, which reports it and goes on with the
    other points (a preemption or Ctrl-C stops the sweep).
    """
    if _in_sweep():
        return _train(cfg)
    return guarded(_train)(cfg)


if __name__ == "__main__":
    run_app("config", Config, task, groups=("arch", "data", "optim", "mesh", "sweep"))
