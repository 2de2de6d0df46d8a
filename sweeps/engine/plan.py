"""Everything about a run that is decided before anything is built: its plan and its identity.

`plan_run` checks the whole config (model shape, objective, budget, mesh, memory) and builds the
model abstractly (shapes only), so a config that cannot train fails in seconds with one line,
before a results row, a directory or a compilation exists. It also settles what depends on the
backend: `arch.dtype=auto` becomes bfloat16 on GPU / TPU and float32 on CPU (the run's identity
keeps `auto`, so the same command names the same run wherever it is planned).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import jax
from flax import nnx

from archs.config import ModelConfig, Remat
from archs.errors import ConfigError
from archs.flops import flops_per_token
from archs.model import Model, count_active_params, count_params
from archs.objective import AutoregressiveObjective
from archs.sharding import batch_shards, mesh_shape
from archs.sizes import resolve
from diffusion.block import BlockDiffusionObjective
from diffusion.objective import MaskedDiffusionObjective
from sweeps.config import Config, DataName, LrRule
from sweeps.engine.data import available_memory
from sweeps.engine.dataset import fit_vocab

OBJECTIVES = {"ar": AutoregressiveObjective, "diffusion": MaskedDiffusionObjective,
              "block_diffusion": BlockDiffusionObjective}
DIFFUSION = ("diffusion", "block_diffusion")  # objectives whose eval_bpb is a NELBO bound


def make_objective(model_cfg: ModelConfig):
    """The objective named by the model config (checks its settings)."""
    if model_cfg.objective not in OBJECTIVES:
        raise ConfigError(f"arch.objective={model_cfg.objective!r}; use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[model_cfg.objective](model_cfg)


# --- identity ------------------------------------------------------------------------------------

# The fields that change what a run computes, or what it stands for (its IsoFLOP budget; its role:
# a cooldown trunk or branch is not a plain run even where it computes the same); the run id hashes
# exactly these, so settings such as logging, checkpoint cadence, the mesh or the output directory
# never split one run into two.
RESULT_FIELDS = ("arch", "data", "optim", "train.tokens", "train.batch_size", "train.seq_len", "train.evals",
                 "train.eval_every", "train.eval_windows", "seed", "budget", "role")


def _get(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def result_fields(cfg: Config) -> dict:
    out = {}
    for path in RESULT_FIELDS:
        v = _get(cfg, path)
        v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        if path == "data":  # the same files under the same absolute paths, from any directory
            v = dict(v, paths=[str(Path(os.path.expanduser(p)).absolute()) for p in v["paths"]])
            if v["dir"]:
                v["dir"] = str(Path(os.path.expanduser(v["dir"])).absolute())
            for key in ("dir", "tokenizer"):  # unset: ids of byte-corpus runs stay what they were
                if not v[key]:
                    del v[key]
            if v["name"] != "mqar":
                del v["mqar"]
        if path == "arch":  # how attention runs (the same numbers to fp32 rounding), not what it computes
            del v["attention_impl"]
        out[path] = v
    return out


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(result_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()


def run_id_for(cfg: Config) -> str:
    """A readable id that is a pure function of the result-affecting fields."""
    a = cfg.arch
    return f"{a.name}-{a.size}-{int(cfg.train.tokens)}tok-s{cfg.seed}-{config_hash(cfg)[:8]}"


# --- the plan ------------------------------------------------------------------------------------


def learning_rate(cfg: Config, d_model: int) -> float:
    o = cfg.optim
    if o.lr_rule == LrRule.width:
        return float(o.lr) * (o.lr_base_width / d_model) ** o.lr_width_exponent
    return float(o.lr)


@dataclasses.dataclass
class Plan:
    """Everything derived from the config before any compilation."""

    model_cfg: ModelConfig  # resolved (every dimension filled in)
    steps: int
    tokens: int
    tokens_per_step: int
    flops_per_token: float
    flops: float
    peak_lr: float
    mesh_shape: tuple[int, int, int, int]  # data, fsdp, tensor, expert
    params: int
    nonembed_params: int
    active_params: int  # what one token touches (MoE: top_k of the routed experts)

    @property
    def n_batch_devices(self) -> int:
        return batch_shards(self.mesh_shape)


def abstract_model(model_cfg: ModelConfig, seed: int = 0) -> Model:
    """The model with shapes only (nothing allocated, nothing compiled); building it runs every
    layer's own checks."""
    return nnx.eval_shape(lambda: Model(model_cfg, rngs=nnx.Rngs(params=seed)))


def _memory_check(cfg: Config, mc: ModelConfig, mesh: tuple[int, int, int], params: float, n_devices: int) -> None:
    """Refuse a run whose parameters, Adam state and activations cannot fit, before allocating.

    A lower bound, on purpose (a refusal must be right): fp32 parameters, gradients and two Adam
    moments (16 bytes per parameter), sharded over fsdp x tensor; activations kept for the
    backward pass of about 20 d_model values per token per layer (in the compute dtype) plus the
    fp32 logits, sharded over the batch axes. Rematerialised blocks keep less: their input (block) or their
    projections' outputs (dots, at least 8 d_model), plus one block's activations while it is
    recomputed."""
    t = cfg.train
    _, fsdp, tensor, _ = mesh
    state = 16 * params / (fsdp * tensor)
    tokens = t.batch_size * t.seq_len / batch_shards(mesh)
    kept = {Remat.none: 20 * mc.n_layers, Remat.dots: 8 * mc.n_layers + 20, Remat.block: mc.n_layers + 20}
    act_bytes = 2 if mc.dtype == "bfloat16" else 4
    acts = tokens * (act_bytes * min(kept[Remat(t.remat)], kept[Remat.none]) * mc.d_model + 4 * 2 * mc.vocab_size)
    need = state + acts
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        have, where = float(stats["bytes_limit"]), f"{dev.device_kind} memory per device"
    else:
        share = 1 if dev.platform != "cpu" else n_devices  # simulated CPU devices share the host
        have, where = available_memory() / share, "available host memory" + (" per device" if share > 1 else "")
    if need > have:
        raise ConfigError(
            f"arch.size={mc.size} (at least {params / 1e6:,.1f}M parameters) with train.batch_size={t.batch_size} x "
            f"train.seq_len={t.seq_len} needs at least {need / 2**30:,.1f} GiB (fp32 parameters, gradients and Adam "
            f"moments, activations) but {have / 2**30:,.1f} GiB of {where} is there; choose a smaller arch.size or "
            "batch, or shard over more devices (mesh.fsdp)")


def compute_dtype_for(dtype: str, platform: str) -> str:
    """The concrete compute dtype of `arch.dtype` on a backend platform (cpu, gpu, cuda, rocm, tpu):
    auto is bfloat16 on accelerators (parameters, softmax and loss stay float32) and float32 on
    CPU, where bfloat16 matmuls are emulated and slower."""
    if dtype != "auto":
        return dtype
    return "float32" if platform == "cpu" else "bfloat16"


def plan_run(cfg: Config, n_devices: int, platform: str | None = None) -> Plan:
    """The plan of `cfg` on `n_devices` devices of `platform` (default: JAX's default backend)."""
    model_cfg = resolve(fit_vocab(cfg.arch, cfg.data))  # the vocabulary is the data's
    model_cfg = dataclasses.replace(
        model_cfg, dtype=compute_dtype_for(model_cfg.dtype, platform or jax.default_backend()))
    make_objective(model_cfg)  # objective-specific settings (arch.diffusion.*)
    t = cfg.train
    if cfg.data.name == DataName.mqar:
        cfg.data.mqar.check(t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len
    if t.tokens < tokens_per_step:
        raise ConfigError(
            f"train.tokens={t.tokens} is smaller than one step (batch_size x seq_len = {tokens_per_step}); "
            "raise train.tokens or shrink the batch"
        )
    shape = mesh_shape(cfg.mesh, n_devices)
    if t.batch_size % batch_shards(shape):
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not split over data x fsdp x expert = {batch_shards(shape)} "
            "devices; make the batch a multiple of it"
        )
    # A lower bound of the parameters (the SwiGLU MLPs and the embeddings alone) refuses absurd
    # sizes before the abstract build, which traces every layer; the exact count checks again.
    d, v = model_cfg.d_model, model_cfg.vocab_size
    _memory_check(cfg, model_cfg, shape, 8 * d * d * model_cfg.n_layers + v * d, n_devices)
    abstract = abstract_model(model_cfg, cfg.seed)
    n_params, n_nonembed = count_params(abstract)
    _memory_check(cfg, model_cfg, shape, n_params, n_devices)
    steps = math.ceil(t.tokens / tokens_per_step)
    if t.profile_steps and t.profile_steps[1] > steps:
        raise ConfigError(f"train.profile_steps={list(t.profile_steps)} goes past the run's last step ({steps}); "
                          f"trace steps within 1..{steps}")
    fpt = flops_per_token(model_cfg, t.seq_len)
    tokens = steps * tokens_per_step
    return Plan(model_cfg, steps, tokens, tokens_per_step, fpt, fpt * tokens, learning_rate(cfg, model_cfg.d_model),
                shape, n_params, n_nonembed, count_active_params(abstract)[0])
