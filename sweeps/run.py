"""Main entry point: `python -m sweeps.run +arch=NAME [sweep=default|smoke|paper|lr_scan|none] [key=value ...]`.

With sweep=none it trains one model and writes its row to ROOT/results.sqlite; otherwise the sweep
config switches Hydra to multirun and the IsoFLOP sweeper (hydra_plugins/isoflop_sweeper, grid
logic in sweeps.sweeper) launches every grid point as a Hydra job through the configured launcher
(sequential by default, `hydra/launcher=joblib` for parallel local jobs, `hydra/launcher=slurm`
for SLURM), then fits and draws the report (sweeps.report). See docs/sweeps.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sweeps.config import register_configs
from sweeps.runtime import guarded, setup_runtime


def _train(cfg: DictConfig) -> dict:
    from sweeps.train import train

    setup_runtime()
    row = train(cfg, budget=cfg.get("budget"), sweep=cfg.sweep.name if cfg.sweep.name != "none" else None)
    return {k: row[k] for k in ("run_id", "status", "eval_bpb", "flops", "error")}


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def task(cfg: DictConfig):
    """Train the one run the composed config describes (a single run or one sweep point).

    A single run turns bad input into a one-line error and exit status 2. A sweep point raises
    instead: Hydra hands the exception to the sweeper, which reports it and goes on with the
    other points (a preemption stops the sweep).
    """
    if _in_sweep():
        return _train(cfg)
    return guarded(_train)(cfg)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    return task(cfg)


if __name__ == "__main__":
    import sys

    from sweeps.runtime import check_arch_overrides

    check_arch_overrides(sys.argv[1:])  # unknown / missing +arch: one line, before Hydra composes
    register_configs()
    main()
