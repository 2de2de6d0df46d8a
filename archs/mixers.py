"""Token mixers by layer-pattern letter: how to build one and what it costs.

The model builder (archs.model) and the FLOP count (archs.flops) look a mixer up here by its
letter in the layer pattern. Attention (A, S) and latent attention (L) are registered below. Linear-recurrent mixers live
with their kernels and register themselves when their package is imported (`import ssm` adds G
and M), so archs/ depends on nothing else of the lab's.

A mixer is an nnx.Module with

    y = mixer(x_btd, ctx)                   # whole window (training, scoring)
    y, cache = mixer(x_btd, ctx, cache)     # incremental decoding (prefill or one token)
    cache = mixer.init_cache(batch, max_len, dtype)

and its kind states what it costs: forward FLOPs, and the bytes of decode state one sequence
holds after seq_len tokens (attention: the KV cache, growing with the context; recurrent
mixers: their fixed state and conv windows), which the recall probe plots accuracy against.
A kind that honours ctx.blocks (block diffusion's block-causal mask) says so (block_mask);
block diffusion refuses every other kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flax import nnx

from archs.attention import Attention, attention_flops, attention_state_bytes
from archs.config import LAYER_KINDS, ModelConfig
from archs.errors import ConfigError
from archs.mla import MLA, mla_flops, mla_state_bytes
from archs.sizes import layer_kinds, resolve


@dataclass(frozen=True)
class MixerKind:
    letter: str
    build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
    # forward FLOPs of one mixer for one sequence; `executed` counts what a dense kernel computes
    flops: Callable[[ModelConfig, int, bool], float]
    # bytes of decode state per sequence after seq_len tokens of context (cfg resolved)
    state_bytes: Callable[[ModelConfig, int], float] | None = None
    block_mask: bool = False  # applies ctx.blocks (archs.context.BlockSpec): can run block diffusion


_KINDS: dict[str, MixerKind] = {}
# Packages that register the letters archs/ does not implement itself.
PROVIDERS = {"G": "ssm", "M": "ssm"}


def register(kind: MixerKind) -> None:
    if kind.letter not in LAYER_KINDS:
        raise ValueError(f"layer letter {kind.letter!r} is not in archs.config.LAYER_KINDS")
    _KINDS[kind.letter] = kind


def mixer_kind(letter: str) -> MixerKind:
    if letter not in _KINDS:
        provider = PROVIDERS.get(letter)
        if provider is None:
            raise ConfigError(f"unknown layer kind {letter!r}; use one of {', '.join(LAYER_KINDS)}")
        raise ConfigError(f"layer kind {letter!r} ({LAYER_KINDS[letter]}) is provided by the {provider} package, "
                          f"which is not imported; import {provider} before building the model")
    return _KINDS[letter]


def model_state_bytes(cfg: ModelConfig, seq_len: int) -> float:
    """Bytes of decode state per sequence after seq_len tokens, summed over the stack's mixers
    (the state a model can recall from: KV caches grow with seq_len, recurrent states do not)."""
    cfg = resolve(cfg)
    total = 0.0
    for letter in layer_kinds(cfg):
        kind = mixer_kind(letter)
        if kind.state_bytes is None:
            raise ConfigError(f"layer kind {letter!r} ({LAYER_KINDS[letter]}) does not state its decode-state size; "
                              "give its archs.mixers.MixerKind a state_bytes function")
        total += kind.state_bytes(cfg, seq_len)
    return total


def check_block_mask_support(cfg: ModelConfig) -> None:
    """Block diffusion runs [noisy; clean] copies under a block-causal mask: only mixers that
    apply ctx.blocks (attention) can; recurrences would scan across the two copies."""
    if cfg.objective != "block_diffusion":
        return
    bad = sorted({k for k in cfg.pattern if not (k in _KINDS and _KINDS[k].block_mask)})
    if bad:
        names = ", ".join(f"{k} ({LAYER_KINDS.get(k, 'unknown')})" for k in bad)
        raise ConfigError(f"block diffusion trains [noisy; clean] copies under a block-causal attention mask, which "
                          f"{names} layers cannot run; use an attention-only arch.pattern (A, S)")


register(MixerKind("A", lambda cfg, rngs: Attention(cfg, rngs=rngs),
                   lambda cfg, t, executed: attention_flops(cfg, t, window=0, executed=executed),
                   lambda cfg, t: attention_state_bytes(cfg, t, window=0), block_mask=True))
register(MixerKind("S", lambda cfg, rngs: Attention(cfg, window=cfg.window, rngs=rngs),
                   lambda cfg, t, executed: attention_flops(cfg, t, window=cfg.window, executed=executed),
                   lambda cfg, t: attention_state_bytes(cfg, t, window=cfg.window), block_mask=True))
register(MixerKind("L", lambda cfg, rngs: MLA(cfg, rngs=rngs),
                   lambda cfg, t, executed: mla_flops(cfg, t, executed=executed),
                   lambda cfg, t: mla_state_bytes(cfg, t)))
