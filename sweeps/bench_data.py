"""`python -m sweeps.bench_data key=value ...`: see sweeps.tools.bench_data (settings: sweeps.config.BenchDataConfig)."""

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import BenchDataConfig, to_typed
from sweeps.tools.bench_data import main


def task(cfg: DictConfig) -> None:
    guarded(lambda: main(to_typed(cfg)))()


if __name__ == "__main__":
    run_app("bench_data", BenchDataConfig, task, jax_runtime=False)
