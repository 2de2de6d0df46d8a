"""Per-forward context shared by every mixer in a stack (positions, document segments)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Ctx:
    positions: jax.Array  # [B, T] absolute positions of the tokens being processed
    segment_ids: jax.Array | None  # [B, T] document index inside a packed window; None: no doc mask


def segment_ids_from_tokens(tokens_bt, eod_id: int, offset_b=None):
    """Document index of every position: an end-of-document token opens the next document.

    The EOD token then plays the BOS role for the document that follows it, so a model with
    document masking sees exactly one document at every position. `offset_b` continues the
    count across decoding calls.
    """
    seg = jnp.cumsum((tokens_bt == eod_id).astype(jnp.int32), axis=1)
    if offset_b is not None:
        seg = seg + offset_b[:, None]
    return seg
