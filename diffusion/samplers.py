"""Samplers for masked diffusion: ancestral (MDLM / D3PM), low-confidence remasking (LLaDA),
and semi-autoregressive blocks for both.

A sampler drives a `denoiser(z_bt, t_b) -> log-probs [B, T, V]` (numpy, SUBS applied: the
[MASK] column is -inf and unmasked positions are point masses on their input) whose attribute
`mask_id` names its [MASK] token, so the
trained model (ModelDenoiser) and the exact denoisers of the tests plug in alike. Random
draws come from one numpy Generator per call, categorical draws in float64 (archs.sampling).

Generation starts from an all-[MASK] canvas (after an optional clamped prefix) and ends with
no [MASK] left; semi-autoregressive blocks (block_len > 0) fill the canvas left to right,
one block at a time, spending steps / n_blocks steps on each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from archs.sampling import forbid, gumbel_argmax, log_softmax64, progress_bar
from archs.tokens import Vocab
from diffusion.objective import subs_log_probs


class ModelDenoiser:
    """A trained denoiser as a host function: jitted forward + SUBS, log-probs back as numpy."""

    def __init__(self, model):
        graphdef, self.state = nnx.split(model)
        self.mask_id = Vocab.of_size(model.cfg.vocab_size).mask
        self.time_conditioned = bool(model.cfg.diffusion.time_conditioning)

        def logp(state, z_bt, t_b):
            return subs_log_probs(nnx.merge(graphdef, state)(z_bt, t_b=t_b), z_bt)

        self._logp = jax.jit(logp)

    def __call__(self, z_bt, t_b):
        return np.asarray(self._logp(self.state, jnp.asarray(z_bt, jnp.int32), jnp.asarray(t_b, jnp.float32)))


def _canvas(batch: int, length: int, prefix, mask_id: int):
    prefix = np.zeros((0,), np.int32) if prefix is None else np.asarray(prefix, np.int32).reshape(-1)
    if len(prefix) >= length:
        raise ValueError(f"prefix of {len(prefix)} tokens leaves nothing to generate in {length}")
    z = np.full((batch, length), mask_id, np.int32)
    z[:, :len(prefix)] = prefix
    return z, len(prefix)


def _blocks(start: int, length: int, block_len: int, steps: int):
    """[(lo, hi, steps_for_block)]: the generated span in blocks, steps spread evenly (>= 1 each)."""
    block_len = block_len if 0 < block_len < length - start else length - start
    edges = list(range(start, length, block_len)) + [length]
    n = len(edges) - 1
    per = [max(1, steps // n + (i < steps % n)) for i in range(n)]
    return [(edges[i], edges[i + 1], per[i]) for i in range(n)]


def _draw(logp_nv, rng, temperature):
    return gumbel_argmax(forbid(logp_nv), rng, temperature)


def ancestral(denoiser, batch: int, length: int, steps: int, *, schedule, seed: int = 0, prefix=None,
              block_len: int = 0, temperature: float = 1.0, cache: bool = True, progress: bool = False):
    """MDLM ancestral sampling: steps from t = 1 to t = 0 on a uniform grid.

    From t to s < t, each masked token is revealed with probability
    (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from the denoiser's distribution at
    z_t; revealed tokens never change (the last step, s = 0, reveals all that remain). The
    reveal decisions are drawn before the denoiser is needed, so with cache=True the model is
    called only at steps that reveal something and only if the canvas changed since its last
    call (a model that is not time-conditioned gives the same output for the same canvas);
    cache=False calls it at every step. The random stream is the same either way, so both
    give identical samples for the same seed.
    """
    rng = np.random.default_rng(seed)
    mask = denoiser.mask_id
    z, start = _canvas(batch, length, prefix, mask)
    plan = _blocks(start, length, block_len, steps)
    reuse = cache and not getattr(denoiser, "time_conditioned", False)
    logp, current, nfe = None, False, 0  # current: logp was computed from the canvas as it is now
    with progress_bar(sum(n for _, _, n in plan), "ancestral", progress) as bar:
        for lo, hi, n in plan:
            grid = np.linspace(1.0, 0.0, n + 1)
            for t, s in zip(grid[:-1], grid[1:]):
                a_t, a_s = float(schedule.alpha(t)), float(schedule.alpha(s))
                p_reveal = 1.0 if s == 0.0 else (a_s - a_t) / (1.0 - a_t)
                reveal_bt = np.zeros_like(z, bool)
                reveal_bt[:, lo:hi] = (z[:, lo:hi] == mask) & (rng.random((batch, hi - lo)) < p_reveal)
                if not reuse or (reveal_bt.any() and not current):
                    logp, current = denoiser(z, np.full((batch,), t)), True
                    nfe += 1
                if reveal_bt.any():
                    z[reveal_bt] = _draw(logp[reveal_bt], rng, temperature)
                    current = False
                bar.update(1)
    return z, {"nfe": nfe, "steps": sum(n for _, _, n in plan)}


def _confidence(kind: str, logp64_nv, x0_n, rng):
    if kind == "prob":  # LLaDA: probability of the drawn token
        return np.exp(np.take_along_axis(logp64_nv, x0_n[:, None], axis=-1)[:, 0])
    if kind == "top":  # probability of the most likely token (independent of the draw)
        return np.exp(logp64_nv.max(axis=-1))
    if kind == "margin":  # top-1 minus top-2 probability
        top2 = np.sort(logp64_nv, axis=-1)[:, -2:]
        return np.exp(top2[:, 1]) - np.exp(top2[:, 0])
    if kind == "random":  # LLaDA's random-remasking baseline
        return rng.random(len(x0_n))
    raise ValueError(f"unknown confidence {kind!r}; use prob, top, margin or random")


CONFIDENCES = ("prob", "top", "margin", "random")


def remask(denoiser, batch: int, length: int, steps: int, *, seed: int = 0, prefix=None, block_len: int = 0,
           temperature: float = 1.0, confidence: str = "prob", progress: bool = False):
    """LLaDA low-confidence remasking: at every step predict all masked positions of the
    current block, keep the k most confident, re-mask the rest.

    k follows LLaDA's schedule (the block's masked count spread evenly over its steps, the
    remainder on the first steps). confidence='prob' (LLaDA's) ranks by the probability of
    the drawn token, which favours likely tokens and so sharpens the output distribution;
    'top' and 'margin' rank by the predicted distribution alone and 'random' at random, which
    leave the output distribution of an exact denoiser unchanged. Ties break at random.
    """
    if confidence not in CONFIDENCES:
        raise ValueError(f"unknown confidence {confidence!r}; use one of {', '.join(CONFIDENCES)}")
    rng = np.random.default_rng(seed)
    mask = denoiser.mask_id
    z, start = _canvas(batch, length, prefix, mask)
    plan = _blocks(start, length, block_len, steps)
    nfe = 0
    with progress_bar(sum(n for _, _, n in plan), "remask", progress) as bar:
        for lo, hi, n in plan:
            size = hi - lo
            ks = [size // n + (i < size % n) for i in range(n)]
            for k in ks:
                bar.update(1)
                if k == 0:
                    continue
                cand_bt = np.zeros_like(z, bool)
                cand_bt[:, lo:hi] = z[:, lo:hi] == mask
                t_b = (z[:, start:] == mask).mean(axis=1)  # masked fraction: the model's "time"
                logp = denoiser(z, t_b)
                nfe += 1
                logp64 = log_softmax64(forbid(logp[cand_bt]))
                x0_n = gumbel_argmax(logp64, rng, temperature)
                conf_bt = np.full(z.shape, -np.inf)
                conf_bt[cand_bt] = _confidence(confidence, logp64, x0_n, rng)
                x0_bt = np.zeros_like(z)
                x0_bt[cand_bt] = x0_n
                # Sort by confidence (descending), ties by a random key; keep the first k per row.
                order_bt = np.lexsort((rng.random(z.shape), -conf_bt), axis=-1)[:, :k]
                rows_b1 = np.arange(batch)[:, None]
                z[rows_b1, order_bt] = x0_bt[rows_b1, order_bt]
    return z, {"nfe": nfe, "steps": sum(n for _, _, n in plan)}


SAMPLERS = ("ancestral", "remask", "semiar")


def sample(denoiser, sampler: str, batch: int, length: int, steps: int, *, schedule, seed: int = 0, prefix=None,
           block_len: int = 32, temperature: float = 1.0, confidence: str = "prob", cache: bool = True,
           progress: bool = False):
    """Dispatch by name: ancestral | remask (one block) | semiar (remask over blocks of block_len)."""
    if sampler == "ancestral":
        return ancestral(denoiser, batch, length, steps, schedule=schedule, seed=seed, prefix=prefix,
                         temperature=temperature, cache=cache, progress=progress)
    if sampler in ("remask", "semiar"):
        return remask(denoiser, batch, length, steps, seed=seed, prefix=prefix, temperature=temperature,
                      block_len=block_len if sampler == "semiar" else 0, confidence=confidence, progress=progress)
    raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
