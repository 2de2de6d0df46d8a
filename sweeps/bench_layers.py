"""`python -m sweeps.bench_layers key=value ...`: see sweeps.tools.bench_layers (settings: sweeps.config.LayerBenchConfig)."""

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import LayerBenchConfig, to_typed
from sweeps.tools.bench_layers import main


def task(cfg: DictConfig) -> None:
    guarded(lambda: main(to_typed(cfg)))()


if __name__ == "__main__":
    run_app("bench_layers", LayerBenchConfig, task)
