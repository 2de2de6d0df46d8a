"""Shared test helpers: config composition through the real Hydra files, tiny shapes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str], config_name: str = "config"):
    """The typed config exactly as `python -m sweeps.run ...overrides` (or the entry point of
    `config_name`) would hand it to the engine."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sweeps.config import register_configs, to_typed

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return to_typed(hydra_compose(config_name=config_name, overrides=overrides))


def run_cli(args: list[str], *, cwd=None, timeout=600, env_extra=None):
    """Run `python -m ...` in a fresh interpreter (its own XLA flags, signals, exit status)."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("LAB_COMPILE_CACHE", str(Path.home() / ".cache" / "difflab" / "xla"))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def _compile_cache():
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "LAB_COMPILE_CACHE", str(Path.home() / ".cache" / "difflab" / "xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield


@pytest.fixture(scope="session")
def stdlib_corpus():
    from sweeps.engine.data import load_corpus

    return load_corpus("stdlib")
