"""Train-step throughput: `python -m sweeps.bench +arch=NAME [bench.size=...]`, one measurement.

Prints tokens/s, achieved FLOP/s by the analytic count (model FLOPs: causal attention counted
at half) and the model FLOP utilisation (MFU):
- on CPU against this machine's fp32 matmul peak measured in the same process, so the ratio is
  comparable across machines and robust to background load drifting slowly;
- on GPU / TPU against the device's published dense bf16 peak (DEVICE_PEAKS, per chip, times the
  devices in use); a device missing from the table prints the achieved FLOP/s and says its peak
  is unknown.

It also prints the compiled step's memory from XLA's memory analysis (per device: arguments,
outputs, temporaries, the peak), and with `bench.remat=[none,block,dots]` the memory and step
time of each rematerialisation policy. Nothing is written. Launched as several processes (dist.*,
or SLURM tasks), it measures the global step and process 0 prints.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from archs.config import Remat
from sweeps.config import BenchConfig
from sweeps.engine.dataset import open_dataset
from sweeps.engine.distributed import initialize, is_primary
from sweeps.engine.plan import plan_run
from sweeps.engine.trainer import Trainer

# Published dense (no sparsity) bf16 peaks per chip, FLOP/s, matched against
# jax.devices()[0].device_kind. PCIe / NVL parts of the H100 / H200 run at other clocks and
# power limits, so they are left unknown rather than credited the SXM figure.
DEVICE_PEAKS = (
    (r"\bH(100|200)\b(?!.*(PCIe|NVL))", "NVIDIA H100 / H200 SXM", 989e12),
    (r"\bA100\b", "NVIDIA A100", 312e12),
    (r"^TPU v4\b", "TPU v4", 275e12),
    (r"^TPU v5(e| lite)", "TPU v5e", 197e12),
    (r"^TPU v5p?$", "TPU v5p", 459e12),
    (r"^TPU v6(e| lite)", "TPU v6e", 918e12),
)


def device_peak(device_kind: str) -> tuple[str, float] | None:
    """(name, dense bf16 FLOP/s per chip) of a device kind, or None if not in the table."""
    for pattern, name, flops in DEVICE_PEAKS:
        if re.search(pattern, device_kind.strip()):
            return name, flops
    return None


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


def _silent(*args, **kwargs) -> None:
    pass


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def step_memory(compiled) -> dict:
    """Per-device bytes of a compiled step from XLA's memory analysis. The peak is XLA's own where
    the backend reports one, else arguments + outputs + temporaries - outputs aliased (donated)
    into arguments."""
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    computed = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    out["peak"] = max(int(getattr(m, "peak_memory_in_bytes", 0) or 0), computed)
    return out


def _measure(cfg: BenchConfig, plan, dataset, remat: Remat, meter: MatmulPeak | None) -> dict:
    b = cfg.bench
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, remat=remat))
    trainer = Trainer(cfg, plan)
    state = trainer.init_state()
    t = time.perf_counter()
    memory = step_memory(trainer.compile_step(state))
    compile_s = time.perf_counter() - t
    rows = trainer.rows  # this process's rows (all of them with one process)
    batches = [dataset.train_batch(cfg.seed, s, b.batch_size, b.seq_len, rows=rows) for s in range(b.steps + 1)]
    state, m = trainer.step(state, batches[0], 0)  # warm
    jax.block_until_ready(m["loss"])
    if meter is not None:
        meter.sample(3)
    times = []
    for s in range(1, b.steps + 1):
        t = time.perf_counter()
        state, m = trainer.step(state, batches[s], s)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
        if meter is not None:
            meter.sample(2)  # interleaved: steps and peak see the same machine state
    step_s = float(np.median(times))
    return {"remat": str(remat), "step_s": step_s, "compile_s": compile_s, "timed_steps": len(times),
            "tokens_per_s": plan.tokens_per_step / step_s, "memory": memory, "loss": float(m["loss"])}


def bench(cfg: BenchConfig) -> dict:
    initialize(cfg.dist)  # several processes: before anything else uses JAX
    say = print if is_primary() else _silent  # process 0 reports
    b = cfg.bench
    cfg = dataclasses.replace(
        cfg, arch=dataclasses.replace(cfg.arch, size=b.size),
        train=dataclasses.replace(cfg.train, seq_len=b.seq_len, batch_size=b.batch_size,
                                  tokens=b.batch_size * b.seq_len * (b.steps + 1)))
    n_dev = jax.device_count()
    plan = plan_run(cfg, n_dev)
    dataset = open_dataset(cfg.data)
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    meter = MatmulPeak(b.matmul_n) if on_cpu else None
    known = None if on_cpu else device_peak(dev.device_kind)
    mc = plan.model_cfg
    say(f"arch={mc.name} params={plan.params / 1e6:.2f}M (non-embedding {plan.nonembed_params / 1e6:.2f}M) "
        f"seq_len={b.seq_len} batch={b.batch_size} dtype={mc.dtype} devices={n_dev} x {dev.device_kind}")
    results = []
    for remat in dict.fromkeys(b.remat or [cfg.train.remat]):
        r = _measure(cfg, plan, dataset, Remat(remat), meter)
        r["achieved_flops"] = r["tokens_per_s"] * plan.flops_per_token
        mem = r["memory"]
        say(f"remat={r['remat']}: step {r['step_s'] * 1e3:.1f} ms (median of {r['timed_steps']}; "
            f"compile {r['compile_s']:.1f} s)")
        say(f"  {r['tokens_per_s']:,.0f} tokens/s, {r['achieved_flops'] / 1e9:,.1f} GFLOP/s achieved "
            "(analytic, 6ND + attention)")
        if on_cpu:  # simulated devices share one host's cores: the peak is per host (process)
            hosts = jax.process_count()
            peak = meter.flops * hosts
            r.update(peak_flops=peak, peak_source="measured fp32 matmul", mfu=r["achieved_flops"] / peak)
            say(f"  fp32 matmul peak {meter.flops / 1e9:.1f} GFLOP/s{f' x {hosts} processes' if hosts > 1 else ''} "
                f"({b.matmul_n}^3, best of {meter.samples} interleaved with the steps) -> MFU {100 * r['mfu']:.1f}%")
        elif known is not None:
            name, per_chip = known
            peak = per_chip * n_dev
            r.update(peak_flops=peak, peak_source=f"{name} dense bf16", mfu=r["achieved_flops"] / peak)
            say(f"  {name} dense bf16 peak {per_chip / 1e12:.0f} TFLOP/s x {n_dev} -> MFU {100 * r['mfu']:.1f}%")
        else:
            r.update(peak_flops=None, peak_source=None, mfu=None)
            say(f"  peak of {dev.device_kind!r} unknown (not in sweeps.tools.bench.DEVICE_PEAKS): no MFU")
        say(f"  compiled step memory per device: arguments {_mib(mem['arguments'])}, outputs {_mib(mem['outputs'])} "
            f"({_mib(mem['aliased'])} of them donated arguments), temporaries {_mib(mem['temporaries'])}; "
            f"peak {_mib(mem['peak'])}")
        results.append(r)
    if len(results) > 1:
        say(f"{'remat':<6} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'temporaries':>14} {'peak':>14}")
        for r in results:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            say(f"{r['remat']:<6} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10,.0f} {mfu:>6} "
                f"{_mib(r['memory']['temporaries']):>14} {_mib(r['memory']['peak']):>14}")
    first = results[0]
    return {"arch": mc.name, "params": plan.params, "nonembed_params": plan.nonembed_params, "seq_len": b.seq_len,
            "batch_size": b.batch_size, "dtype": mc.dtype, "devices": n_dev, "device_kind": dev.device_kind,
            "flops_per_token": plan.flops_per_token, **first, "policies": results}
