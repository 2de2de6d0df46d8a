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
    """Run an entry point's body; bad input becomes a one-line error and exit status 2, a
    preemption (SIGTERM, checkpoint saved) exit status 143, a run that ended `failed` exit 1."""
    from sweeps.train import Preempted

    def wrapper(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except ConfigError as e:
            fail(str(e))
        except Preempted as e:
            print(str(e), file=sys.stderr)
            sys.exit(143)  # 128 + SIGTERM, the conventional status of a terminated job
        if isinstance(out, dict) and out.get("status") == "failed":
            # A run that stopped itself (divergence): its row says failed; so does the exit status.
            fail(f"run {out.get('run_id')} failed: {out.get('error')}", code=1)
        return out

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _arch_names() -> list[str]:
    conf = Path(__file__).resolve().parents[1] / "conf" / "arch"
    return sorted(p.stem for p in conf.glob("*.yaml"))


def check_arch_overrides(argv: list[str]) -> None:
    """Before Hydra composes anything: an unknown or missing architecture gets a one-line error
    that names the valid ones (Hydra's own messages for these are several lines, or, for
    `arch.size=...` without `+arch=NAME`, do not say what to do). Sweep syntax is left to Hydra."""
    names = _arch_names()
    choice = None
    for a in argv:
        if a.startswith("-") or "=" not in a:
            continue
        key, value = a.split("=", 1)
        if key in ("+arch", "++arch", "arch"):
            choice = value
    if choice is None:
        if any(a.lstrip("+~").startswith("arch.") for a in argv if not a.startswith("-")):
            fail(f"no architecture chosen: pass +arch=NAME with NAME one of {', '.join(names)} before arch.* settings")
        return
    if any(c in choice for c in "()[]{}$*?'\"\\"):  # sweep syntax, interpolations: Hydra's business
        return
    unknown = [n for n in choice.split(",") if n.strip() and n.strip() not in names]
    if unknown:
        fail(f"unknown architecture {', '.join(map(repr, unknown))}: pass +arch=NAME with NAME one of {', '.join(names)}")
