"""Per-forward context shared by every mixer in a stack (positions, document segments, blocks)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class BlockSpec:
    """Block-diffusion structure of a sequence (BD3-LM, Arriola et al. 2025).

    Every token has a block index and is either a noisy token (being denoised) or a clean one
    (context). Attention follows the block-causal rule of BD3-LM's vectorised training pass:

        noisy query of block b  sees  noisy keys of block b  and  clean keys of blocks < b
        clean query of block b  sees  clean keys of blocks <= b

    so every block is denoised bidirectionally given the clean blocks before it, and the clean
    copy is itself a block-causal model of the clean sequence (the KV cache of sampling).
    """

    block_bt: jax.Array  # [B, T] int: block index of every token
    clean_bt: jax.Array  # [B, T] bool: the token belongs to the clean copy

    def mask(self):
        """Boolean [B, Tq, Tk]: may query t attend to key s (the rule above)."""
        return block_mask(self.block_bt, self.clean_bt, self.block_bt, self.clean_bt)


def block_mask(q_block_bt, q_clean_bt, k_block_bs, k_clean_bs):
    """The BD3-LM block-causal rule of BlockSpec as a boolean [B, T, S] mask."""
    qb, kb = q_block_bt[:, :, None], k_block_bs[:, None, :]
    qc, kc = q_clean_bt[:, :, None], k_clean_bs[:, None, :]
    return jnp.where(qc, kc & (kb <= qb), jnp.where(kc, kb < qb, kb == qb))


@dataclass(frozen=True)
class Ctx:
    positions: jax.Array  # [B, T] absolute positions of the tokens being processed
    segment_ids: jax.Array | None  # [B, T] document index inside a packed window; None: no doc mask
    blocks: BlockSpec | None = None  # block-diffusion structure; None: plain (causal or bidirectional) mixing


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
