"""The one model builder: embedding -> blocks from a layer pattern -> final norm -> head.

Every arch (AR transformer, diffusion denoiser, Gated DeltaNet / Mamba-2 stacks and hybrids)
is this class with a different pattern and objective; only the mixer inside a block changes
(and, with arch.mlp=moe, its MLP: archs.moe).

Rematerialisation (`remat`, a way to run the forward pass rather than part of the model: it is a
constructor argument, not a config field, and changes no number) wraps every block in nnx.remat
with a jax.checkpoint policy. nnx.remat carries the blocks' sown intermediates (the MoE router
statistics collected by nnx.capture) out of the checkpointed function; a raw jax.checkpoint
around nnx.split / merge would drop them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from archs.config import ModelConfig, Remat
from archs.context import BlockSpec, Ctx, segment_ids_from_tokens
from archs.layers import RMSNorm, SwiGLU, compute_dtype, linear, partitioned
from archs.mixers import mixer_kind
from archs.moe import MoE
from archs.sizes import layer_kinds, resolve
from archs.tokens import Vocab


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.kind = kind
        self.norm1 = RMSNorm(cfg.d_model)
        self.mixer = mixer_kind(kind).build(cfg, rngs)
        self.norm2 = RMSNorm(cfg.d_model)
        self.mlp = MoE(cfg, rngs=rngs) if cfg.mlp == "moe" else SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_btd, ctx: Ctx, cache=None):
        if cache is None:
            x_btd = x_btd + self.mixer(self.norm1(x_btd), ctx)
            return x_btd + self.mlp(self.norm2(x_btd))
        h, cache = self.mixer(self.norm1(x_btd), ctx, cache)
        x_btd = x_btd + h
        return x_btd + self.mlp(self.norm2(x_btd)), cache


# What each policy keeps for the backward pass. dots keeps the outputs of matmuls without batch
# dimensions: the projections (archs.layers.Linear multiplies a flattened [tokens, d] view), not
# the attention scores or anything element-wise.
REMAT_POLICIES = {
    Remat.block: jax.checkpoint_policies.nothing_saveable,
    Remat.dots: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_forward(block: Block, x_btd, positions_bt, segment_ids_bt, blocks: tuple | None):
    """One block on arrays only (what nnx.remat traces): the context is rebuilt inside."""
    spec = None if blocks is None else BlockSpec(*blocks)
    return block(x_btd, Ctx(positions=positions_bt, segment_ids=segment_ids_bt, blocks=spec))


def timestep_embedding(t_b, dim: int):
    """Sinusoidal features of a diffusion time t in [0, 1]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t_b[:, None].astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: Remat | str = Remat.none):
        cfg = resolve(cfg)
        self.cfg = cfg
        self.remat = Remat(remat)
        self.eod_id = Vocab.of_size(cfg.vocab_size).eod
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=compute_dtype(cfg),
            embedding_init=partitioned(nnx.initializers.normal(cfg.init_std), ("vocab", "embed")),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in layer_kinds(cfg)])
        self.norm = RMSNorm(cfg.d_model)
        if not cfg.tie_embeddings:
            self.head = linear(cfg, cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs)
        if cfg.diffusion.time_conditioning:
            self.time_mlp = linear(cfg, cfg.d_model, cfg.d_model, ("embed", "embed2"), rngs=rngs)

    def _embed(self, tokens_bt, t_b):
        x = self.embed(tokens_bt)
        if t_b is not None and self.cfg.diffusion.time_conditioning:
            temb = jax.nn.silu(self.time_mlp(timestep_embedding(t_b, self.cfg.d_model).astype(x.dtype)))
            x = x + temb[:, None, :]
        return x

    def _logits(self, x_btd):
        x = self.norm(x_btd)
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.head(x)
        return logits.astype(jnp.float32)

    def __call__(self, tokens_bt, *, t_b=None):
        """Logits [B, T, vocab] in fp32 for a whole window (training and scoring)."""
        b, t = tokens_bt.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        seg = segment_ids_from_tokens(tokens_bt, self.eod_id) if self.cfg.doc_mask else None
        return self.forward(tokens_bt, Ctx(positions=positions, segment_ids=seg), t_b=t_b)

    def forward(self, tokens_bt, ctx: Ctx, *, t_b=None, n_logits: int | None = None):
        """Logits [B, n_logits, vocab] (fp32) of the first n_logits tokens (all when None) under an
        explicit context: positions, segments and e.g. block diffusion's block structure."""
        x = self._embed(tokens_bt, t_b)
        if self.remat == Remat.none:
            for block in self.blocks:
                x = block(x, ctx)
        else:
            forward = nnx.remat(_block_forward, policy=REMAT_POLICIES[self.remat])
            blocks = None if ctx.blocks is None else (ctx.blocks.block_bt, ctx.blocks.clean_bt)
            for block in self.blocks:
                x = forward(block, x, ctx.positions, ctx.segment_ids, blocks)
        return self._logits(x if n_logits is None else x[:, :n_logits])

    # -- incremental decoding (AR and recurrent arches) --------------------------------------
    def init_cache(self, batch: int, max_len: int):
        dtype = compute_dtype(self.cfg)
        return {
            "layers": [blk.mixer.init_cache(batch, max_len, dtype) for blk in self.blocks],
            "eod": jnp.zeros((batch,), jnp.int32),  # documents opened so far, for the doc mask
        }

    def decode(self, tokens_bt, cache, pos):
        """Process tokens at positions pos..pos+T-1 given the cache of everything before.

        Prefill (T > 1) and single-token steps share this path; logits equal the full forward's.
        """
        b, t = tokens_bt.shape
        positions = pos + jnp.broadcast_to(jnp.arange(t), (b, t))
        seg = segment_ids_from_tokens(tokens_bt, self.eod_id, cache["eod"]) if self.cfg.doc_mask else None
        ctx = Ctx(positions=positions, segment_ids=seg)
        x = self._embed(tokens_bt, None)
        new_layers = []
        for block, layer_cache in zip(self.blocks, cache["layers"]):
            x, layer_cache = block(x, ctx, layer_cache)
            new_layers.append(layer_cache)
        eod = seg[:, -1] if seg is not None else cache["eod"]
        return self._logits(x), {"layers": new_layers, "eod": eod}


def count_params(model: Model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters). Non-embedding excludes the token embedding
    and the output head (Kaplan et al.'s convention), so it measures the stack itself."""
    params = nnx.state(model, nnx.Param)
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    cfg = model.cfg
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return total, total - embed


def count_active_params(model: Model) -> tuple[int, int]:
    """(active parameters, active non-embedding parameters): what one token touches, counted as
    count_params counts (the whole embedding and head included in the first).

    Routed-expert weights (leading logical axis 'experts') count top_k of their experts; the
    router, shared experts and everything dense count in full. Equal to count_params for a
    dense model."""
    cfg = model.cfg
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = math.prod(var.get_value().shape)
        if (getattr(var, "out_sharding", None) or (None,))[0] == "experts":
            size = size // cfg.moe.experts * cfg.moe.top_k
        total += size
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return total, total - embed
