"""Block-diffusion sampling: block by block, left to right, any inside-block sampler.

Each block of L tokens starts all-[MASK] (after the prompt's tail, clamped, if the prompt ends
inside it) and is denoised by an existing sampler of diffusion.samplers (ancestral or remask)
through a block denoiser, whose conditional is the one training scored: the current block
bidirectionally, given the clean blocks before it. A finished block is committed (it becomes
clean context) and the next begins; generation stops at the requested length or, with
stop_at_eod, once every row has produced an end-of-document token.

Block denoisers (the interface the driver and the inside samplers use):
    denoiser(z_bL, t_b) -> log-probs [B, L, V] (numpy, SUBS applied), attribute mask_id
    denoiser.commit(x_bL)  appends a finished block to the clean context

ModelBlockDenoiser has two modes with the same numbers: kv_cache=True keeps an exact KV cache of
the committed blocks (Model.decode of the finished block writes its keys and values once; each
denoising call attends over the cache plus the block, O(L * context) work), kv_cache=False
recomputes the whole context at every call (Model.forward over a fixed-size buffer under the
BD3-LM block mask, O(context^2)). Both give the same tokens for the same seed.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from archs.context import BlockSpec, Ctx, segment_ids_from_tokens
from archs.errors import ConfigError
from archs.sampling import progress_bar
from archs.tokens import Vocab
from diffusion.objective import subs_log_probs
from diffusion.samplers import ancestral, remask


class ModelBlockDenoiser:
    """A block-diffusion model as a block denoiser for batch rows of up to max_len tokens."""

    time_conditioned = False

    def __init__(self, model, batch: int, max_len: int, *, kv_cache: bool = True):
        cfg = model.cfg
        if cfg.objective != "block_diffusion":
            raise ConfigError(f"block sampling needs a block-diffusion model; this one has "
                              f"arch.objective={cfg.objective}")
        self.block_size = blk = int(cfg.block_size)
        if max_len % blk:
            raise ValueError(f"max_len={max_len} must be a multiple of the block size {blk}")
        vocab = Vocab.of_size(cfg.vocab_size)
        self.mask_id, self.eod_id = vocab.mask, vocab.eod
        self.batch, self.max_len, self.kv_cache = batch, max_len, kv_cache
        self.pos = 0  # tokens committed so far
        graphdef, self.state = nnx.split(model)
        if kv_cache:
            def logp(state, z_bt, cache, pos):
                logits, _ = nnx.merge(graphdef, state).decode(z_bt, cache, pos)  # the cache is not kept
                return subs_log_probs(logits, z_bt)

            def commit(state, x_bt, cache, pos):
                return nnx.merge(graphdef, state).decode(x_bt, cache, pos)[1]

            self._logp = jax.jit(logp)
            self._commit = jax.jit(commit, donate_argnums=(2,))
            self.cache = model.init_cache(batch, max_len)
        else:
            doc_mask = cfg.doc_mask

            def logp(state, buf_bt, pos):
                b, t = buf_bt.shape
                pos_t = jnp.arange(t)
                blk_t = pos_t // blk
                ctx = Ctx(
                    positions=jnp.broadcast_to(pos_t, (b, t)),
                    segment_ids=segment_ids_from_tokens(buf_bt, self.eod_id) if doc_mask else None,
                    # Committed blocks are clean, the current one noisy; later positions (clean, later
                    # blocks) are invisible to both under the block-causal rule.
                    blocks=BlockSpec(block_bt=jnp.broadcast_to(blk_t, (b, t)),
                                     clean_bt=jnp.broadcast_to(blk_t != pos // blk, (b, t))),
                )
                logits = nnx.merge(graphdef, state).forward(buf_bt, ctx)
                z_bt = jax.lax.dynamic_slice_in_dim(buf_bt, pos, blk, axis=1)
                return subs_log_probs(jax.lax.dynamic_slice_in_dim(logits, pos, blk, axis=1), z_bt)

            self._logp_full = jax.jit(logp)
            self.buf = np.full((batch, max_len), vocab.pad, np.int32)

    def __call__(self, z_bL, t_b):
        del t_b  # block diffusion models are not time-conditioned
        z = np.asarray(z_bL, np.int32)
        if z.shape != (self.batch, self.block_size):
            raise ValueError(f"block canvas of shape {z.shape}; expected {(self.batch, self.block_size)}")
        if self.pos + self.block_size > self.max_len:
            raise ValueError(f"no room for another block: {self.pos} of {self.max_len} tokens committed")
        if self.kv_cache:
            out = self._logp(self.state, jnp.asarray(z), self.cache, jnp.int32(self.pos))
        else:
            buf = self.buf.copy()
            buf[:, self.pos:self.pos + self.block_size] = z
            out = self._logp_full(self.state, jnp.asarray(buf), jnp.int32(self.pos))
        return np.asarray(out)

    def commit(self, x_bL):
        x = np.asarray(x_bL, np.int32)
        if self.kv_cache:
            self.cache = self._commit(self.state, jnp.asarray(x), self.cache, jnp.int32(self.pos))
        else:
            self.buf[:, self.pos:self.pos + self.block_size] = x
        self.pos += self.block_size


INSIDE_SAMPLERS = ("ancestral", "remask")


def generate_blocks(denoiser, batch: int, length: int, steps: int, *, sampler: str = "ancestral", schedule=None,
                    seed: int = 0, prefix=None, temperature: float = 1.0, confidence: str = "prob",
                    stop_at_eod: bool = True, progress: bool = False):
    """Tokens [B, length] generated block by block, and stats.

    `steps` denoising steps per block with the inside sampler (ancestral needs `schedule`; its
    reuse of the denoiser output while nothing changed stays on); block j draws from the seed
    [seed, j], so runs are reproducible block by block. `prefix` (e.g. [EOD]) is clamped; its
    whole blocks are committed first. With stop_at_eod a row ends at the first EOD it generates
    (later positions are PAD) and generation stops once every row has ended.
    Stats: lengths [B] (tokens per row, prompt and final EOD included), blocks (denoised), nfe
    (denoiser calls), wall_s, tokens_per_s (generated tokens, all rows, per second).
    """
    if sampler not in INSIDE_SAMPLERS:
        raise ValueError(f"unknown inside-block sampler {sampler!r}; use one of {', '.join(INSIDE_SAMPLERS)}")
    if sampler == "ancestral" and schedule is None:
        raise ValueError("the ancestral sampler needs a schedule (diffusion.schedules.get_schedule)")
    blk = denoiser.block_size
    prefix = np.zeros((0,), np.int32) if prefix is None else np.asarray(prefix, np.int32).reshape(-1)
    p = len(prefix)
    if p >= length:
        raise ValueError(f"prefix of {p} tokens leaves nothing to generate in {length}")
    n_blocks = -(-length // blk)
    vocab = Vocab(denoiser.mask_id - 1)  # the specials follow the text ids: MASK = n_text + 1 (archs.tokens)
    vocab_pad, eod = vocab.pad, vocab.eod
    out = np.full((batch, n_blocks * blk), vocab_pad, np.int32)
    out[:, :p] = prefix
    ended = np.zeros(batch, bool)
    stop = np.full(batch, length)
    t0 = time.perf_counter()
    for j in range(p // blk):
        denoiser.commit(out[:, j * blk:(j + 1) * blk])
    nfe = done_blocks = 0
    with progress_bar(n_blocks - p // blk, "blocks", progress) as bar:
        for j in range(p // blk, n_blocks):
            lo = j * blk
            clamp = prefix[lo:] if p > lo else None
            kw = dict(seed=[seed, j], prefix=clamp, temperature=temperature)
            if sampler == "ancestral":
                z, st = ancestral(denoiser, batch, blk, steps, schedule=schedule, cache=True, **kw)
            else:
                z, st = remask(denoiser, batch, blk, steps, confidence=confidence, **kw)
            out[:, lo:lo + blk] = z
            nfe += st["nfe"]
            done_blocks += 1
            bar.update(1)
            if stop_at_eod:
                gen = max(p, lo)  # first generated position of this block
                for r in np.flatnonzero(~ended):
                    hits = np.flatnonzero(out[r, gen:lo + blk] == eod)
                    if len(hits):
                        ended[r], stop[r] = True, min(length, gen + hits[0] + 1)
                if ended.all():
                    break
            if j + 1 < n_blocks:
                denoiser.commit(z)
    wall = time.perf_counter() - t0
    out = out[:, :length]
    for r in range(batch):
        out[r, stop[r]:] = vocab_pad
    filled = min(length, (p // blk + done_blocks) * blk)
    generated = int((np.minimum(stop, filled) - p).sum())
    return out, {"lengths": stop, "blocks": done_blocks, "nfe": nfe, "wall_s": wall,
                 "tokens_per_s": generated / max(wall, 1e-9)}


def block_sample(model, batch: int, length: int, steps: int, *, kv_cache: bool = True, **kw):
    """generate_blocks with the model's block denoiser (KV cache over finished blocks or not)."""
    blk = int(model.cfg.block_size)
    den = ModelBlockDenoiser(model, batch, -(-length // blk) * blk, kv_cache=kv_cache)
    return generate_blocks(den, batch, length, steps, **kw)
