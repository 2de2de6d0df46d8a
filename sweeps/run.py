"""Main entry point: `python -m sweeps.run +arch=NAME [sweep=none|smoke|...] [key=value ...]`.

With sweep=none it trains one model and writes its row to ROOT/results.sqlite; otherwise it runs
the arch's IsoFLOP sweep as Hydra jobs (see sweeps.sweeper) and then fits and draws the report.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sweeps.config import register_configs
from sweeps.runtime import guarded, setup_runtime


@guarded
def task(cfg: DictConfig):
    """Train the one run the composed config describes (a single run or one sweep point)."""
    from sweeps.train import train

    setup_runtime()
    row = train(cfg, budget=cfg.get("budget"), sweep=cfg.sweep.name if cfg.sweep.name != "none" else None)
    return {k: row[k] for k in ("run_id", "status", "eval_bpb", "flops", "error")}


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    return task(cfg)


if __name__ == "__main__":
    register_configs()
    main()
