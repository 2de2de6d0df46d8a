"""`python -m sweeps.bench_kernels key=value ...`: see sweeps.tools.bench_kernels (settings: sweeps.config.KernelBenchConfig)."""

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import KernelBenchConfig, to_typed
from sweeps.tools.bench_kernels import main


def task(cfg: DictConfig) -> None:
    guarded(lambda: main(to_typed(cfg)))()


if __name__ == "__main__":
    run_app("bench_kernels", KernelBenchConfig, task)
