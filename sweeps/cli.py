"""The lab's one command-line dialect: Hydra apps with `key=value` overrides and one-line errors.

Every `python -m sweeps.X` entry point goes through `run_app`. Before Hydra runs anything, the
command line is checked against the typed schema (sweeps.config) and the conf/ tree: a typo'd
key, a value of the wrong type, an unknown group option or a `+key` that nothing reads is one
line naming the key and the fix, exit status 2, and nothing is written. Then Hydra composes the
config (single run or multirun sweep), the app turns it into its dataclass once and works on
typed objects below.

Exit statuses: 0 done; 1 a run ended `failed` (divergence) or a job raised; 2 invalid config or
input; 130 interrupted (Ctrl-C: progress saved); 143 preempted (SIGTERM: progress saved).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from archs.errors import ConfigError
from sweeps.config import CONF, arch_names, error_line, register_configs, to_typed
from sweeps.engine.interrupts import Interrupted, Preempted

# Config groups of conf/ that the user picks with `group=option` (hydra/* groups are Hydra's).
_HYDRA_FLAGS_WITH_VALUE = ("--config-path", "--config-name", "--config-dir", "-cp", "-cn", "-cd")


EXIT_FAILED, EXIT_CONFIG = 1, 2


def fail(msg: str, code: int = EXIT_CONFIG) -> typing.NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def setup_runtime() -> None:
    """Persistent XLA compilation cache (LAB_COMPILE_CACHE; empty disables it): sweeps of many
    small runs compile each shape once across processes."""
    import jax

    cache = os.environ.get("LAB_COMPILE_CACHE", str(Path.home() / ".cache" / "difflab" / "xla"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def guarded(fn: Callable) -> Callable:
    """An app body whose failures become exit statuses: ConfigError one line and 2, Ctrl-C 130,
    SIGTERM 143 (both after saving), a run that ended `failed` 1 (its error as one line)."""

    def wrapper(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except ConfigError as e:
            fail(str(e))
        except (Interrupted, Preempted) as e:
            print(str(e), file=sys.stderr)
            sys.exit(e.exit_code)
        if isinstance(out, dict) and out.get("status") == "failed":
            fail(f"run {out.get('run_id')} failed: {out.get('error')}", code=EXIT_FAILED)
        return out

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --- checking the command line against the schema ------------------------------------------------


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "schema")


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints.get(name)


def _check_key(schema, key: str) -> None:
    """`key` (dotted) must name a field of the schema; free-form dict fields accept any subkey."""
    parts = key.split(".")
    node = schema
    for i, part in enumerate(parts):
        if node is None:  # inside a dict-valued field: anything goes
            return
        names = [f.name for f in dataclasses.fields(node)]
        here = ".".join(parts[:i])
        if part not in names:
            guess = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            if guess:
                hint = f"; did you mean {'.'.join([*parts[:i], guess[0], *parts[i + 1:]])}?"
            else:
                hint = f"; {here or 'the config'} has {', '.join(names)}"
            raise ConfigError(f"unknown key {key!r}: nothing reads it{hint}")
        t = _field_type(node, part)
        if dataclasses.is_dataclass(t):
            node = t
        elif typing.get_origin(t) is dict or t is dict:
            node = None
        elif i < len(parts) - 1:
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[:i + 1])} is a single value, not a group of keys")


def _split_flags(argv: list[str]) -> list[str]:
    """The override arguments of a command line (Hydra's own flags and their values dropped)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in _HYDRA_FLAGS_WITH_VALUE
            continue
        out.append(a)
    return out


def _check_groups(overrides, groups: tuple[str, ...]) -> None:
    for ov in overrides:
        key = ov.key_or_group
        if key not in groups or ov.is_delete():
            continue
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [str(ov.value())]
        options = arch_names() if key == "arch" else _group_options(key)
        for v in values:
            if v not in options:
                what = "architecture" if key == "arch" else f"{key} option"
                raise ConfigError(f"unknown {what} {v!r}: pass {'+' if key == 'arch' else ''}{key}=NAME with NAME one of "
                                  f"{', '.join(options)}")


def check_command_line(config_name: str, schema, argv: list[str], *, groups: tuple[str, ...] = ()) -> None:
    """Validate a command line before Hydra runs: syntax, keys, group options, value types and
    every config node's own checks (sweeps.config). Raises ConfigError with one line."""
    args = _split_flags(argv)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException as e:
        raise ConfigError(f"cannot parse the command line: {error_line(e)}") from None
    if "arch" in groups:
        chosen = [ov for ov in overrides if ov.key_or_group == "arch"]
        if not chosen and any(ov.key_or_group.startswith("arch.") for ov in overrides):
            raise ConfigError(f"no architecture chosen: pass +arch=NAME with NAME one of {', '.join(arch_names())} "
                              "before arch.* settings")
    _check_groups(overrides, groups)
    for ov in overrides:
        key = ov.key_or_group
        if "/" in key or key in groups or key.startswith("hydra."):
            continue  # group choices checked above; hydra.* is Hydra's
        _check_key(schema, key)
    # Compose once per value of every sweep axis (the others at their first value): every value
    # the sweep will use meets the schema's types.
    lines = [ov.input_line for ov in overrides]
    variants = [[]]
    for i, ov in enumerate(overrides):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            for v in ov.sweep_string_iterator():
                variants.append([(i, f"{key}={v}")])
    seen = set()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for subst in variants:
            line = list(lines)
            for i, ov in enumerate(overrides):
                if ov.is_sweep_override():
                    line[i] = f"{ov.get_key_element()}={next(iter(ov.sweep_string_iterator()))}"
            for i, text in subst:
                line[i] = text
            if tuple(line) in seen:
                continue
            seen.add(tuple(line))
            try:
                cfg = compose(config_name=config_name, overrides=line)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(error_line(e)) from None
            to_typed(cfg)


def run_app(config_name: str, schema, body: Callable[[Any], Any], *, groups: tuple[str, ...] = (),
            jax_runtime: bool = True) -> None:
    """The `__main__` of an entry point: check the command line, then run `body(typed config)`
    inside Hydra (which takes care of multirun sweeps and launchers)."""
    register_configs()
    try:
        check_command_line(config_name, schema, sys.argv[1:], groups=groups)
    except ConfigError as e:
        fail(str(e))
    if jax_runtime:
        setup_runtime()

    @hydra.main(version_base=None, config_path=str(CONF), config_name=config_name)
    def main(cfg: DictConfig):
        return body(cfg)

    main()
