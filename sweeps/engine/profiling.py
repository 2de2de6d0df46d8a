"""XProf traces of chosen training steps (`train.profile_steps=[A,B]`).

The trace covers steps A..B (numbered from 1, as in metrics.jsonl) and each step is annotated as
a training step, so XProf's overview and trace viewer show per-step times. It is written under
the run directory (`profile/plugins/profile/<time>/<host>.xplane.pb`): `tensorboard --logdir
ROOT/runs/ID/profile`, tab Profile (the tensorboard-plugin-profile / xprof package).
"""

from __future__ import annotations

from pathlib import Path

import jax


class StepProfiler:
    """Call `begin(n)` before step n runs and `end(n)` once its results are back (after they are
    read, so the trace holds the whole step); `close()` always, in a finally. Inactive when `steps`
    is empty or `enabled` is false (processes other than 0 of a multi-process run)."""

    def __init__(self, directory: Path, steps: list[int], *, enabled: bool = True):
        self.directory = Path(directory)
        self.first, self.last = (steps[0], steps[1]) if steps and enabled else (0, -1)
        self.tracing = False
        self._annotation = None

    def begin(self, step: int) -> None:
        if not self.first <= step <= self.last:
            return
        if not self.tracing:  # the first step of the range (or, resumed inside it, the first one run)
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True
        self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
        self._annotation.__enter__()

    def end(self, step: int) -> None:
        self._close_annotation()
        if self.tracing and step >= self.last:
            self.close()

    def _close_annotation(self) -> None:
        if self._annotation is not None:
            self._annotation.__exit__(None, None, None)
            self._annotation = None

    def close(self) -> None:
        self._close_annotation()
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
