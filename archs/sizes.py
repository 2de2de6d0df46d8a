"""The size rule: one knob (a name or a target non-embedding parameter count) -> width, depth, heads.

Every arch goes through the same rule so families are compared at matched shapes. The rule
keeps depth proportional to width (d_model / n_layers = ASPECT, as in small-scale scaling
studies) and sizes a block as 12 d^2 parameters (attention 4 d^2 + SwiGLU MLP 8 d^2); the exact
count of each arch is then measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import math
import re

from archs.attention_ops import check_attention_impl
from archs.config import LAYER_KINDS, MLP_KINDS, ModelConfig
from archs.errors import ConfigError

ASPECT = 32  # d_model / n_layers
WIDTH_MULTIPLE = 64
MIN_WIDTH = 32  # widths below 64 (one 32-dim head) exist for CPU-sized sweeps; their bracket is 32

# name -> (d_model, n_layers, n_heads); heads of 32 dims below 256 wide, 64 above.
SIZES = {
    "xxs": (64, 2, 2),
    "xs": (128, 4, 4),
    "s": (192, 6, 6),
    "m": (256, 8, 4),
    "l": (384, 12, 6),
    "xl": (512, 16, 8),
    "bench20m": (512, 6, 8),
}


def _parse_count(size: str) -> float | None:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([kKmMbB]?)\s*", size)
    if not m:
        return None
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return float(m.group(1)) * mult


def shape_for_size(size: str) -> tuple[int, int, int]:
    """(d_model, n_layers, n_heads) for a size name or a target non-embedding count."""
    if size in SIZES:
        return SIZES[size]
    target = _parse_count(str(size))
    if target is None or target <= 0:
        raise ConfigError(
            f"arch.size={size!r} is neither a size name ({', '.join(SIZES)}) nor a parameter count "
            "like '3M' or '2.5e6'; set arch.size to one of those"
        )
    # 12 d^2 * (d / ASPECT) = target  ->  d = (target * ASPECT / 12)^(1/3)
    d = (target * ASPECT / 12) ** (1 / 3)
    step = WIDTH_MULTIPLE if d >= WIDTH_MULTIPLE else MIN_WIDTH
    d = max(MIN_WIDTH, int(round(d / step)) * step)
    n_layers = max(1, int(round(target / (12 * d * d))))
    head_dim = 32 if d < 256 else 64
    return d, n_layers, d // head_dim


def resolve(cfg: ModelConfig) -> ModelConfig:
    """A copy of cfg with every derived dimension filled in and checked."""
    d, n_layers, n_heads = shape_for_size(cfg.size)
    d = cfg.d_model or d
    n_layers = cfg.n_layers or n_layers
    n_heads = cfg.n_heads or n_heads
    if d % n_heads:
        raise ConfigError(
            f"arch.n_heads={n_heads} does not divide arch.d_model={d}; choose heads that divide the width"
        )
    head_dim = cfg.head_dim or d // n_heads
    n_kv = cfg.n_kv_heads or max(1, n_heads // max(1, cfg.gqa_ratio))
    if n_heads % n_kv:
        raise ConfigError(
            f"arch.n_kv_heads={n_kv} does not divide arch.n_heads={n_heads}; grouped-query attention "
            "needs n_heads to be a multiple of n_kv_heads"
        )
    bad = sorted(set(cfg.pattern) - set(LAYER_KINDS))
    if not cfg.pattern or bad:
        raise ConfigError(
            f"arch.pattern={cfg.pattern!r} has unknown layer kinds {bad}; use characters from "
            + ", ".join(f"{k} ({v})" for k, v in LAYER_KINDS.items())
        )
    if cfg.objective not in ("ar", "diffusion", "block_diffusion"):
        raise ConfigError(f"arch.objective={cfg.objective!r}; use 'ar', 'diffusion' or 'block_diffusion'")
    if cfg.objective in ("diffusion", "block_diffusion") and cfg.causal:
        raise ConfigError("a diffusion denoiser must see both sides: set arch.causal=false")
    if cfg.objective == "block_diffusion" and cfg.block_size < 1:
        raise ConfigError(f"arch.block_size={cfg.block_size}: block diffusion needs a block size >= 1 that divides "
                          "train.seq_len (e.g. arch.block_size=16)")
    if cfg.objective == "ar" and not cfg.causal:
        raise ConfigError("an autoregressive model must be causal: set arch.causal=true")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"arch.dtype={cfg.dtype!r}; use auto (bfloat16 on GPU / TPU, float32 on CPU), float32 or "
                          "bfloat16")
    mamba_head_dim = cfg.mamba_head_dim or head_dim
    if "M" in cfg.pattern and (cfg.mamba_expand * d) % mamba_head_dim:
        raise ConfigError(
            f"Mamba-2 inner width {cfg.mamba_expand * d} is not a multiple of arch.mamba_head_dim={mamba_head_dim}"
        )
    cfg = dataclasses.replace(
        cfg,
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        gdn_head_dim=cfg.gdn_head_dim or head_dim,
        mamba_head_dim=mamba_head_dim,
    )
    cfg = dataclasses.replace(cfg, moe=_resolve_moe(cfg), mla=_resolve_mla(cfg))
    check_attention_impl(cfg)
    return cfg


def _resolve_moe(cfg: ModelConfig):
    m = cfg.moe
    if cfg.mlp not in MLP_KINDS:
        raise ConfigError(f"arch.mlp={cfg.mlp!r}; use one of {', '.join(MLP_KINDS)}")
    if cfg.mlp != "moe":
        return m
    if m.experts < 1 or not 1 <= m.top_k <= m.experts:
        raise ConfigError(
            f"arch.moe.top_k={m.top_k} with arch.moe.experts={m.experts}: need 1 <= top_k <= experts"
        )
    if m.shared_experts < 0 or m.expert_width < 0:
        raise ConfigError("arch.moe.shared_experts and arch.moe.expert_width must be >= 0 (expert_width 0: the rule)")
    if m.router not in ("sigmoid", "softmax"):
        raise ConfigError(f"arch.moe.router={m.router!r}; use sigmoid (DeepSeek-V3) or softmax")
    if m.balance not in ("aux", "bias"):
        raise ConfigError(f"arch.moe.balance={m.balance!r}; use aux (balance loss) or bias (loss-free bias)")
    if m.capacity_factor < 0 or m.aux_weight < 0 or m.bias_step < 0:
        raise ConfigError("arch.moe.capacity_factor, aux_weight and bias_step must be >= 0 (capacity 0: dropless)")
    if m.expert_width:
        return m
    width = math.ceil(mlp_hidden(cfg) / (m.top_k + m.shared_experts) / cfg.mlp_multiple) * cfg.mlp_multiple
    return dataclasses.replace(m, expert_width=width)


def _resolve_mla(cfg: ModelConfig):
    m = cfg.mla
    if "L" not in cfg.pattern:
        return m
    kv_rank = m.kv_rank or 4 * cfg.head_dim
    rope_dim = m.rope_dim or cfg.head_dim // 2
    if kv_rank < 1 or m.q_rank < 0 or rope_dim % 2:
        raise ConfigError(
            f"arch.mla.kv_rank={kv_rank}, q_rank={m.q_rank}, rope_dim={rope_dim}: ranks must be positive "
            "(q_rank 0: no query compression) and rope_dim even (RoPE rotates pairs)"
        )
    return dataclasses.replace(m, kv_rank=kv_rank, rope_dim=rope_dim)


def check_block_size(cfg: ModelConfig, seq_len: int) -> None:
    """Block diffusion splits every window of seq_len scored tokens into whole blocks."""
    if cfg.objective == "block_diffusion" and (cfg.block_size < 1 or seq_len % cfg.block_size):
        raise ConfigError(f"arch.block_size={cfg.block_size} does not divide train.seq_len={seq_len}; "
                          "choose a block size that divides the window (e.g. 4 or 16)")


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """The pattern tiled over the depth: 'GGGA' with 8 layers -> GGGAGGGA."""
    reps = math.ceil(cfg.n_layers / len(cfg.pattern))
    return list((cfg.pattern * reps)[: cfg.n_layers])


def pattern_shortfall(cfg: ModelConfig) -> str | None:
    """Why the tiled stack is not the model the pattern describes, or None when it is.

    A stack shallower than the pattern keeps only its prefix: 'GGGA' over the 1-2 layers of the
    CPU sweep sizes is a pure Gated DeltaNet stack, which a hybrid-vs-pure comparison must know."""
    kinds = layer_kinds(cfg)
    missing = [k for k in dict.fromkeys(cfg.pattern) if k not in kinds]
    if not missing:
        return None
    needed = max(cfg.pattern.index(k) for k in missing) + 1
    return (
        f"arch.pattern={cfg.pattern} over {cfg.n_layers} layer(s) gives the stack {''.join(kinds)}: it has no "
        f"{'/'.join(missing)} layer, so this '{cfg.name}' model is not the pattern's mix; use at least "
        f"{needed} layers (a larger arch.size or arch.n_layers={needed}) or a shorter pattern"
    )


def mlp_hidden(cfg: ModelConfig) -> int:
    """Hidden width of the dense SwiGLU MLP."""
    h = int(math.ceil(cfg.mlp_ratio * cfg.d_model / cfg.mlp_multiple)) * cfg.mlp_multiple
    return h
