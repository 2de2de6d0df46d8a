"""Masking schedules of the absorbing-state forward process and the times they are sampled at.

A schedule gives alpha_t, the probability that a token is still unmasked at time t in [0, 1]
(alpha_0 = 1, alpha_1 = 0), and the NELBO weight

    w(t) = -alpha'_t / (1 - alpha_t)   (> 0)

that multiplies the summed cross-entropy of the masked positions in the continuous-time
NELBO (MDLM, Sahoo et al. 2024, eq. 10 written with a positive weight).

- loglinear: alpha_t = 1 - t, alpha'_t = -1, so w(t) = 1 / t.
- cosine:    alpha_t = cos(pi t / 2), alpha'_t = -(pi / 2) sin(pi t / 2); with
             1 - cos(x) = 2 sin^2(x / 2) and sin(x) = 2 sin(x / 2) cos(x / 2),
             w(t) = (pi / 2) / tan(pi t / 4)   (about 2 / t near 0).

Both are jnp/numpy-agnostic: they work on jax arrays inside jit and on float64 numpy arrays
in the host-side samplers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from archs.errors import ConfigError


def _xp(t):
    return np if isinstance(t, (np.ndarray, float, int)) else jnp


class LogLinear:
    name = "loglinear"

    def alpha(self, t):
        return 1.0 - t

    def weight(self, t):
        return 1.0 / t

    def neg_dalpha(self, t):
        return _xp(t).ones_like(t)


class Cosine:
    name = "cosine"

    def alpha(self, t):
        return _xp(t).cos(0.5 * math.pi * t)

    def weight(self, t):
        # The closed form avoids 1 - cos(.) cancelling catastrophically at small t.
        return (0.5 * math.pi) / _xp(t).tan(0.25 * math.pi * t)

    def neg_dalpha(self, t):
        return 0.5 * math.pi * _xp(t).sin(0.5 * math.pi * t)


SCHEDULES = {"loglinear": LogLinear, "cosine": Cosine}


def get_schedule(name: str):
    if name not in SCHEDULES:
        raise ConfigError(f"arch.diffusion.schedule={name!r} is unknown; use one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()


def stratified_times(u, n: int, eps: float):
    """t_i = (u + i / n) mod 1, clipped to [eps, 1]: one stratum of width 1/n per sample.

    Every stratum of [0, 1] is hit exactly once, which removes most of the variance that the
    1/t weight puts into i.i.d. draws; each t_i is still marginally uniform, so the estimate
    stays unbiased. `u` may carry leading axes (one offset per group).
    """
    t = jnp.mod(jnp.asarray(u)[..., None] + jnp.arange(n) / n, 1.0)
    return clip_times(t, eps)


def clip_times(t, eps: float):
    # Away from 0 the weight w(t) ~ 1/t stays finite (at most 1/eps); MDLM's choice.
    return jnp.clip(t, eps, 1.0)


def sample_times(rng, n: int, eps: float, antithetic: bool):
    """n diffusion times for a batch: stratified (antithetic) or i.i.d. uniform, clipped."""
    if antithetic:
        return stratified_times(jax.random.uniform(rng, ()), n, eps)
    return clip_times(jax.random.uniform(rng, (n,)), eps)
