"""The autoregressive objective: next-token cross-entropy on packed windows.

An objective turns windows [B, T + 1] (column 0 is the token before the scored window) into a
training loss, into held-out nats on exactly the bytes in columns 1..T, and into one-shot
predictions of chosen targets (`recall`, for associative-recall probes); masked and block
diffusion (diffusion.objective, diffusion.block) implement the same interface, so the engine
treats every family alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from archs.errors import ConfigError


def token_nll(logits_btv, targets_bt):
    """-log p(target) per position, in fp32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]


class AutoregressiveObjective:
    name = "ar"

    def __init__(self, cfg):
        if cfg.objective == "block_diffusion":  # its FLOP count and block size assume its own pass
            raise ConfigError("arch.objective=block_diffusion trains with diffusion.block.BlockDiffusionObjective, "
                              "not the autoregressive objective")
        self.cfg = cfg

    def loss(self, model, windows_bt, rng):
        """Mean next-token NLL (nats per token)."""
        del rng
        nll = token_nll(model(windows_bt[:, :-1]), windows_bt[:, 1:])
        return nll.mean(), {}

    def eval_nats(self, model, windows_bt, rng):
        """Summed NLL of columns 1..T of each window: [B]. Exact for AR."""
        del rng
        return token_nll(model(windows_bt[:, :-1]), windows_bt[:, 1:]).sum(axis=1)


    def recall(self, model, windows_bt, answers_bt):
        """Greedy prediction [B, T] of every target in columns 1..T from the tokens before it (the
        engine scores the positions where `answers_bt` [B, T] is set)."""
        del answers_bt
        return jnp.argmax(model(windows_bt[:, :-1]), axis=-1)
