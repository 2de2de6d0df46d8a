"""Orbax checkpoints of (params, optimizer state), saved asynchronously and atomically.

Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never becomes the newest checkpoint. Restores go against an abstract target
(shapes, dtypes and shardings), newest first; an unreadable checkpoint (truncated, corrupt) is
skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        logging.getLogger("absl").setLevel(logging.ERROR)
        self.directory = Path(directory).resolve()
        self.mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(2, keep),  # always keep a fallback for a corrupt newest one
                enable_async_checkpointing=True,
                create=True,
            ),
        )

    def save(self, step: int, params, opt_state) -> None:
        self.mngr.save(step, args=ocp.args.StandardSave({"params": params, "opt": opt_state}), force=True)

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps(), reverse=True)

    def restore_latest(self, abstract_params, abstract_opt):
        """(step, params, opt_state) from the newest readable checkpoint, or None."""
        target = {"params": abstract_params, "opt": abstract_opt}
        for step in self.steps():
            try:
                out = self.mngr.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as e:  # noqa: BLE001 - any failure means "unusable", try an older one
                print(f"warning: checkpoint at step {step} is unreadable ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); trying the previous one", file=sys.stderr)
                continue
            return step, out["params"], out["opt"]
        return None

    def restore_params(self, abstract_params):
        """Parameters only (for sampling and evaluation), newest readable checkpoint."""
        for step in self.steps():
            try:
                out = self.mngr.restore(
                    step,
                    args=ocp.args.StandardRestore({"params": abstract_params}),
                )
            except Exception as e:  # noqa: BLE001
                print(f"warning: checkpoint at step {step} is unreadable ({type(e).__name__}); trying the previous one",
                      file=sys.stderr)
                continue
            return step, out["params"]
        return None

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()
