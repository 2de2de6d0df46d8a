"""`hydra/sweeper=isoflop`: Hydra's side of the lab's sweeps; the work is in sweeps.grid.sweep.

This shim composes job configs and hands jobs to the configured launcher
(`hydra/launcher=basic|joblib|submitit_slurm|...`), so the standard launchers apply unchanged.
"""
# No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations (every Hydra
# entry point of the lab would fail at start-up).

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write


@dataclass
class IsoFLOPSweeperConf:
    _target_: str = "hydra_plugins.isoflop_sweeper.isoflop_sweeper.IsoFLOPSweeper"
    # Jobs handed to the launcher per call. null: all at once, except with the sequential (basic)
    # launcher, which gets one job per call so that a preempted job stops the sweep at once.
    max_batch_size: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="isoflop", node=IsoFLOPSweeperConf, provider="difflab")


class IsoFLOPSweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _job_config(self, overrides: Sequence[str]) -> DictConfig:
        job = self.hydra_context.config_loader.load_sweep_config(master_config=self.config,
                                                                 sweep_overrides=list(overrides))
        task_cfg = copy.deepcopy(job)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        return task_cfg

    def _launch(self, overrides: List[List[str]], first: int) -> List[Optional[BaseException]]:
        results = self.launcher.launch(overrides, initial_job_idx=first)
        return [r._return_value if r.status == JobStatus.FAILED else None for r in results]

    def sweep(self, arguments: List[str]) -> Any:
        # Imported here, not at the top: Hydra scans this module at the start of every Hydra app,
        # and the lab (JAX) should load only when a sweep actually runs.
        from archs.errors import ConfigError
        from sweeps.cli import fail
        from sweeps.config import to_typed
        from sweeps.grid.sweep import run_sweep

        try:
            parsed = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(arguments)
            # The sweep's own settings come from the config with every comma list at its first
            # value: an axis may choose what the master config lacks (`+arch=ar,diffusion`).
            axes = [ov for ov in parsed if ov.is_sweep_override() and ov.is_discrete_sweep()]
            first = [f"{ov.get_key_element()}={next(iter(ov.sweep_string_iterator()))}" if ov in axes
                     else ov.input_line for ov in parsed]
            cfg = to_typed(self._job_config(first) if axes else self.config)
            return run_sweep(cfg, parsed, job_config=self._job_config, launch=self._launch,
                             max_batch_size=self.max_batch_size,
                             sequential=type(self.launcher).__name__ == "BasicLauncher",
                             sweep_dir=Path(str(self.config.hydra.sweep.dir)), raw_config=self.config)
        except ConfigError as e:
            fail(str(e))
