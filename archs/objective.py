"""The autoregressive objective: next-token cross-entropy on packed windows.

An objective turns windows [B, T + 1] (column 0 is the token before the scored window) into a
training loss and into held-out nats on exactly the bytes in columns 1..T; masked diffusion
(diffusion.objective) implements the same interface, so the engine treats both alike.
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

