"""Masked-diffusion (MDLM / LLaDA) objective: the continuous-time NELBO with SUBS.

Same interface as archs.objective.AutoregressiveObjective, so the shared engine trains and
scores it unchanged. Windows are [B, T + 1]; the denoiser sees x = windows[:, 1:] (T tokens),
so it is scored on exactly the bytes the AR model predicts.

Per sequence x and time t (alpha_t, w(t) = -alpha'_t / (1 - alpha_t) from diffusion.schedules):

    z ~ q(z | x): each token independently [MASK] with probability 1 - alpha_t
    NELBO(x) = E_t E_z [ w(t) * sum over masked l of -log p_theta(x_l | z) ]

SUBS (Sahoo et al. 2024): the [MASK] (and PAD) logits are -inf before the softmax, and an
unmasked position's distribution is a point mass on its input, so it contributes exactly 0.

Normalisation of the training loss (`arch.diffusion.normalize`):
- tokens: NELBO / T, a per-token NELBO in nats, unbiased, the same units as the AR loss. For
  the log-linear schedule this is (1 / (t T)) sum_masked -log p, which is exactly LLaDA's
  pre-training equation (Nie et al. 2025, eq. 3: normalised by the sequence length, not the
  masked count); our windows all have length T, so LLaDA's "divide by all tokens" is this.
- masked: the expected masked count (1 - alpha_t) T in the weight is replaced by the realised
  count: -alpha'_t * sum_masked -log p / n_masked (for log-linear: the mean cross-entropy of
  the masked tokens). A ratio estimator, free of the 1/t blow-up at small t, so lower
  variance; rows with nothing masked leave the mean, which re-weights t by P(some mask | t):
  a bias of about 1/(T + 1) for log-linear, more for cosine (it masks little at small t).
  Whatever the training normalisation, eval_nats is the unbiased NELBO, so eval_bpb is
  always the bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from archs.errors import ConfigError
from archs.tokens import Vocab
from diffusion.schedules import get_schedule, sample_times, stratified_times

NORMALIZATIONS = ("tokens", "masked")


def subs_log_probs(logits_btv, z_bt):
    """SUBS log-probabilities [B, T, V]: never [MASK]/PAD; unmasked positions copy their input.
    The special ids follow from the vocabulary size V (archs.tokens)."""
    vocab = Vocab.of_size(logits_btv.shape[-1])
    ids_v = jnp.arange(logits_btv.shape[-1])
    never_v = (ids_v == vocab.mask) | (ids_v == vocab.pad)
    logp = jax.nn.log_softmax(jnp.where(never_v, -jnp.inf, logits_btv.astype(jnp.float32)), axis=-1)
    copy = jnp.where(ids_v == z_bt[..., None], 0.0, -jnp.inf)  # log of a one-hot on the input
    return jnp.where((z_bt == vocab.mask)[..., None], logp, copy)


class MaskedDiffusionObjective:
    name = "diffusion"

    def __init__(self, cfg):
        d = cfg.diffusion
        self.schedule = get_schedule(d.schedule)
        if not 0.0 < d.eps < 1.0:
            raise ConfigError(f"arch.diffusion.eps={d.eps} must lie in (0, 1)")
        if d.normalize not in NORMALIZATIONS:
            raise ConfigError(f"arch.diffusion.normalize={d.normalize!r}; use one of {', '.join(NORMALIZATIONS)}")
        if d.eval_samples < 1:
            raise ConfigError(f"arch.diffusion.eval_samples={d.eval_samples} must be at least 1")
        self.cfg = cfg
        self.mask_id = Vocab.of_size(cfg.vocab_size).mask
        self.eps = float(d.eps)
        self.antithetic = bool(d.antithetic)
        self.normalize = d.normalize
        self.eval_samples = int(d.eval_samples)

    # -- pieces (exposed for tests) -------------------------------------------------------------
    def corrupt(self, x_bt, t_b, rng):
        """Forward process: mask each token independently with probability 1 - alpha_t."""
        p_mask_b = 1.0 - self.schedule.alpha(t_b)
        masked_bt = jax.random.uniform(rng, x_bt.shape) < p_mask_b[:, None]
        return jnp.where(masked_bt, self.mask_id, x_bt), masked_bt

    def masked_nll(self, model, x_bt, t_b, rng):
        """-log p_theta(x_l | z) per position [B, T] (exactly 0 where unmasked) and the mask."""
        z_bt, masked_bt = self.corrupt(x_bt, t_b, rng)
        # The model ignores t_b unless arch.diffusion.time_conditioning is on.
        logp_btv = subs_log_probs(model(z_bt, t_b=t_b), z_bt)
        nll_bt = -jnp.take_along_axis(logp_btv, x_bt[..., None], axis=-1)[..., 0]
        return nll_bt, masked_bt

    def nelbo(self, model, x_bt, t_b, rng):
        """One-sample NELBO estimate per sequence [B], in nats."""
        nll_bt, _ = self.masked_nll(model, x_bt, t_b, rng)
        return self.schedule.weight(t_b) * nll_bt.sum(axis=1)

    # -- the objective interface ----------------------------------------------------------------
    def loss(self, model, windows_bt, rng):
        x_bt = windows_bt[:, 1:]
        b, t = x_bt.shape
        rng_t, rng_z = jax.random.split(rng)
        t_b = sample_times(rng_t, b, self.eps, self.antithetic)
        nll_bt, masked_bt = self.masked_nll(model, x_bt, t_b, rng_z)
        summed_b = nll_bt.sum(axis=1)
        nelbo_per_token = (self.schedule.weight(t_b) * summed_b).mean() / t
        if self.normalize == "tokens":
            loss = nelbo_per_token
        else:
            # Rows with nothing masked have nothing to predict: they leave the mean.
            n_masked_b = masked_bt.sum(axis=1)
            has_b = n_masked_b > 0
            per_b = self.schedule.neg_dalpha(t_b) * summed_b / jnp.maximum(n_masked_b, 1)
            loss = jnp.where(has_b, per_b, 0.0).sum() / jnp.maximum(has_b.sum(), 1)
        return loss, {"nelbo": nelbo_per_token, "masked_frac": masked_bt.mean()}

    def eval_nats(self, model, windows_bt, rng):
        """NELBO of columns 1..T of each window [B] (nats): an upper bound on its NLL.

        Averages K = eval_samples Monte Carlo draws per window, each with its own mask and a
        t stratified across the K draws (always, whatever `antithetic` says for training, so
        every run is scored the same way). The K copies run as one batch of K * B rows.
        """
        x_bt = windows_bt[:, 1:]
        b, t = x_bt.shape
        k = self.eval_samples
        rng_t, rng_z = jax.random.split(rng)
        t_bk = stratified_times(jax.random.uniform(rng_t, (b,)), k, self.eps)
        x_kb_t = jnp.broadcast_to(x_bt[None], (k, b, t)).reshape(k * b, t)
        nelbo_kb = self.nelbo(model, x_kb_t, t_bk.T.reshape(k * b), rng_z).reshape(k, b)
        return nelbo_kb.mean(axis=0)

    def recall(self, model, windows_bt, answers_bt):
        """One denoising step with every answer masked: the argmax [B, T] of each position of
        columns 1..T given the window with all positions in `answers_bt` [B, T] replaced by [MASK]
        (the engine scores those positions)."""
        x_bt = windows_bt[:, 1:]
        z_bt = jnp.where(answers_bt, self.mask_id, x_bt)
        return jnp.argmax(subs_log_probs(model(z_bt), z_bt), axis=-1)
