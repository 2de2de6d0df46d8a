"""`python -m sweeps.bench +arch=NAME [bench.size=...] [bench.steps=...]`: one train-step benchmark
(sweeps.tools.bench), whatever sweep the arch defaults to; it writes nothing."""

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import BenchConfig, to_typed
from sweeps.tools.bench import bench


def task(cfg: DictConfig) -> dict:
    return guarded(lambda: bench(to_typed(cfg)))()


if __name__ == "__main__":
    run_app("bench", BenchConfig, task, groups=("arch", "data", "optim", "mesh", "sweep"))
