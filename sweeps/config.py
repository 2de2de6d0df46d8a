"""Typed structured configs for every entry point, registered with Hydra's ConfigStore.

The YAML files under conf/ fill these schemas; a typo'd key or a wrong type fails at
composition time, before any data is read or anything compiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from archs.config import ModelConfig


@dataclass
class DataConfig:
    name: str = "stdlib"  # stdlib: the running interpreter's standard library sources | text
    paths: list[str] = field(default_factory=list)  # files or directories, for name=text
    heldout_fraction: float = 0.02


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate at width lr_base_width (see lr_rule)
    lr_rule: str = "width"  # width: lr * (lr_base_width / d_model) ** lr_width_exponent | none
    lr_base_width: int = 128
    lr_width_exponent: float = 0.5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; never applied to norms and biases
    clip: float = 1.0  # global gradient-norm clip
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    warmup_frac: float = 0.05
    decay_frac: float = 0.2  # wsd: final fraction of steps spent decaying linearly to min_lr
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    tokens: int = 1_500_000  # token budget of one run (rounded up to whole steps)
    batch_size: int = 16
    seq_len: int = 256
    eval_every: int = 0  # steps between held-out evaluations; 0: about `evals` evenly spaced
    evals: int = 8
    eval_windows: int = 64
    eval_batch: int = 16
    log_every: int = 10
    checkpoint_every_s: float = 120.0  # a kill loses at most this much work
    checkpoint_every_steps: int = 0  # 0: time-based only
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = True


@dataclass
class MeshConfig:
    data: int = -1  # -1: whatever devices remain after fsdp x tensor
    fsdp: int = 1
    tensor: int = 1


@dataclass
class SweepConfig:
    name: str = "none"  # none: a single training run
    budgets: list[float] = field(default_factory=list)  # training FLOPs per IsoFLOP curve
    sizes: list[str] = field(default_factory=list)  # model sizes (arch.size values) per budget
    # Extra override lists: a Cartesian product of Hydra overrides applied on top of every
    # grid point, e.g. {"optim.lr": [1e-3, 3e-3]} for a learning-rate scan.
    grid: dict[str, list[Any]] = field(default_factory=dict)
    min_steps: int = 20  # grid points with fewer training steps are dropped (too small to mean anything)
    # Grid points whose tokens per parameter (N = flops_per_token / 6) fall outside these bounds are
    # dropped: far from the compute-optimal ratio they cost their budget and do not shape the parabola.
    min_tokens_per_param: Optional[float] = None
    max_tokens_per_param: Optional[float] = None
    group_by: list[str] = field(default_factory=lambda: ["arch"])  # report grouping (any config key)
    bootstrap: int = 1000  # bootstrap resamples for the confidence intervals of the fits
    report: bool = True  # fit and draw ROOT/report after the sweep
    retry_failed: bool = False  # re-train runs recorded as failed (diverged) instead of skipping them
    dry_run: bool = False  # print the grid and what would be trained, launch nothing


@dataclass
class BenchConfig:
    """`python -m sweeps.bench`: train-step throughput against the measured matmul peak."""

    size: str = "bench20m"  # ~19M non-embedding parameters with the transformer pattern
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 8  # timed steps after warm-up
    matmul_n: int = 2048  # square fp32 matmul used to measure the peak


@dataclass
class Config:
    arch: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    seed: int = 0
    root: str = "runs"
    run_id: str = ""  # empty: derived from the config, so re-running finds its own row
    budget: Optional[float] = None  # the IsoFLOP budget (training FLOPs) this run belongs to; set by the sweeper


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lab_schema", node=Config)
    cs.store(group="arch", name="schema", node=ModelConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="sweep", name="schema", node=SweepConfig)
    cs.store(group="mesh", name="schema", node=MeshConfig)
