"""Process-level setup shared by the entry points (never done at import time)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax

from archs.errors import ConfigError


def setup_runtime() -> None:
    """Persistent XLA compilation cache: sweeps of many small runs compile each shape once."""
    cache = os.environ.get("LAB_COMPILE_CACHE", str(Path.home() / ".cache" / "difflab" / "xla"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def guarded(fn):
    """Run an entry point's body; bad input becomes a one-line error and exit status 2."""
    from sweeps.train import Preempted

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            fail(str(e))
        except Preempted as e:
            print(str(e), file=sys.stderr)
            sys.exit(143)  # 128 + SIGTERM, the conventional status of a terminated job

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
