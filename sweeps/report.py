"""`python -m sweeps.report root=DIR [group_by=[KEY,...]] [bootstrap=N] [reference=GROUP]
[exclude_sweeps=[NAME,...]] [figures=true|false] [seed=N]`: re-fit and re-draw everything in DIR's results
database without training (sweeps.analysis.report; settings: sweeps.config.ReportConfig)."""

import sys

from omegaconf import DictConfig

from sweeps.analysis.report import main
from sweeps.cli import guarded, run_app
from sweeps.config import ReportConfig, to_typed


def task(cfg: DictConfig) -> None:
    code = guarded(lambda: main(to_typed(cfg)))()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_app("report", ReportConfig, task, jax_runtime=False)
