"""Sampling helpers shared by every family, and autoregressive decoding with a cache.

Categorical draws are made on the host in numpy float64 (Gumbel-max). Float32 Gumbel noise
-log(-log(u)) cannot produce the large values the tail of the distribution needs, which
silently lowers the sampling temperature (Zheng et al. 2024 measured this for masked
diffusion); float64 fixes that without turning on jax_enable_x64 for the whole process (which
would change every other dtype in the lab). The model runs on the device; only the logits of
the positions being drawn come back.

Autoregressive decoding is written against Model.init_cache / Model.decode only, so every
arch with a decode path (attention KV caches, recurrent states of Gated DeltaNet / Mamba-2,
hybrids) samples through the same code.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from archs.tokens import Vocab


def forbid(logits_nv, ids=None):
    """Copy of logits [..., V] (float64) with the given token ids set to -inf; by default the ids
    that are never text of a vocabulary of V tokens (MASK, PAD: archs.tokens)."""
    out = np.array(logits_nv, dtype=np.float64)
    ids = Vocab.of_size(out.shape[-1]).never_emitted if ids is None else ids
    out[..., list(ids)] = -np.inf
    return out


def gumbel_argmax(logits_nv, rng: np.random.Generator, temperature: float = 1.0):
    """One categorical draw per row of logits [..., V] in float64; temperature 0 is argmax.

    -inf logits are never drawn. Unnormalised logits are fine (Gumbel-max is shift-invariant).
    """
    logits = np.asarray(logits_nv, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    u = rng.random(logits.shape)  # float64 in [0, 1)
    gumbel = -np.log(-np.log(np.maximum(u, np.finfo(np.float64).tiny)))
    return (logits / temperature + gumbel).argmax(axis=-1)


def log_softmax64(logits_nv):
    logits = np.asarray(logits_nv, dtype=np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def progress_bar(total: int, desc: str, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, leave=False)


class ARSampler:
    """Token-by-token sampling from a causal model with its decode cache.

    The prompt is prefilled in one decode call, then each new token is one decode call of
    length 1 at the next position; both are jitted once per shape.
    """

    def __init__(self, model):
        self.model = model
        graphdef, self.state = nnx.split(model)

        def decode(state, tokens_bt, cache, pos):
            return nnx.merge(graphdef, state).decode(tokens_bt, cache, pos)

        self._decode = jax.jit(decode, donate_argnums=(2,))

    def generate(self, prompt_bt, n_new: int, *, seed: int = 0, temperature: float = 1.0,
                 max_len: int | None = None, progress: bool = False):
        """Tokens [B, P + n_new] (prompt included) and stats {'wall_s', 'tokens_per_s'}."""
        prompt = np.asarray(prompt_bt, np.int32)
        b, p = prompt.shape
        if p < 1:
            raise ValueError("autoregressive sampling needs a prompt of at least one token (e.g. EOD)")
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        cache = self.model.init_cache(b, max_len or p + n_new)
        logits_btv, cache = self._decode(self.state, jnp.asarray(prompt), cache, jnp.int32(0))
        out = np.zeros((b, p + n_new), np.int32)
        out[:, :p] = prompt
        with progress_bar(n_new, "AR decode", progress) as bar:
            for i in range(n_new):
                nxt_b = gumbel_argmax(forbid(np.asarray(logits_btv[:, -1])), rng, temperature)
                out[:, p + i] = nxt_b
                bar.update(1)
                if i + 1 < n_new:
                    logits_btv, cache = self._decode(self.state, jnp.asarray(out[:, p + i:p + i + 1]), cache,
                                                     jnp.int32(p + i))
        wall = time.perf_counter() - t0
        return out, {"wall_s": wall, "tokens_per_s": b * n_new / max(wall, 1e-9), "nfe": n_new}
