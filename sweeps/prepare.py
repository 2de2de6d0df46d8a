"""`python -m sweeps.prepare input=PATH out=DIR [tokenizer=byte|bpe] key=value ...`: see sweeps.tools.prepare
(settings: sweeps.config.PrepareConfig)."""

from omegaconf import DictConfig

from sweeps.cli import guarded, run_app
from sweeps.config import PrepareConfig, to_typed
from sweeps.tools.prepare import main


def task(cfg: DictConfig) -> None:
    guarded(lambda: main(to_typed(cfg)))()


if __name__ == "__main__":
    run_app("prepare", PrepareConfig, task, groups=("tokenizer",), jax_runtime=False)
