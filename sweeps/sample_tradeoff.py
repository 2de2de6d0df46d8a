"""`python -m sweeps.sample_tradeoff key=value ...`: see sweeps.tools.tradeoff (settings: sweeps.config.TradeoffConfig)."""

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import TradeoffConfig, to_typed
from sweeps.tools.tradeoff import main


def task(cfg: DictConfig) -> None:
    guarded(lambda: main(to_typed(cfg)))()


if __name__ == "__main__":
    run_app("sample_tradeoff", TradeoffConfig, task)
