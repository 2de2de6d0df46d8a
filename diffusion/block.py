"""Block diffusion (BD3-LM, Arriola et al. 2025): autoregressive over blocks of L tokens, masked
diffusion inside a block, conditioned on the clean blocks before it.

Same interface as the other objectives (archs.objective): windows [B, T + 1], the denoiser scores
x = windows[:, 1:] (columns 1..T, exactly the bytes the AR model and MDLM score); L divides T.

NELBO. With x^b the b-th block and t_b its own diffusion time (BD3-LM draws one t per block),

    NELBO(x) = sum_b E_{t_b} E_{z^b ~ q(. | x^b)} [ w(t_b) * sum over masked l in b of -log p(x_l | z^b, x^{<b}) ]

with the schedule's weight w(t) = -alpha'_t / (1 - alpha_t) and SUBS (diffusion.objective). It is an
upper bound on -log p(x) because each block's term bounds -log p(x^b | x^{<b}). L = T is MDLM's
NELBO exactly; for L = 1 a block is one token, masked with probability 1 - alpha_t, and its term is
w(t) (1 - alpha_t) * (-log p(x_l | x_<l, [MASK])) in expectation over the mask: the AR loss of a
network that reads [MASK] at the predicted position (w (1 - alpha) = 1 for log-linear; at t = 1
every block is masked and the sample equals it exactly).

Vectorised training (BD3-LM): one pass over the 2T tokens [z ; x] with positions 0..T-1 for both
copies and the block-causal mask of archs.context.BlockSpec (noisy block b sees itself and the
clean blocks < b; clean block b sees the clean blocks <= b). Logits are taken for the noisy half.

Document masking keeps the rule of the single-copy models: a token's document is counted from the
end-of-document tokens it can see. Clean tokens count EODs of x; a noisy token in block b counts
the EODs of x before the block plus the unmasked EODs of z^b up to itself (a masked EOD does not
reveal a boundary, as in MDLM; the sampler's decode path counts exactly the same way).

Times: one t per block, stratified (antithetic) across the B x n_blocks blocks of a batch, block
j of row i in stratum i + j B, so every sequence spans [0, 1]; evaluation averages K =
eval_samples draws per window with each block's t stratified across the K draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from archs.context import BlockSpec, Ctx
from archs.errors import ConfigError
from archs.mixers import check_block_mask_support
from archs.sizes import check_block_size
from archs.tokens import Vocab
from diffusion.objective import MaskedDiffusionObjective, subs_log_probs
from diffusion.schedules import sample_times, stratified_times


def block_context(z_bt, x_bt, block_size: int, eod_id: int, doc_mask: bool):
    """Tokens [B, 2T] = [z ; x] and the Ctx of the vectorised pass (positions, segments, blocks)."""
    b, t = x_bt.shape
    n = t // block_size
    pos_t = jnp.arange(t)
    blk_t = pos_t // block_size
    positions = jnp.broadcast_to(jnp.concatenate([pos_t, pos_t]), (b, 2 * t))
    blocks = BlockSpec(
        block_bt=jnp.broadcast_to(jnp.concatenate([blk_t, blk_t]), (b, 2 * t)),
        clean_bt=jnp.broadcast_to(jnp.arange(2 * t) >= t, (b, 2 * t)),
    )
    seg = None
    if doc_mask:
        eod_x = (x_bt == eod_id).astype(jnp.int32)
        seg_x = jnp.cumsum(eod_x, axis=1)
        # EODs of x strictly before each block, then the visible EODs of z inside the block.
        before_bn = (seg_x - eod_x).reshape(b, n, block_size)[..., 0]
        inside = jnp.cumsum((z_bt == eod_id).astype(jnp.int32).reshape(b, n, block_size), axis=-1)
        seg_z = (before_bn[..., None] + inside).reshape(b, t)
        seg = jnp.concatenate([seg_z, seg_x], axis=1)
    return jnp.concatenate([z_bt, x_bt], axis=1), Ctx(positions=positions, segment_ids=seg, blocks=blocks)


class BlockDiffusionObjective(MaskedDiffusionObjective):
    """BD3-LM's NELBO with SUBS; arch.diffusion.* settings as for MDLM (schedule, eps, antithetic,
    normalize, eval_samples). `masked` normalisation is per block: -alpha'(t_b) times the mean
    cross-entropy of the block's masked tokens, averaged over the blocks with a masked token."""

    name = "block_diffusion"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.block_size < 1:
            raise ConfigError(f"arch.block_size={cfg.block_size}: block diffusion needs a block size >= 1 that "
                              "divides train.seq_len (e.g. arch.block_size=16)")
        check_block_mask_support(cfg)
        if cfg.diffusion.time_conditioning:
            raise ConfigError("block diffusion draws one t per block but time conditioning embeds one t per "
                              "sequence: set arch.diffusion.time_conditioning=false")
        self.block_size = int(cfg.block_size)
        self.eod_id = Vocab.of_size(cfg.vocab_size).eod

    def n_blocks(self, seq_len: int) -> int:
        check_block_size(self.cfg, seq_len)
        return seq_len // self.block_size

    # -- pieces (exposed for tests and the sampler) ---------------------------------------------
    def corrupt(self, x_bt, t_bn, rng):
        """Mask each token of block j independently with probability 1 - alpha(t_bn[:, j])."""
        p_mask_bt = jnp.repeat(1.0 - self.schedule.alpha(t_bn), self.block_size, axis=1)
        masked_bt = jax.random.uniform(rng, x_bt.shape) < p_mask_bt
        return jnp.where(masked_bt, self.mask_id, x_bt), masked_bt

    def denoiser_logits(self, model, z_bt, x_bt):
        """Logits [B, T, V] of every noisy position given its block of z and the clean blocks before."""
        tokens, ctx = block_context(z_bt, x_bt, self.block_size, self.eod_id, self.cfg.doc_mask)
        return model.forward(tokens, ctx, n_logits=x_bt.shape[1])

    def recall(self, model, windows_bt, answers_bt):
        """One denoising step per block with every answer masked: each position's argmax [B, T]
        given its block with the answers masked and the clean blocks before it (answers of earlier
        blocks are context, as when sampling block by block)."""
        x_bt = windows_bt[:, 1:]
        self.n_blocks(x_bt.shape[1])
        z_bt = jnp.where(answers_bt, self.mask_id, x_bt)
        return jnp.argmax(subs_log_probs(self.denoiser_logits(model, z_bt, x_bt), z_bt), axis=-1)

    def masked_nll(self, model, x_bt, t_bn, rng):
        """-log p_theta(x_l | z^b, x^{<b}) per position [B, T] (exactly 0 where unmasked) and the mask."""
        self.n_blocks(x_bt.shape[1])
        z_bt, masked_bt = self.corrupt(x_bt, t_bn, rng)
        logp_btv = subs_log_probs(self.denoiser_logits(model, z_bt, x_bt), z_bt)
        nll_bt = -jnp.take_along_axis(logp_btv, x_bt[..., None], axis=-1)[..., 0]
        return nll_bt, masked_bt

    def _per_block(self, a_bt):
        b, t = a_bt.shape
        return a_bt.reshape(b, t // self.block_size, self.block_size).sum(axis=-1)

    def nelbo(self, model, x_bt, t_bn, rng):
        """One-sample NELBO estimate per sequence [B] (nats); t_bn [B, n_blocks] one time per block."""
        nll_bt, _ = self.masked_nll(model, x_bt, t_bn, rng)
        return (self.schedule.weight(t_bn) * self._per_block(nll_bt)).sum(axis=1)

    # -- the objective interface ----------------------------------------------------------------
    def loss(self, model, windows_bt, rng):
        x_bt = windows_bt[:, 1:]
        b, t = x_bt.shape
        n = self.n_blocks(t)
        rng_t, rng_z = jax.random.split(rng)
        t_bn = sample_times(rng_t, b * n, self.eps, self.antithetic).reshape(n, b).T
        nll_bt, masked_bt = self.masked_nll(model, x_bt, t_bn, rng_z)
        summed_bn = self._per_block(nll_bt)
        nelbo_per_token = (self.schedule.weight(t_bn) * summed_bn).sum(axis=1).mean() / t
        if self.normalize == "tokens":
            loss = nelbo_per_token
        else:
            n_masked_bn = self._per_block(masked_bt.astype(jnp.int32))
            has_bn = n_masked_bn > 0
            per_bn = self.schedule.neg_dalpha(t_bn) * summed_bn / jnp.maximum(n_masked_bn, 1)
            loss = jnp.where(has_bn, per_bn, 0.0).sum() / jnp.maximum(has_bn.sum(), 1)
        return loss, {"nelbo": nelbo_per_token, "masked_frac": masked_bt.mean()}

    def eval_nats(self, model, windows_bt, rng):
        """NELBO of columns 1..T of each window [B] (nats): an upper bound on its NLL.

        K = eval_samples Monte Carlo draws per window, each block's t stratified across the K
        draws; the K copies run as one batch of K * B rows (as MaskedDiffusionObjective does)."""
        x_bt = windows_bt[:, 1:]
        b, t = x_bt.shape
        n, k = self.n_blocks(t), self.eval_samples
        rng_t, rng_z = jax.random.split(rng)
        t_bnk = stratified_times(jax.random.uniform(rng_t, (b, n)), k, self.eps)
        x_kb_t = jnp.broadcast_to(x_bt[None], (k, b, t)).reshape(k * b, t)
        t_kb_n = jnp.transpose(t_bnk, (2, 0, 1)).reshape(k * b, n)
        return self.nelbo(model, x_kb_t, t_kb_n, rng_z).reshape(k, b).mean(axis=0)
