"""Train-step throughput: `python -m sweeps.bench +arch=NAME [bench.size=...]`, one measurement.

Prints tokens/s, achieved FLOP/s by the analytic count (model FLOPs: causal attention counted
at half), and the ratio to this machine's fp32 matmul peak measured in the same process, so
the ratio is comparable across machines and robust to background load drifting slowly.
"""

from __future__ import annotations

import time

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sweeps.config import BenchConfig
from sweeps.engine.data import load_corpus, train_batch
from sweeps.engine.plan import plan_run
from sweeps.engine.trainer import Trainer


class MatmulPeak:
    """Best-of fp32 FLOP/s of an n x n x n matmul (XLA's own CPU GEMM). `sample()` between
    training steps: the best over the whole benchmark is robust to load drifting during it."""

    def __init__(self, n: int):
        self.n = n
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.f = jax.jit(lambda x, y: x @ y)
        self.f(self.a, self.b).block_until_ready()
        self.best = float("inf")
        self.samples = 0

    def sample(self, repeats: int = 1) -> None:
        self.samples += repeats
        for _ in range(repeats):
            self.best = min(self.best, _timed(lambda: self.f(self.a, self.b).block_until_ready()))

    @property
    def flops(self) -> float:
        return 2 * self.n**3 / self.best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(cfg: BenchConfig) -> dict:
    b = cfg.bench
    cfg = dataclasses.replace(
        cfg, arch=dataclasses.replace(cfg.arch, size=b.size),
        train=dataclasses.replace(cfg.train, seq_len=b.seq_len, batch_size=b.batch_size,
                                  tokens=b.batch_size * b.seq_len * (b.steps + 2)))
    plan = plan_run(cfg, jax.device_count())
    corpus = load_corpus(cfg.data.name, list(cfg.data.paths), cfg.data.heldout_fraction)
    trainer = Trainer(cfg, plan)
    state = trainer.init_state()
    batches = [train_batch(corpus, cfg.seed, s, b.batch_size, b.seq_len) for s in range(b.steps + 2)]
    t = time.perf_counter()
    state, m = trainer.step(state, batches[0], 0)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t
    state, m = trainer.step(state, batches[1], 1)  # warm
    jax.block_until_ready(m["loss"])
    meter = MatmulPeak(b.matmul_n)
    meter.sample(3)
    times = []
    for s in range(2, b.steps + 2):
        t = time.perf_counter()
        state, m = trainer.step(state, batches[s], s)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
        meter.sample(2)  # interleaved: steps and peak see the same machine state
    meter.sample(3)
    peak = meter.flops
    step_s = float(np.median(times))
    tok_s = plan.tokens_per_step / step_s
    achieved = tok_s * plan.flops_per_token
    out = {
        "arch": plan.model_cfg.name, "params": trainer.n_params, "nonembed_params": trainer.n_nonembed,
        "seq_len": b.seq_len, "batch_size": b.batch_size, "step_s": step_s, "compile_s": compile_s,
        "tokens_per_s": tok_s, "achieved_flops": achieved, "matmul_peak_flops": peak, "ratio": achieved / peak,
    }
    print(f"arch={out['arch']} params={out['params'] / 1e6:.2f}M (non-embedding {out['nonembed_params'] / 1e6:.2f}M) "
          f"seq_len={b.seq_len} batch={b.batch_size} devices={jax.device_count()}")
    print(f"  step {step_s * 1e3:.1f} ms (median of {len(times)}; first step incl. compile {compile_s:.1f} s)")
    print(f"  {tok_s:,.0f} tokens/s, {achieved / 1e9:.1f} GFLOP/s achieved (analytic, 6ND + attention)")
    print(f"  fp32 matmul peak {peak / 1e9:.1f} GFLOP/s ({b.matmul_n}^3, best of {meter.samples} interleaved with the steps) -> {100 * out['ratio']:.1f}% of peak")
    return out
