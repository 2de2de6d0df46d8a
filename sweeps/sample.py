"""`python -m sweeps.sample key=value ...`: see sweeps.tools.sample (settings: sweeps.config.SampleConfig)."""

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import SampleConfig, to_typed
from sweeps.tools.sample import main


def task(cfg: DictConfig) -> None:
    guarded(lambda: main(to_typed(cfg)))()


if __name__ == "__main__":
    run_app("sample", SampleConfig, task)
