"""Token mixers by layer-pattern letter: how to build one and what it costs.

The model builder (archs.model) and the FLOP count (archs.flops) look a mixer up here by its
letter in the layer pattern. Attention (A, S) and latent attention (L) are registered below. Linear-recurrent mixers live
with their kernels and register themselves when their package is imported (`import ssm` adds G
and M), so archs/ depends on nothing else of the lab's.

A mixer is an nnx.Module with

    y = mixer(x_btd, ctx)                   # whole window (training, scoring)
    y, cache = mixer(x_btd, ctx, cache)     # incremental decoding (prefill or one token)
    cache = mixer.init_cache(batch, max_len, dtype)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flax import nnx

from archs.attention import Attention, attention_flops
from archs.config import LAYER_KINDS, ModelConfig
from archs.errors import ConfigError
from archs.mla import MLA, mla_flops


@dataclass(frozen=True)
class MixerKind:
    letter: str
    build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
    # forward FLOPs of one mixer for one sequence; `executed` counts what a dense kernel computes
    flops: Callable[[ModelConfig, int, bool], float]


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


register(MixerKind("A", lambda cfg, rngs: Attention(cfg, rngs=rngs),
                   lambda cfg, t, executed: attention_flops(cfg, t, window=0, executed=executed)))
register(MixerKind("S", lambda cfg, rngs: Attention(cfg, window=cfg.window, rngs=rngs),
                   lambda cfg, t, executed: attention_flops(cfg, t, window=cfg.window, executed=executed)))
register(MixerKind("L", lambda cfg, rngs: MLA(cfg, rngs=rngs),
                   lambda cfg, t, executed: mla_flops(cfg, t, executed=executed)))
