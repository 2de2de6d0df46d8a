"""CPU benchmark of the chunked kernels vs the step-by-step references.

    python -m sweeps.bench_kernels                          # default sizes, < ~3 min on 2 cores
    python -m sweeps.bench_kernels T=1024 'lengths=[512,1024]' repeats=3   (settings: sweeps.config.KernelBenchConfig)

Prints (1) forward+backward time of chunked vs reference at one length, with the speedup,
and (2) forward+backward time per token of the chunked kernels over a range of lengths.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssm.gated_delta import gated_delta_rule, gated_delta_rule_reference
from ssm.ssd import ssd, ssd_reference
from sweeps.config import KernelBenchConfig


def _gdn_inputs(rng, B, T, H, K, V):
    q = rng.standard_normal((B, T, H, K), dtype=np.float32)
    k = rng.standard_normal((B, T, H, K), dtype=np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)  # GDN uses L2-normalised keys
    v = rng.standard_normal((B, T, H, V), dtype=np.float32)
    g = -rng.exponential(0.1, (B, T, H)).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (B, T, H)).astype(np.float32)
    return tuple(jnp.asarray(t) for t in (q, k, v, g, beta))


def _ssd_inputs(rng, B, T, H, P, G, N):
    x = rng.standard_normal((B, T, H, P), dtype=np.float32)
    dt = rng.uniform(0.001, 0.1, (B, T, H)).astype(np.float32)
    A = -rng.uniform(1.0, 16.0, (H,)).astype(np.float32)
    Bm = rng.standard_normal((B, T, G, N), dtype=np.float32)
    Cm = rng.standard_normal((B, T, G, N), dtype=np.float32)
    return tuple(jnp.asarray(t) for t in (x, dt, A, Bm, Cm))


def _fwd_bwd(fn, chunk_size):
    """jit(value_and_grad) of a scalar loss touching both outputs, w.r.t. every input."""

    def loss(*args):
        out, state = fn(*args, chunk_size=chunk_size)
        return jnp.sum(out * out) + jnp.sum(state)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5))))


def _time(fns, args, repeats):
    """Per function: median wall time, min wall time, median process CPU time (all threads).

    Rounds interleave the functions so that load from other processes on a shared machine hits
    every contender alike; within a round each function runs once untimed first, so that it is
    timed with its buffers already mapped (as in a training loop) rather than paying the page
    faults the other function's allocations left behind. CPU time is the steadier number when
    the machine is shared."""
    for f in fns:
        jax.block_until_ready(f(*args))  # compile + warm up
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            jax.block_until_ready(f(*args))
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*args))
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [(statistics.median(w), min(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def main(a: KernelBenchConfig) -> None:
    rng = np.random.default_rng(0)
    lengths = list(a.lengths)

    kernels = {
        "gated_delta": (
            gated_delta_rule,
            gated_delta_rule_reference,
            lambda T: _gdn_inputs(rng, a.batch, T, a.heads, a.dk, a.dv),
            f"H={a.heads} K={a.dk} V={a.dv}",
        ),
        "ssd": (
            ssd,
            ssd_reference,
            lambda T: _ssd_inputs(rng, a.batch, T, a.ssd_heads, a.headdim, a.groups, a.dstate),
            f"H={a.ssd_heads} P={a.headdim} N={a.dstate} G={a.groups}",
        ),
    }
    print(f"backend={jax.default_backend()} devices={jax.device_count()} batch={a.batch} "
          f"chunk={a.chunk} repeats={a.repeats} (after compile + warm-up)")

    if not a.skip_reference:
        print(f"\n(1) forward+backward, T={a.T}: chunked vs reference lax.scan")
        print(f"  {'kernel':12s} {'dims':22s} {'':8s} {'median ms':>10s} {'min ms':>9s} {'cpu ms':>9s}")
        for name, (fast, ref, make, dims) in kernels.items():
            fast_t, ref_t = _time([_fwd_bwd(fast, a.chunk), _fwd_bwd(ref, a.chunk)], make(a.T), a.repeats)
            for label, t in (("chunked", fast_t), ("reference", ref_t)):
                print(f"  {name:12s} {dims:22s} {label:9s} {1e3 * t[0]:9.1f} {1e3 * t[1]:9.1f} "
                      f"{1e3 * t[2]:9.1f}")
            print(f"  {name:12s} {dims:22s} speedup   {ref_t[0] / fast_t[0]:8.1f}x "
                  f"{ref_t[1] / fast_t[1]:8.1f}x {ref_t[2] / fast_t[2]:8.1f}x")

    print(f"\n(2) chunked kernels, batch={a.batch}: median wall time, us/token = time / (batch * T)")
    print(f"  {'kernel':12s} {'T':>6s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd us/tok':>11s} "
          f"{'fwd+bwd us/tok':>15s}")
    for name, (fast, _, make, _) in kernels.items():
        fwd = jax.jit(functools.partial(fast, chunk_size=a.chunk))
        fwd_bwd = _fwd_bwd(fast, a.chunk)
        for T in lengths:
            (t_f, _, _), (t_fb, _, _) = _time([fwd, fwd_bwd], make(T), a.repeats)
            n_tok = a.batch * T
            print(f"  {name:12s} {T:6d} {1e3 * t_f:9.2f} {1e3 * t_fb:11.2f} {1e6 * t_f / n_tok:11.3f} "
                  f"{1e6 * t_fb / n_tok:15.3f}", flush=True)
