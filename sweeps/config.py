"""Typed structured configs of every entry point, registered with Hydra's ConfigStore.

The YAML files under conf/ fill these schemas. Each entry point (sweeps.cli) composes the
config, checks that every key the user typed exists here, and turns it into these dataclasses
once; validation lives in each node's `__post_init__` (the model node's in archs.sizes.resolve,
which also derives its dimensions), so a bad value is one line before anything is read or
compiled, and everything below the entry point works on typed objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from archs.config import ModelConfig, Remat
from archs.errors import ConfigError
from archs.tokens import N_SPECIAL
from diffusion.samplers import CONFIDENCES, SAMPLERS


CONF = Path(__file__).resolve().parents[1] / "conf"


def arch_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))


class DataName(StrEnum):
    stdlib = "stdlib"  # the running interpreter's standard library sources (zero setup)
    text = "text"  # the user's text files or directories, read into memory
    tokens = "tokens"  # token shards written by python -m sweeps.prepare, memory-mapped
    mqar = "mqar"  # generated multi-query associative recall sequences (a recall probe; data.mqar)


class TokenizerName(StrEnum):
    byte = "byte"  # ids 0..255 are the bytes (archs.tokens.BYTES)
    bpe = "bpe"  # byte-level BPE (Hugging Face tokenizers), trained on the input or loaded


class Schedule(StrEnum):
    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay


class DecayShape(StrEnum):
    linear = "linear"
    sqrt = "sqrt"  # 1 - sqrt: Hagele et al. (2024)'s best cooldown shape


class Role(StrEnum):
    run = "run"  # an ordinary run (a grid point, or a single run)
    trunk = "trunk"  # the stable phase shared by a size's cooldown branches; not a grid point
    branch = "branch"  # a grid point that forks from its trunk and cools down


class LrRule(StrEnum):
    width = "width"  # lr * (lr_base_width / d_model) ** lr_width_exponent
    none = "none"


def _at_least(node: str, obj, **lows) -> None:
    for key, low in lows.items():
        value = getattr(obj, key)
        if not value >= low:
            raise ConfigError(f"{node + '.' if node else ''}{key}={value} must be >= {low}")


def _fraction(node: str, key: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    lo_ok = value > 0 if open_low else value >= 0
    hi_ok = value < 1 if open_high else value <= 1
    if not (math.isfinite(value) and lo_ok and hi_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ConfigError(f"{node}.{key}={value} must lie in {interval}")


@dataclass
class MqarConfig:
    """data=mqar: key-value pairs, then queries of their keys each followed by its value."""

    keys: int = 64  # key vocabulary (the keys of one sequence are distinct)
    values: int = 64  # value vocabulary
    pairs: int = 8  # key-value pairs per sequence
    queries: int = 0  # queries per sequence; 0: as many as fit the window (the rest is EOD)

    def __post_init__(self):
        _at_least("data.mqar", self, keys=1, values=1, pairs=1, queries=0)
        if self.pairs > self.keys:
            raise ConfigError(f"data.mqar.pairs={self.pairs} exceeds data.mqar.keys={self.keys}: the keys of a "
                              "sequence are distinct; raise keys or lower pairs")

    def check(self, seq_len: int) -> None:
        need = 2 * self.pairs + 2 * max(1, self.queries)
        if seq_len < need:
            raise ConfigError(f"train.seq_len={seq_len} cannot hold data.mqar.pairs={self.pairs} pairs and "
                              f"{max(1, self.queries)} quer{'ies' if self.queries > 1 else 'y'} with answers: it "
                              f"needs at least {need} tokens; raise train.seq_len or lower them")


@dataclass
class DataConfig:
    name: DataName = DataName.stdlib
    paths: list[str] = field(default_factory=list)  # files or directories, for name=text
    heldout_fraction: float = 0.02  # share of documents (by a hash of their path) held out
    dir: str = ""  # name=tokens: a directory written by python -m sweeps.prepare
    tokenizer: str = ""  # name=tokens: the tokenizer the run expects (byte | bpe); empty: the manifest's
    mqar: MqarConfig = field(default_factory=MqarConfig)  # name=mqar: the recall task

    def __post_init__(self):
        _fraction("data", "heldout_fraction", self.heldout_fraction, open_low=True, open_high=True)
        if self.tokenizer and self.tokenizer not in TokenizerName.__members__:
            raise ConfigError(f"data.tokenizer={self.tokenizer!r}; use one of {', '.join(TokenizerName)} "
                              "(or leave it empty to take the manifest's)")
        if (self.dir or self.tokenizer) and self.name != DataName.tokens:
            raise ConfigError(f"data.dir and data.tokenizer apply to data=tokens, not data={self.name}; "
                              "train from prepared shards with data=tokens data.dir=DIR")
        if self.mqar != MqarConfig() and self.name != DataName.mqar:
            raise ConfigError(f"data.mqar applies to data=mqar, not data={self.name}; use data=mqar data.mqar...")
        if self.paths and self.name != DataName.text:
            raise ConfigError(f"data.paths applies to data=text, not data={self.name}; "
                              "use data=text data.paths=[...] (or data=tokens data.dir=DIR for prepared shards)")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate at width lr_base_width (see lr_rule)
    lr_rule: LrRule = LrRule.width
    lr_base_width: int = 128
    lr_width_exponent: float = 0.5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; never applied to norms and biases
    clip: float = 1.0  # global gradient-norm clip
    schedule: Schedule = Schedule.cosine
    warmup_frac: float = 0.05
    decay_frac: float = 0.2  # wsd: final fraction of steps spent decaying to min_lr
    # Absolute step counts override the fractions (cooldown branches share one warmup with their
    # trunk, whatever their length); decay_steps=0 is a constant rate to the end (a trunk).
    warmup_steps: Optional[int] = None
    decay_steps: Optional[int] = None
    decay_shape: DecayShape = DecayShape.linear  # wsd cooldown: linear or 1-sqrt
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.name != "adamw":
            raise ConfigError(f"optim.name={self.name!r}; the lab trains with adamw (optim=adamw or optim=adamw_wsd)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr={self.lr} must be a positive number")
        if not (math.isfinite(self.eps) and self.eps > 0) or not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"optim.eps={self.eps} and optim.clip={self.clip} must be positive numbers")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        _at_least("optim", self, lr_base_width=1)
        for key in ("b1", "b2"):
            _fraction("optim", key, getattr(self, key), open_high=True)
        for key in ("warmup_frac", "decay_frac", "min_lr_ratio"):
            _fraction("optim", key, getattr(self, key))
        if self.warmup_frac + self.decay_frac > 1:
            raise ConfigError(f"optim.warmup_frac + optim.decay_frac = {self.warmup_frac + self.decay_frac:g} "
                              "exceeds the run; make their sum at most 1")
        for key in ("warmup_steps", "decay_steps"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(f"optim.{key}={v} must be >= 0 (or null: from the fraction)")


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
    # Cooldown branches (set by the sweep driver): a branch starts from its trunk's checkpoint at
    # step (steps - optim.decay_steps); a trunk keeps its checkpoints at the branches' fork steps.
    branch_from: str = ""  # run id of the trunk, in the same root
    keep_steps: list[int] = field(default_factory=list)
    # Rematerialisation of every block in the backward pass (archs.model.REMAT_POLICIES): none |
    # block (keep only block inputs) | dots (keep the projections' outputs). Memory against compute;
    # the numbers are the same, so it is not part of the run's identity.
    remat: Remat = Remat.none
    # [A, B]: an XProf trace of training steps A..B (counted from 1, as in metrics.jsonl) in
    # ROOT/runs/ID/profile (tensorboard --logdir there, Profile tab); empty: no trace.
    profile_steps: list[int] = field(default_factory=list)

    def __post_init__(self):
        _at_least("train", self, tokens=1, batch_size=1, seq_len=1, eval_every=0, evals=1, eval_windows=1,
                  eval_batch=1, log_every=1, checkpoint_every_steps=0, keep_checkpoints=1)
        if not (self.checkpoint_every_s >= 0):
            raise ConfigError(f"train.checkpoint_every_s={self.checkpoint_every_s} must be >= 0 "
                              "(seconds between checkpoints)")
        p = self.profile_steps
        if p and (len(p) != 2 or not 1 <= p[0] <= p[1]):
            raise ConfigError(f"train.profile_steps={list(p)} must be [A, B] with 1 <= A <= B (the first and last "
                              "traced step), or [] for no trace")


@dataclass
class MeshConfig:
    data: int = -1  # -1: whatever devices remain after fsdp x tensor x expert
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1  # expert parallelism: routed experts split over this axis (archs.sharding)

    def __post_init__(self):
        if self.data != -1 and self.data < 1:
            raise ConfigError(f"mesh.data={self.data} must be >= 1 (or -1: the devices that remain)")
        _at_least("mesh", self, fsdp=1, tensor=1, expert=1)


@dataclass
class DistConfig:
    """A run spanning several processes (hosts), one per launched copy of the command.

    Launched as several SLURM tasks (hydra/launcher=slurm with nodes or tasks_per_node > 1), every
    process finds its peers from SLURM's environment and nothing needs setting. Elsewhere each
    process is started by hand with the same command plus its own process_id, and the address of
    process 0. Not part of the run's identity: a run gives the same numbers on any layout."""

    coordinator: str = ""  # HOST:PORT where process 0 listens; empty: a single process (or SLURM's tasks)
    processes: int = 1  # processes of the run (with coordinator)
    process_id: int = 0  # this process's index, 0 .. processes - 1 (with coordinator)

    def __post_init__(self):
        if self.processes < 1 or not 0 <= self.process_id < self.processes:
            raise ConfigError(f"dist.process_id={self.process_id} with dist.processes={self.processes}: need "
                              "processes >= 1 and 0 <= process_id < processes")
        if self.processes > 1 and not self.coordinator:
            raise ConfigError(f"dist.processes={self.processes} needs dist.coordinator=HOST:PORT (where process 0 "
                              "listens), the same in every process")
        if self.coordinator:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"dist.coordinator={self.coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:1234")


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
    # WSD cooldown branches (Hagele et al. 2024): per size one constant-rate trunk, and every budget
    # of that size a branch that forks from it and decays over cooldown_frac of its own steps.
    cooldowns: bool = False
    cooldown_frac: float = 0.2
    cooldown_shape: DecayShape = DecayShape.linear
    seeds: int = 1  # every point trained with seeds seed, seed+1, ...; fits use all of them

    def __post_init__(self):
        _at_least("sweep", self, min_steps=1, bootstrap=0, seeds=1)
        _fraction("sweep", "cooldown_frac", self.cooldown_frac, open_low=True, open_high=True)
        if not self.group_by:
            raise ConfigError("sweep.group_by is empty; group by at least one key (e.g. [arch])")
        for b in self.budgets:
            if not (math.isfinite(b) and b > 0):
                raise ConfigError(f"sweep.budgets holds {b}; budgets are positive FLOP counts")


@dataclass
class Config:
    """`python -m sweeps.run`: one training run, or a sweep of them."""

    arch: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    root: str = "runs"
    run_id: str = ""  # empty: derived from the config, so re-running finds its own row
    budget: Optional[float] = None  # the IsoFLOP budget (training FLOPs) this run belongs to; set by the sweeper
    role: Role = Role.run  # set by the sweep driver for cooldown trunks and branches

    def __post_init__(self):
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")
        if not self.root:
            raise ConfigError("root is empty; name a directory for the results (root=DIR)")
        if (self.role == Role.branch) != bool(self.train.branch_from):
            raise ConfigError("a cooldown branch (role=branch) needs train.branch_from=TRUNK_RUN_ID, and only a "
                              "branch takes one")
        if self.role == Role.branch and (self.optim.schedule != Schedule.wsd or not self.optim.decay_steps):
            raise ConfigError("a cooldown branch decays: it needs optim.schedule=wsd and optim.decay_steps >= 1")


@dataclass
class BenchSettings:
    size: str = "bench20m"  # ~19M non-embedding parameters with the transformer pattern
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 8  # timed steps after warm-up
    matmul_n: int = 2048  # square fp32 matmul used to measure the CPU peak
    # Rematerialisation policies to measure one after another (compiled memory and step time of
    # each); empty: train.remat alone.
    remat: list[Remat] = field(default_factory=list)

    def __post_init__(self):
        _at_least("bench", self, seq_len=1, batch_size=1, steps=1, matmul_n=16)


@dataclass
class BenchConfig(Config):
    """`python -m sweeps.bench`: one train-step throughput measurement."""

    bench: BenchSettings = field(default_factory=BenchSettings)

    def __post_init__(self):
        super().__post_init__()
        if self.sweep.name != "none":  # a sweep group would also turn Hydra into a multirun
            raise ConfigError(f"sweep={self.sweep.name}: the benchmark measures one configuration; drop sweep= "
                              "(sweeps run with python -m sweeps.run)")


@dataclass
class ReportConfig:
    """`python -m sweeps.report`: re-fit and re-draw everything in a results database."""

    root: str = "runs"
    group_by: list[str] = field(default_factory=lambda: ["arch"])
    bootstrap: int = 1000  # resamples per bootstrap interval (0: no intervals)
    reference: str = ""  # the group compute multipliers are relative to ("": ar when present, else the first)
    exclude_sweeps: list[str] = field(default_factory=lambda: ["lr_scan"])
    figures: bool = True
    seed: int = 0  # of the bootstrap resamples

    def __post_init__(self) -> None:
        if not str(self.root).strip():
            raise ConfigError("root must name the directory that holds results.sqlite, e.g. root=runs")
        self.group_by = list(self.group_by)
        if not self.group_by or not all(isinstance(k, str) and k.strip() for k in self.group_by):
            raise ConfigError(f"group_by={self.group_by} must be a non-empty list of keys, e.g. group_by=[arch] "
                              "or group_by=[arch,arch.pattern]")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ConfigError(f"bootstrap={self.bootstrap!r} must be an integer >= 0 (resamples; e.g. bootstrap=1000)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer, e.g. seed=0")
        if not isinstance(self.reference, str):
            raise ConfigError(f"reference={self.reference!r} must be a group name (e.g. reference=ar) or empty")
        self.exclude_sweeps = list(self.exclude_sweeps or [])
        if not all(isinstance(s, str) for s in self.exclude_sweeps):
            raise ConfigError(f"exclude_sweeps={self.exclude_sweeps} must be a list of sweep names, e.g. [lr_scan]")
        if not isinstance(self.figures, bool):
            raise ConfigError(f"figures={self.figures!r} must be true or false")



def _sampling_checks(node: str, *, confidence: str, n: int, temperature: float, length: int) -> None:
    if confidence not in CONFIDENCES:
        raise ConfigError(f"{node}confidence={confidence!r}; use one of {', '.join(CONFIDENCES)}")
    if n < 1 or temperature < 0 or length < 0:
        raise ConfigError(f"need {node}n >= 1, {node}temperature >= 0 and {node}length >= 0; got n={n}, "
                          f"temperature={temperature}, length={length}")


@dataclass
class SampleConfig:
    """`python -m sweeps.sample`: samples from a trained checkpoint of either family."""

    root: str = "runs"
    run: str = ""  # run id or a unique prefix of one; empty: the newest done run in root
    steps: int = 0  # diffusion denoising steps; 0: one per generated token
    n: int = 4  # samples (one batch)
    length: int = 0  # tokens per sample, EOD and prompt included; 0: the run's train.seq_len
    sampler: str = "ancestral"  # diffusion: ancestral | remask | semiar
    block_len: int = 32  # semiar: tokens per semi-autoregressive block
    confidence: str = "prob"  # remask / semiar: prob (LLaDA) | top | margin | random
    temperature: float = 1.0
    cache: bool = True  # ancestral: reuse the denoiser output while nothing changed
    prompt: str = ""
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        _sampling_checks("", confidence=self.confidence, n=self.n, temperature=self.temperature, length=self.length)
        _at_least("", self, steps=0, block_len=0, seed=0)


@dataclass
class TradeoffConfig:
    """`python -m sweeps.sample_tradeoff`: sample quality against denoising steps, next to AR."""

    root: str = "runs"
    diffusion: str = ""  # diffusion run id (or unique prefix); empty: the most-trained done one
    ar: str = ""  # AR run to sample; empty: the AR-objective run with training FLOPs closest to the diffusion run's
    judge: str = ""  # AR run that scores all samples; empty: the AR-objective run with the lowest eval_bpb
    steps: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64, 128, 256])
    samplers: list[str] = field(default_factory=lambda: ["ancestral", "remask"])
    confidence: str = "prob"  # remask's ranking (LLaDA: prob)
    n: int = 8  # samples per setting (one batch)
    length: int = 0  # tokens per sample, leading EOD included; 0: the diffusion run's train.seq_len
    temperature: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        bad = [x for x in self.samplers if x not in SAMPLERS]
        if bad or not self.samplers or not self.steps or min(self.steps) < 1:
            raise ConfigError(f"samplers must be a non-empty subset of {list(SAMPLERS)} and steps positive integers; "
                              f"got samplers={self.samplers} steps={self.steps}")
        _sampling_checks("", confidence=self.confidence, n=self.n, temperature=self.temperature, length=self.length)


@dataclass
class KernelBenchConfig:
    """`python -m sweeps.bench_kernels`: chunked GDN / SSD kernels against their step references."""

    batch: int = 1
    T: int = 2048  # length of the chunked-vs-reference comparison
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])  # per-token cost
    chunk: int = 64
    repeats: int = 3  # timed calls per measurement
    heads: int = 4  # GDN heads
    dk: int = 64  # GDN key dim
    dv: int = 64  # GDN value dim
    ssd_heads: int = 4
    headdim: int = 64  # SSD head dim P
    dstate: int = 64  # SSD state dim N
    groups: int = 1  # SSD B/C groups
    skip_reference: bool = False

    def __post_init__(self):
        _at_least("", self, batch=1, T=1, chunk=1, repeats=1, heads=1, dk=1, dv=1, ssd_heads=1, headdim=1,
                  dstate=1, groups=1)
        if not self.lengths or min(self.lengths) < 1:
            raise ConfigError(f"lengths={self.lengths} must be a non-empty list of positive lengths")


@dataclass
class LayerBenchConfig:
    """`python -m sweeps.bench_layers`: per-token training cost of one mixer layer by kind."""

    d_model: int = 256
    heads: int = 4  # heads of attention and GDN (head dim = d_model / heads)
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    kinds: list[str] = field(default_factory=lambda: ["G", "M", "A"])  # G (GDN), M (Mamba-2), A (attention)
    chunk: int = 64
    mamba_head_dim: int = 64
    mamba_d_state: int = 128
    repeats: int = 3
    budget_s: float = 6.0  # stop repeating a length after this long
    doc_mask: bool = True  # segment ids (document masking) on, one document

    def __post_init__(self):
        _at_least("", self, d_model=1, heads=1, chunk=1, mamba_head_dim=1, mamba_d_state=1, repeats=1)
        if not self.lengths or min(self.lengths) < 1:
            raise ConfigError(f"lengths={self.lengths} must be a non-empty list of positive lengths")
        bad = [k for k in self.kinds if k not in ("G", "M", "A")]
        if bad or not self.kinds:
            raise ConfigError(f"kinds={self.kinds}: use a non-empty list of G, M and A")


@dataclass
class TokenizerConfig:
    name: TokenizerName = TokenizerName.byte
    vocab_size: int = 0  # bpe: ids of the trained vocabulary, the three special tokens included (conf: 8192)
    path: str = ""  # bpe: load this tokenizer.json (byte-level BPE) instead of training one
    train_bytes: int = 16_000_000  # bpe: text sampled deterministically from the training split to train on
    min_frequency: int = 2  # bpe: pairs seen fewer times are never merged

    def __post_init__(self):
        if self.name == TokenizerName.byte:
            if self.vocab_size or self.path:
                raise ConfigError("tokenizer.vocab_size and tokenizer.path apply to tokenizer=bpe; the byte "
                                  "tokenizer's vocabulary is fixed (256 bytes + EOD, MASK, PAD)")
            return
        if not self.path and not 256 + N_SPECIAL < self.vocab_size <= 2**32:
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size}: a byte-level BPE needs more than "
                              f"{256 + N_SPECIAL} ids (256 bytes + the special tokens + merges), e.g. 8192")
        _at_least("tokenizer", self, train_bytes=1, min_frequency=1)


@dataclass
class PrepareConfig:
    """`python -m sweeps.prepare`: tokenise text once into shards that `data=tokens` trains from."""

    input: Any = field(default_factory=list)  # PATH or [PATH, ...]: files and directories
    out: str = ""  # the directory to write (new, empty, or an unfinished prepare to finish)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_field: str = "text"  # .jsonl / .jsonl.gz / .jsonl.zst: the field holding a document's text
    column: str = "text"  # .parquet: the column holding a document's text
    heldout_fraction: float = 0.02  # share of documents (by a hash of their name) held out
    shard_tokens: int = 2**27  # tokens per shard file (256 MiB at uint16)
    workers: int = 0  # bpe encoding processes; 0: one per available core
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input] if self.input else []
        if not isinstance(self.input, (list, tuple)) or not all(isinstance(p, str) for p in self.input):
            raise ConfigError(f"input={self.input!r}: give a path or a list of paths (input=PATH or input=[A,B])")
        self.input = list(self.input)
        _fraction("", "heldout_fraction", self.heldout_fraction, open_low=True, open_high=True)
        _at_least("", self, shard_tokens=1, workers=0)
        if not self.text_field or not self.column:
            raise ConfigError("text_field and column must name a field / column (default: text)")


@dataclass
class BenchDataConfig:
    """`python -m sweeps.bench_data`: prepare throughput, and start-up and memory of runs from shards."""

    dir: str = ""  # working directory for the generated corpora and shards; empty: a new one under /tmp
    keep: bool = False  # keep the working directory (default: deleted at the end)
    mb: int = 500  # the large generated corpus, in MB of text
    small_mb: int = 20  # the small one
    vocab_size: int = 8192  # the BPE vocabulary trained on the large corpus
    train_bytes: int = 16_000_000  # BPE training sample
    workers: int = 0  # prepare's encoding processes; 0: one per available core
    steps: int = 50  # steps of the training runs whose start-up and peak memory are measured
    arch: str = "ar"
    size: str = "xxs"
    compare_text: bool = True  # also measure data=text on the same corpora (reads them into memory)
    seed: int = 0

    def __post_init__(self):
        _at_least("", self, mb=1, small_mb=1, vocab_size=256 + N_SPECIAL + 1, train_bytes=1, workers=0, steps=1)
        if self.arch not in arch_names():
            raise ConfigError(f"arch={self.arch!r}; use one of {', '.join(arch_names())}")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lab_schema", node=Config)
    cs.store(name="bench_schema", node=BenchConfig)
    cs.store(group="arch", name="schema", node=ModelConfig)
    cs.store(name="report_schema", node=ReportConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="tradeoff_schema", node=TradeoffConfig)
    cs.store(name="kernel_bench_schema", node=KernelBenchConfig)
    cs.store(name="layer_bench_schema", node=LayerBenchConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="bench_data_schema", node=BenchDataConfig)
    cs.store(group="tokenizer", name="schema", node=TokenizerConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="sweep", name="schema", node=SweepConfig)
    cs.store(group="mesh", name="schema", node=MeshConfig)


def error_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line composition errors as one line naming the key."""
    if str(e).startswith("Error merging override") and e.__cause__ is not None:
        e = e.__cause__  # the override that failed is in the cause's full_key
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    append = next((ln for ln in lines if ln.startswith("To append to your config use")), None)
    if text.startswith("Could not override") and append:
        # Our own key check passed, so this is a free-form dict (sweep.grid): keys are added with ++.
        return f"{text} {append.split(' use ', 1)[1].replace('+', '++', 1)} sets its keys (note the ++)"
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    if "Available options" in str(e):
        opts = []
        for ln in lines[1:]:
            if ln.startswith("Config search path"):
                break
            if not ln.startswith("Available"):
                opts.append(ln)
        text += f"; available: {', '.join(opts)}"
    if "could not be converted to Integer" in text:
        text += "; write a whole number (e.g. 3000000, not 3e6)"
    elif "could not be converted to Float" in text:
        text += "; give a number"
    elif "could not be converted to Boolean" in text:
        text += "; give true or false"
    elif "is not a ListConfig, list or tuple" in text:
        text = f"{text.split(':', 1)[-1].strip()}; write a list, e.g. key=[a,b]"
    return f"{full_key}: {text}" if full_key else text


def to_typed(cfg: DictConfig):
    """The composed config as its dataclass (every node's __post_init__ checks run here)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    if "arch" in cfg.keys() and OmegaConf.is_missing(cfg, "arch"):
        raise ConfigError(f"no architecture chosen: pass +arch=NAME with NAME one of {', '.join(arch_names())}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(error_line(e)) from None
