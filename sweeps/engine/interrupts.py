"""Interrupts that keep their progress: SIGTERM (preemption) and Ctrl-C (SIGINT).

The first of either becomes a flag that the training loop checks between steps: it saves a
checkpoint and raises `Preempted` / `Interrupted`, which the entry points turn into exit 143 /
130 with one line. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import os
import signal


class Interrupted(Exception):
    """Ctrl-C (SIGINT): a checkpoint was saved; re-running the same command resumes."""

    exit_code = 130  # 128 + SIGINT


class Preempted(Exception):
    """SIGTERM: a checkpoint was saved; re-running the same command resumes."""

    exit_code = 143  # 128 + SIGTERM, the conventional status of a terminated job


class StopSignals:
    """SIGTERM and SIGINT become a flag the loop checks between steps (a second Ctrl-C exits now)."""

    def __init__(self):
        self.hit: str | None = None  # "SIGTERM" or "SIGINT"
        self._prev: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._prev[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.hit == "SIGINT" and signum == signal.SIGINT:
            os.write(2, b"second interrupt: exiting now without saving (the last checkpoint stays)\n")
            os._exit(130)
        if self.hit is None:
            if signum == signal.SIGTERM:  # os.write: print() is not safe inside a signal handler
                os.write(2, b"SIGTERM received: saving a checkpoint after the current step\n")
            self.hit = name

    def stop(self, run_id: str, step: int, saved: bool):
        """The exception that ends the run after a signal: at a step boundary after saving, or
        before the first step (while building, compiling or restoring: nothing new to save)."""
        where = f"at step {step}; checkpoint saved" if saved else \
            f"before training started (step {step}); nothing new to save"
        if self.hit == "SIGINT":
            return Interrupted(f"{run_id}: interrupted {where}, re-run the same command to resume")
        return Preempted(f"{run_id}: SIGTERM {where}, re-run the same command to resume")

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
