"""The compiled pieces of a run: model, optimizer, shardings, the jitted train step and evaluation.

The batch and the noise of step s are pure functions of (seed, s), and the learning rate is an
input of the compiled step (not a constant baked into it): runs of one shape share one
executable whatever their length, which is what makes sweeps of many small runs cheap to compile.

The model's variables split into parameters (nnx.Param: differentiated, optimized) and state
that is not (the routers' selection biases of loss-free MoE balancing: updated by the step,
outside the gradient). Both are checkpointed together as the model's `params` item, so a
checkpoint restores into the whole model as sampling builds it.

Batches come in as this process's rows (`rows`; all of them with one process) and are assembled
into global arrays over the whole mesh (sweeps.engine.distributed), so one Trainer serves a single
process and every process of a multi-process run alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from archs.config import Remat
from archs.errors import ConfigError
from archs.model import Model
from archs.moe import RouterBias, balance_loss, router_metrics, router_stats, update_router_bias
from archs.sharding import batch_sharding, make_mesh, param_shardings, replicated
from sweeps.config import Config, DecayShape, OptimConfig, Schedule
from sweeps.engine.distributed import global_batch, process_rows
from sweeps.engine.plan import Plan, make_objective

EVAL_KEY = 1234  # the same evaluation noise for every run and arch: comparable numbers
# XLA:CPU expands the optimization barriers that jax.checkpoint places around recomputed blocks
# before common-subexpression elimination, which then merges the recomputed matmuls back into the
# forward pass ones: rematerialisation is undone and saves almost nothing. Keeping the barriers
# (GPU and TPU keep them until scheduling anyway) makes it work on CPU too.
CPU_REMAT_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def schedule_steps(optim: OptimConfig, total_steps: int) -> tuple[int, int]:
    """(warmup steps, decay steps) of a run: absolute counts when set, else from the fractions."""
    warmup = optim.warmup_steps if optim.warmup_steps is not None else \
        max(1, int(round(optim.warmup_frac * total_steps)))
    decay = optim.decay_steps if optim.decay_steps is not None else max(1, int(round(optim.decay_frac * total_steps)))
    return warmup, decay


def lr_schedule(optim: OptimConfig, total_steps: int, peak_lr: float):
    """Learning rate by step: linear warmup from 0, then cosine to the floor, or (wsd) constant and
    a cooldown over the last decay steps (linear, or 1 - sqrt as in Hagele et al. 2024)."""
    warmup, decay = schedule_steps(optim, total_steps)
    floor = peak_lr * optim.min_lr_ratio
    if optim.schedule == Schedule.cosine:
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(warmup, 1), max(total_steps, warmup + 1), floor)
    stable = max(0, total_steps - warmup - decay)
    if optim.decay_shape == DecayShape.sqrt:
        def cool(k):
            return floor + (peak_lr - floor) * (1.0 - jnp.sqrt(jnp.clip(k / max(decay, 1), 0.0, 1.0)))
    else:
        cool = optax.linear_schedule(peak_lr, floor, max(decay, 1))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_lr, max(warmup, 1)), optax.constant_schedule(peak_lr), cool],
        [warmup, warmup + stable],
    )


def make_optimizer(optim: OptimConfig, peak_lr: float):
    """AdamW after global-norm clipping; no weight decay on norms and biases (vectors). The
    learning rate is injected, so each step sets it (with_learning_rate)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(optim.clip),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=peak_lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
            weight_decay=optim.weight_decay, mask=decay_mask),
    )


def union(a: dict, b: dict) -> dict:
    """Two nested dicts with disjoint leaves as one (parameters and other state of one model)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = union(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def pick(tree: dict, like: dict) -> dict:
    """The part of `tree` with the keys of `like` (inverse of union)."""
    return {k: pick(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def with_learning_rate(opt_state, lr):
    """The optimizer state with the injected learning rate replaced (see make_optimizer)."""
    clip_state, adam_state = opt_state
    hyper = dict(adam_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return clip_state, adam_state._replace(hyperparams=hyper)


class Trainer:
    """Model, optimizer, shardings and jitted step/eval functions for one config."""

    def __init__(self, cfg: Config, plan: Plan, devices=None):
        self.cfg, self.plan = cfg, plan
        self.mesh = make_mesh(cfg.mesh, devices)
        # Build the model abstractly, then initialise every variable in one compiled call placed
        # straight into its sharding (eager init compiles each initializer separately).
        make = lambda: Model(plan.model_cfg, rngs=nnx.Rngs(params=cfg.seed), remat=cfg.train.remat)  # noqa: E731
        abstract = nnx.eval_shape(make)
        self.n_params, self.n_nonembed = plan.params, plan.nonembed_params
        # Every variable is a parameter or router state: nnx.split raises on anything else.
        self.graphdef, abs_params, abs_other = nnx.split(abstract, nnx.Param, RouterBias)
        self.param_sharding = nnx.to_pure_dict(param_shardings(abs_params, self.mesh))
        self.other_sharding = nnx.to_pure_dict(param_shardings(abs_other, self.mesh))
        self._abs_params = nnx.to_pure_dict(abs_params)
        self._abs_other = nnx.to_pure_dict(abs_other)

        def init():
            _, params, other = nnx.split(make(), nnx.Param, RouterBias)
            return nnx.to_pure_dict(params), nnx.to_pure_dict(other)

        self._init = jax.jit(init, out_shardings=(self.param_sharding, self.other_sharding))
        self.objective = make_objective(plan.model_cfg)
        self.tx = make_optimizer(cfg.optim, plan.peak_lr)
        self.lr_schedule = lr_schedule(cfg.optim, plan.steps, plan.peak_lr)
        self.key = jax.random.key(cfg.seed)
        self.batch_sharding = batch_sharding(self.mesh)
        self.rows = process_rows(self.batch_sharding, cfg.train.batch_size)  # this process's rows of a batch
        # Optimizer moments take their parameter's sharding by XLA's propagation through
        # zeros_like; scalars (step counts) come back on one device: replicate them.
        full = replicated(self.mesh)
        abs_p = self._abstract(self._abs_params, self.param_sharding)
        opt_shardings = jax.jit(self.tx.init).lower(abs_p).compile().output_shardings
        self.opt_sharding = jax.tree.map(
            lambda s: s if len(s.device_set) == self.mesh.size else full, opt_shardings)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.param_sharding, self.opt_sharding, self.other_sharding, self.batch_sharding, None, None),
            out_shardings=(self.param_sharding, self.opt_sharding, self.other_sharding, full),
            donate_argnums=(0, 1, 2),
            compiler_options=CPU_REMAT_OPTIONS if cfg.train.remat != Remat.none and self._on_cpu() else None,
        )
        self._eval = jax.jit(self._eval_nats,
                             in_shardings=(self.param_sharding, self.other_sharding, self.batch_sharding, None),
                             out_shardings=full)
        self._recall = jax.jit(self._recall_hits,
                               in_shardings=(self.param_sharding, self.other_sharding, self.batch_sharding,
                                             self.batch_sharding),
                               out_shardings=full)

    def _on_cpu(self) -> bool:
        return self.mesh.devices.flat[0].platform == "cpu"

    # --- state: (parameters, optimizer state, other model state) --------------------------------

    def init_state(self):
        params, other = self._init()
        opt = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params)
        return params, opt, other

    @staticmethod
    def _abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    def checkpoint_items(self, params, opt, other):
        """What a checkpoint holds: the whole model's variables, and the optimizer state."""
        return union(params, other), opt

    def from_checkpoint(self, model_state, opt):
        return pick(model_state, self._abs_params), opt, pick(model_state, self._abs_other)

    def abstract_checkpoint(self):
        params = self._abstract(self._abs_params, self.param_sharding)
        other = self._abstract(self._abs_other, self.other_sharding)
        opt = self._abstract(jax.eval_shape(self.tx.init, params), self.opt_sharding)
        return union(params, other), opt

    def model(self, params, other) -> Model:
        return nnx.merge(self.graphdef, params, other)

    # --- the compiled functions --------------------------------------------------------------------

    def _loss(self, params, other, batch, rng):
        model = self.model(params, other)
        (loss, metrics), inter = nnx.capture(self.objective.loss, nnx.Intermediate)(model, batch, rng)
        stats = router_stats(inter)  # None without MoE layers
        total = loss + balance_loss(stats, self.plan.model_cfg)
        return total, (loss, metrics, stats)

    def _train_step(self, params, opt_state, other, batch, step, lr):
        opt_state = with_learning_rate(opt_state, lr)
        rng = jax.random.fold_in(self.key, step)
        (_, (loss, aux, stats)), grads = jax.value_and_grad(self._loss, has_aux=True)(params, other, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if stats is not None:
            other = update_router_bias(other, stats["load"], self.plan.model_cfg)
        return params, opt_state, other, {"loss": loss, "grad_norm": grad_norm, **aux, **router_metrics(stats)}

    def _eval_nats(self, params, other, windows, rng):
        return jnp.sum(self.objective.eval_nats(self.model(params, other), windows, rng))

    def _recall_hits(self, params, other, windows, answers):
        predicted = self.objective.recall(self.model(params, other), windows, answers)
        return jnp.sum((predicted == windows[:, 1:]) & answers)

    def compile_step(self, state):
        """Compile the train step for `state`'s shapes ahead of time and use it from now on; the
        executable tells its memory (XLA's memory_analysis) and cost before the first step runs."""
        b = self.cfg.train
        batch = jax.ShapeDtypeStruct((b.batch_size, b.seq_len + 1), jnp.int32, sharding=self.batch_sharding)
        scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
        compiled = self._step.lower(*state, batch, scalar(jnp.int32), scalar(jnp.float32)).compile()
        self._step = compiled
        return compiled

    def step(self, state, batch_np, step: int):
        """One training step: (params, opt, other) -> the new state and its metrics. `batch_np` is
        this process's rows (`self.rows`) of the step's global batch."""
        batch = global_batch(batch_np, self.batch_sharding, self.cfg.train.batch_size)
        lr = jnp.asarray(self.lr_schedule(step), jnp.float32)
        *state, metrics = self._step(*state, batch, jnp.asarray(step, jnp.int32), lr)
        return tuple(state), metrics

    def _eval_batches(self, n_windows: int):
        """(batch size, this process's rows of a batch, windows used): whole batches that split over
        the data axes."""
        n_dev = self.plan.n_batch_devices
        bs = min(self.cfg.train.eval_batch, n_windows)
        bs = max(bs - bs % n_dev, n_dev)
        n = (n_windows // bs) * bs
        if n == 0:
            raise ConfigError(
                f"only {n_windows} held-out windows, fewer than the {bs} devices of the data axes; "
                "use fewer devices or more held-out data"
            )
        return bs, process_rows(self.batch_sharding, bs), n

    def evaluate(self, state, windows_np: np.ndarray, window_bytes: np.ndarray) -> float:
        """Held-out bits per byte over fixed windows (for diffusion: the NELBO upper bound):
        total nats / (ln 2 x the text bytes behind the scored targets, `window_bytes` per window)."""
        params, _, other = state
        bs, rows, n = self._eval_batches(len(windows_np))
        eval_key = jax.random.key(EVAL_KEY)
        total = 0.0
        for i in range(0, n, bs):
            w = global_batch(windows_np[i:i + bs][rows], self.batch_sharding, bs)
            total += float(self._eval(params, other, w, jax.random.fold_in(eval_key, i)))
        return total / math.log(2) / int(np.sum(window_bytes[:n]))

    def recall(self, state, windows_np: np.ndarray, answers_np: np.ndarray) -> float:
        """Held-out recall accuracy: the share of answer positions (`answers_np` [n, T]) the
        objective's one-shot prediction gets right (archs.objective / diffusion `recall`)."""
        params, _, other = state
        bs, rows, n = self._eval_batches(len(windows_np))
        hits = 0
        for i in range(0, n, bs):
            w = global_batch(windows_np[i:i + bs][rows], self.batch_sharding, bs)
            a = global_batch(answers_np[i:i + bs][rows], self.batch_sharding, bs)
            hits += int(self._recall(params, other, w, a))
        return hits / max(1, int(np.sum(answers_np[:n])))
