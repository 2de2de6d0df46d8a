"""Per-token training cost of one token mixer: Gated DeltaNet vs Mamba-2 vs causal attention.

    python -m sweeps.bench_layers                       # d_model 256, T 256..8192, < ~4 min on 2 cores
    python -m sweeps.bench_layers d_model=512 'lengths=[1024,4096]' repeats=3   (sweeps.config.LayerBenchConfig)

For each length T it times the jitted forward + backward (gradients w.r.t. the parameters and
the input) of one mixer layer at batch 1, exactly as the model builder makes it (archs.mixers),
document masking on with one document), and prints milliseconds per call and
microseconds per token, next to the analytic forward FLOPs per token. Attention's per-token cost
grows linearly with T (its T^2 score matrix), the recurrent mixers' stays flat, so there is a
crossover length above which a GDN layer is cheaper than attention on this machine; it is
printed at the end (interpolated in log T between the measured lengths).
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from archs.config import ModelConfig
from archs.context import Ctx
from archs.attention import attention_flops
from archs.mixers import mixer_kind
from archs.sizes import resolve

from ssm.layers import recurrent_layer_flops
from sweeps.config import LayerBenchConfig

KINDS = {"G": "gated deltanet", "M": "mamba2", "A": "attention"}


def _layer_fn(cfg: ModelConfig, kind: str, doc_mask: bool):
    """jit(value_and_grad) of sum(mixer(x)^2) w.r.t. (params, x), and the initial params."""
    gdef, params = nnx.split(mixer_kind(kind).build(cfg, nnx.Rngs(0)))

    def loss(params, x):
        b, t, _ = x.shape
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        seg = jnp.zeros((b, t), jnp.int32) if doc_mask else None
        y = nnx.merge(gdef, params)(x, Ctx(positions=pos, segment_ids=seg))
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _time(f, args, repeats: int, budget_s: float) -> float:
    """Median wall time of compiled calls. Compiled ahead of time, so no separate warm-up call
    is needed: at long lengths one attention call takes tens of seconds on 2 cores."""
    compiled = f.lower(*args).compile()
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:  # long lengths: fewer repeats
            break
    return statistics.median(times)


def analytic_flops_per_token(cfg: ModelConfig, kind: str, t: int) -> float:
    if kind == "A":
        return attention_flops(cfg, t, window=0, executed=True) / t
    return recurrent_layer_flops(cfg, kind, t) / t


def crossover(lengths, cheap, dear) -> float | None:
    """First T (log-linear interpolation) at which cheap(T) <= dear(T); None when never."""
    prev = None
    for t, a, b in zip(lengths, cheap, dear):
        diff = math.log(a) - math.log(b)
        if diff <= 0:
            if prev is None:
                return float(t)
            t0, d0 = prev
            frac = d0 / (d0 - diff)
            return float(math.exp(math.log(t0) + frac * (math.log(t) - math.log(t0))))
        prev = (t, diff)
    return None


def main(a: LayerBenchConfig) -> None:
    lengths = list(a.lengths)
    kinds = list(a.kinds)
    cfg = resolve(ModelConfig(
        name="bench", pattern="".join(kinds), d_model=a.d_model, n_layers=1, n_heads=a.heads,
        chunk_size=a.chunk, mamba_head_dim=a.mamba_head_dim, mamba_d_state=a.mamba_d_state,
    ))
    print(f"backend={jax.default_backend()} devices={jax.device_count()} d_model={cfg.d_model} "
          f"heads={cfg.n_heads} head_dim={cfg.head_dim} chunk={cfg.chunk_size} "
          f"mamba(expand={cfg.mamba_expand}, P={cfg.mamba_head_dim}, N={cfg.mamba_d_state}) batch=1 "
          f"doc_mask={a.doc_mask}; forward+backward of one mixer layer, median of <= {a.repeats}")
    print(f"{'layer':16s} {'T':>6s} {'ms/call':>10s} {'us/token':>10s} {'fwd MFLOP/tok':>14s} {'GFLOP/s':>8s}")
    per_token: dict[str, list[float]] = {k: [] for k in kinds}
    rng = np.random.default_rng(0)
    for kind in kinds:
        f, params = _layer_fn(cfg, kind, a.doc_mask)
        for t in lengths:
            x = jnp.asarray(rng.standard_normal((1, t, cfg.d_model)), jnp.float32)
            sec = _time(f, (params, x), a.repeats, a.budget_s)
            fpt = analytic_flops_per_token(cfg, kind, t)
            per_token[kind].append(sec / t)
            print(f"{KINDS[kind]:16s} {t:6d} {1e3 * sec:10.2f} {1e6 * sec / t:10.3f} {fpt / 1e6:14.2f} "
                  f"{3 * fpt * t / sec / 1e9:8.1f}", flush=True)
    if "G" in kinds and "A" in kinds:
        x = crossover(lengths, per_token["G"], per_token["A"])
        if x is None:
            print(f"\ncrossover: a GDN layer stays dearer than attention up to T={lengths[-1]} on this machine")
        elif x == lengths[0]:
            print(f"\ncrossover: a GDN layer is already cheaper than attention at the shortest length "
                  f"T={lengths[0]}; pass shorter lengths=[...] to locate it")
        else:
            print(f"\ncrossover: a GDN layer is cheaper than causal attention from T ~ {x:.0f} on this machine "
                  f"(per-token fwd+bwd time, interpolated in log T between measured lengths)")
        fl = crossover(lengths, [analytic_flops_per_token(cfg, "G", t) for t in lengths],
                       [analytic_flops_per_token(cfg, "A", t) for t in lengths])
        if fl is not None:
            print(f"analytic crossover (forward FLOPs as executed, dense masked attention): T ~ {fl:.0f}")
    if "M" in kinds and "A" in kinds:
        x = crossover(lengths, per_token["M"], per_token["A"])
        print(f"Mamba-2 vs attention crossover: {'T ~ %.0f' % x if x is not None else 'not reached'}")
