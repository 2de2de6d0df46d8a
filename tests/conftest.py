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


# --- the reference sampling of in-memory corpora ------------------------------------------------------
# What every engine Dataset reproduces (sweeps.engine.dataset): windows starting uniformly at random
# in the training stream (numpy's generator seeded by (seed, step)), and non-overlapping held-out
# windows spread evenly; column 0 precedes the scored targets 1..T.


def train_batch(corpus, seed: int, step: int, batch_size: int, seq_len: int):
    import numpy as np

    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, corpus.train.size - seq_len - 1, size=batch_size, endpoint=True)
    return corpus.train[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)


def eval_windows(corpus, seq_len: int, n_windows: int):
    import numpy as np

    avail = (corpus.heldout.size - 1) // seq_len
    n = max(1, min(n_windows, avail))
    starts = (np.arange(n) * avail // n) * seq_len
    return corpus.heldout[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)


def n_bytes(targets) -> int:
    """Bytes of text behind byte-tokenizer targets (special tokens carry none)."""
    import numpy as np

    from archs.tokens import BYTES

    return int((np.asarray(targets) < BYTES.n_text).sum())


# --- numerics helpers shared by the model tests ------------------------------------------------------

# LLVM at -O0: the tests that use these check numerics and HLO-level FLOP counts, both unaffected
# by the backend optimisation level, and compile 2-3x faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fast(fn, *args):
    import jax

    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def xla_flops(fn, *args) -> float:
    """XLA's cost-analysis FLOPs of fn compiled for these arguments."""
    cost = compile_fast(fn, *args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def train_step_flops(cfg, gdef, params, batch: int, seq_len: int) -> tuple[float, float]:
    """(XLA's count of the compiled AR loss and gradient, 3 x the analytic forward count as executed)
    for a model of `cfg` split into (gdef, params)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from archs.flops import forward_flops
    from archs.objective import AutoregressiveObjective

    def loss(p, w):
        m = nnx.merge(gdef, p)
        return AutoregressiveObjective(m.cfg).loss(m, w, None)[0]

    xla = xla_flops(jax.value_and_grad(loss), params, jnp.zeros((batch, seq_len + 1), jnp.int32))
    return xla, 3 * batch * forward_flops(cfg, seq_len, executed=True, embedding=False)["total"]


def fit_one_batch(objective, gdef, params, windows, steps: int, lr: float = 3e-3):
    """Adam on one fixed batch for `steps` steps in one compiled scan: (final params, losses)."""
    import jax
    import optax
    from flax import nnx

    tx = optax.adam(lr)

    def step(carry, rng):
        p, opt = carry
        loss, g = jax.value_and_grad(lambda q: objective.loss(nnx.merge(gdef, q), windows, rng)[0])(p)
        up, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, up), opt), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.key(0), steps))
    return params, losses


def full_and_decoded(gdef, state, toks, prefill: int):
    """(logits of the full forward pass, logits of a prefill of `prefill` tokens followed by one
    decode call per token, the final cache): cached decoding must equal the full pass."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    m = nnx.merge(gdef, state)
    b, t = toks.shape
    full = m(toks)
    cache = m.init_cache(b, t)
    first, cache = m.decode(toks[:, :prefill], cache, 0)

    def step(cache, i):
        logits, cache = m.decode(jax.lax.dynamic_slice_in_dim(toks, i, 1, axis=1), cache, i)
        return cache, logits[:, 0]

    cache, rest = jax.lax.scan(step, cache, jnp.arange(prefill, t))
    return full, jnp.concatenate([first, jnp.moveaxis(rest, 0, 1)], axis=1), cache
