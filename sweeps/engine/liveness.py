"""Liveness by the kernel: a run holds an exclusive lock on a file in its run directory for its
whole life, so its row is alive exactly while that lock is held.

`flock` locks belong to an open file description and die with the process (exit, SIGKILL, a
crash), so a dead run can never look alive and a pid reused by another process means nothing.
Probing acquires the lock without blocking and drops it at once; a run starting at that very
moment retries for a moment before it calls the run busy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = ".lock"


def run_dir(root: str | os.PathLike, run_id: str) -> Path:
    return Path(root) / "runs" / run_id


def lock_path(root: str | os.PathLike, run_id: str) -> Path:
    return run_dir(root, run_id) / LOCK_NAME


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class RunLock:
    """The exclusive lock a live run holds on ROOT/runs/RUN_ID/.lock."""

    def __init__(self, root: str | os.PathLike, run_id: str):
        self.path = lock_path(root, run_id)
        self._fd: int | None = None

    def acquire(self, patience_s: float = 2.0) -> bool:
        """Take the lock; False if another live process holds it (after `patience_s` of retries,
        which outlast any probe)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience_s
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                os.close(fd)
                return False
            time.sleep(0.02)
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_alive(root: str | os.PathLike, run_id: str) -> bool:
    """Does a live process hold this run's lock? (A process's own lock counts: flock conflicts
    between two open file descriptions of one process too.)"""
    path = lock_path(root, run_id)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        if _try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)
