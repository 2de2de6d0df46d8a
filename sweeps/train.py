"""The training engine shared by every arch: one run from a composed config to a results row.

Order of work is deliberate: validate everything (model shape, data, windows, budget, mesh)
before anything compiles, so a typo costs seconds; then build, restore the newest good
checkpoint, train with deterministic batches and RNG (batch and noise for step s are pure
functions of (seed, s)), evaluate held-out bits per byte, checkpoint atomically, and record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from omegaconf import OmegaConf

from archs.config import ModelConfig
from archs.errors import ConfigError
from archs.flops import flops_per_token
from archs.model import Model, count_params
from archs.objective import AutoregressiveObjective
from archs.sharding import batch_sharding, make_mesh, mesh_shape, param_shardings, replicated
from archs.sizes import pattern_shortfall, resolve
from sweeps.data import check_windows, eval_windows, load_corpus, n_bytes, train_batch
from sweeps.results import ResultsDB
import ssm  # noqa: F401  (registers the recurrent mixers G and M with archs.mixers)
from diffusion.objective import MaskedDiffusionObjective


def make_objective(model_cfg):
    if model_cfg.objective == "diffusion":
        return MaskedDiffusionObjective(model_cfg)
    return AutoregressiveObjective(model_cfg)


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved; re-running the same command resumes."""


class Diverged(Exception):
    """Non-finite loss or gradients."""


# --- config plumbing ---------------------------------------------------------------------------


def to_model_config(arch) -> ModelConfig:
    """Plain ModelConfig from the composed (OmegaConf) arch node."""
    if isinstance(arch, ModelConfig):
        return arch
    obj = OmegaConf.to_object(arch)
    return obj if isinstance(obj, ModelConfig) else ModelConfig(**obj)


def check_arch_chosen(cfg) -> None:
    if OmegaConf.is_missing(cfg, "arch"):
        from sweeps.runtime import _arch_names

        raise ConfigError(f"no architecture chosen: pass +arch=NAME with NAME one of {', '.join(_arch_names())}")


def run_id_for(cfg) -> str:
    """A readable id that is a pure function of everything that changes the result."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("root", "run_id", "hydra"):
        c.pop(k, None)
    c.get("train", {}).pop("progress", None)
    c.get("train", {}).pop("tensorboard", None)
    c.get("train", {}).pop("checkpoint_every_s", None)
    c.get("train", {}).pop("checkpoint_every_steps", None)
    c.get("train", {}).pop("keep_checkpoints", None)
    c.pop("sweep", None)
    c.pop("mesh", None)  # sharding changes where, not what, is computed
    digest = hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8]
    a = cfg.arch
    return f"{a.name}-{a.size}-{int(cfg.train.tokens)}tok-s{cfg.seed}-{digest}"


def learning_rate(optim, d_model: int) -> float:
    if optim.lr_rule == "width":
        return float(optim.lr) * (optim.lr_base_width / d_model) ** optim.lr_width_exponent
    if optim.lr_rule == "none":
        return float(optim.lr)
    raise ConfigError(f"optim.lr_rule={optim.lr_rule!r}; use 'width' or 'none'")


def make_optimizer(optim, total_steps: int, peak_lr: float):
    warmup = max(1, int(round(optim.warmup_frac * total_steps)))
    floor = peak_lr * optim.min_lr_ratio
    if optim.schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1), floor)
    elif optim.schedule == "wsd":
        decay = max(1, int(round(optim.decay_frac * total_steps)))
        stable = max(0, total_steps - warmup - decay)
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, warmup), optax.constant_schedule(peak_lr),
             optax.linear_schedule(peak_lr, floor, decay)],
            [warmup, warmup + stable],
        )
    else:
        raise ConfigError(f"optim.schedule={optim.schedule!r}; use 'cosine' or 'wsd'")
    # No weight decay on norms and biases (vectors); decay matrices and embeddings.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    # The learning rate is an input of the compiled step (set from `sched` on the host each
    # step), not a constant baked into it: every run of one shape then shares one executable,
    # whatever its length, which is what makes sweeps of many small runs cheap to compile.
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=peak_lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
            weight_decay=optim.weight_decay, mask=decay_mask),
    )
    return tx, sched


def with_learning_rate(opt_state, lr):
    """The optimizer state with the injected learning rate replaced (see make_optimizer)."""
    clip_state, adam_state = opt_state
    hyper = dict(adam_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return clip_state, adam_state._replace(hyperparams=hyper)


@dataclasses.dataclass
class Plan:
    """Everything derived from the config before any compilation."""

    model_cfg: ModelConfig
    steps: int
    tokens: int
    tokens_per_step: int
    flops_per_token: float
    flops: float
    peak_lr: float
    mesh_shape: tuple[int, int, int]


def check_train_settings(cfg) -> None:
    """Settings that would otherwise fail only after compilation (or mid-run)."""
    t, o = cfg.train, cfg.optim
    for key, low in (("log_every", 1), ("evals", 1), ("eval_windows", 1), ("eval_batch", 1),
                     ("keep_checkpoints", 1), ("eval_every", 0), ("checkpoint_every_steps", 0)):
        if t[key] < low:
            raise ConfigError(f"train.{key}={t[key]} must be >= {low}")
    if not t.checkpoint_every_s >= 0:
        raise ConfigError(f"train.checkpoint_every_s={t.checkpoint_every_s} must be >= 0 (seconds between checkpoints)")
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ConfigError(f"optim.lr={o.lr} must be a positive number")
    if o.schedule not in ("cosine", "wsd"):
        raise ConfigError(f"optim.schedule={o.schedule!r}; use 'cosine' or 'wsd'")
    if not 0 <= o.warmup_frac <= 1 or not 0 <= o.decay_frac <= 1:
        raise ConfigError(f"optim.warmup_frac={o.warmup_frac} and optim.decay_frac={o.decay_frac} must lie in [0, 1]")


def plan_run(cfg, n_devices: int) -> Plan:
    check_arch_chosen(cfg)
    model_cfg = resolve(to_model_config(cfg.arch))
    make_objective(model_cfg)  # checks objective-specific settings (arch.diffusion.*) before anything is written
    t = cfg.train
    if t.batch_size < 1 or t.seq_len < 1:
        raise ConfigError(f"train.batch_size={t.batch_size} and train.seq_len={t.seq_len} must be positive")
    tokens_per_step = t.batch_size * t.seq_len
    if t.tokens < tokens_per_step:
        raise ConfigError(
            f"train.tokens={t.tokens} is smaller than one step (batch_size x seq_len = {tokens_per_step}); "
            "raise train.tokens or shrink the batch"
        )
    shape = mesh_shape(cfg.mesh, n_devices)
    if t.batch_size % (shape[0] * shape[1]):
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not split over data x fsdp = {shape[0] * shape[1]} devices; "
            "make the batch a multiple of it"
        )
    check_train_settings(cfg)
    steps = math.ceil(t.tokens / tokens_per_step)
    fpt = flops_per_token(model_cfg, t.seq_len)
    tokens = steps * tokens_per_step
    return Plan(model_cfg, steps, tokens, tokens_per_step, fpt, fpt * tokens,
                learning_rate(cfg.optim, model_cfg.d_model), shape)


# --- the compiled pieces -----------------------------------------------------------------------


class Trainer:
    """Model, optimizer, shardings and jitted step/eval functions for one config."""

    def __init__(self, cfg, plan: Plan, devices=None):
        self.cfg, self.plan = cfg, plan
        self.mesh = make_mesh(cfg.mesh, devices)
        # Build the model abstractly, then initialise every parameter in one compiled call
        # placed straight into its sharding (eager init compiles each initializer separately).
        make = lambda: Model(plan.model_cfg, rngs=nnx.Rngs(params=cfg.seed))  # noqa: E731
        abstract = nnx.eval_shape(make)
        self.n_params, self.n_nonembed = count_params(abstract)
        self.graphdef, abs_state = nnx.split(abstract)
        self.param_sharding = nnx.to_pure_dict(param_shardings(abs_state, self.mesh))
        self._abs_params = nnx.to_pure_dict(abs_state)
        self._init_params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())), out_shardings=self.param_sharding)
        self.objective = make_objective(plan.model_cfg)
        self.tx, self.lr_schedule = make_optimizer(cfg.optim, plan.steps, plan.peak_lr)
        self.key = jax.random.key(cfg.seed)
        self.batch_sharding = batch_sharding(self.mesh)
        # Optimizer moments take their parameter's sharding by XLA's propagation through
        # zeros_like; scalars (step counts) come back on one device: replicate them.
        full = replicated(self.mesh)
        opt_shardings = jax.jit(self.tx.init).lower(self._abstract_params()).compile().output_shardings
        self.opt_sharding = jax.tree.map(
            lambda s: s if len(s.device_set) == self.mesh.size else full, opt_shardings)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.param_sharding, self.opt_sharding, self.batch_sharding, None, None),
            out_shardings=(self.param_sharding, self.opt_sharding, None),
            donate_argnums=(0, 1),
        )
        self._eval = jax.jit(self._eval_nats, in_shardings=(self.param_sharding, self.batch_sharding, None))

    def init_state(self):
        params = self._init_params()
        opt = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params)
        return params, opt

    def _abstract_params(self):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self._abs_params, self.param_sharding)

    def abstract_state(self):
        params = self._abstract_params()
        opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           jax.eval_shape(self.tx.init, params), self.opt_sharding)
        return params, opt

    def model(self, params) -> Model:
        return nnx.merge(self.graphdef, params)

    def _loss(self, params, batch, rng):
        return self.objective.loss(self.model(params), batch, rng)

    def _train_step(self, params, opt_state, batch, step, lr):
        opt_state = with_learning_rate(opt_state, lr)
        rng = jax.random.fold_in(self.key, step)
        (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm, **aux}

    def _eval_nats(self, params, windows, rng):
        return self.objective.eval_nats(self.model(params), windows, rng)

    def step(self, params, opt_state, batch_np, step: int):
        batch = jax.device_put(jnp.asarray(batch_np), self.batch_sharding)
        lr = jnp.asarray(self.lr_schedule(step), jnp.float32)
        return self._step(params, opt_state, batch, jnp.asarray(step, jnp.int32), lr)

    def evaluate(self, params, windows_np: np.ndarray) -> float:
        """Held-out bits per byte over fixed windows (for diffusion: the NELBO upper bound)."""
        bs = min(self.cfg.train.eval_batch, len(windows_np))
        bs -= bs % (self.plan.mesh_shape[0] * self.plan.mesh_shape[1]) or 0
        bs = max(bs, self.plan.mesh_shape[0] * self.plan.mesh_shape[1])
        n = (len(windows_np) // bs) * bs
        if n == 0:
            raise ConfigError(
                f"only {len(windows_np)} held-out windows, fewer than the {bs} devices of the data axes; "
                "use fewer devices or more held-out data"
            )
        windows_np = windows_np[:n]
        eval_key = jax.random.key(1234)  # same noise for every run and arch: comparable numbers
        total = 0.0
        for i in range(0, n, bs):
            w = jax.device_put(jnp.asarray(windows_np[i:i + bs]), self.batch_sharding)
            total += float(jnp.sum(self._eval(params, w, jax.random.fold_in(eval_key, i))))
        return total / math.log(2) / n_bytes(windows_np[:, 1:])


# --- one run, end to end -----------------------------------------------------------------------


class _SigtermFlag:
    """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.hit = False
        self._prev = None
        self._installed = False

    def __enter__(self):
        try:
            self._prev = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (e.g. some launchers): no handler
            self._prev = None
        return self

    def _handle(self, signum, frame):
        if not self.hit:  # os.write: print() is not safe inside a signal handler
            os.write(2, b"SIGTERM received: saving a checkpoint after the current step\n")
        self.hit = True

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)


def run_dir(cfg, run_id: str) -> Path:
    return Path(cfg.root) / "runs" / run_id


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after `step` (and any line a kill cut short), so a resumed run's log equals
    an uninterrupted one. Rewritten atomically: a kill during the rewrite loses nothing."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue  # a partial line from a killed writer
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _error_text(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt); re-run the same command to resume from its last checkpoint"
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def train(cfg, *, budget: float | None = None, sweep: str | None = None, devices=None) -> dict:
    """Train one model as configured and record it. Returns the results row.

    Raises ConfigError (bad input, detected before anything compiles; nothing written) and
    Preempted (SIGTERM; checkpoint saved, row `failed` with a 'preempted' error until resumed).
    Divergence is recorded as a failed row and returned, not raised, so sweeps go on. Any
    other exception marks the row failed with its text and propagates.
    """
    devices = list(devices if devices is not None else jax.devices())
    plan = plan_run(cfg, len(devices))
    shortfall = pattern_shortfall(plan.model_cfg)
    if shortfall:
        print(f"warning: {shortfall}", file=sys.stderr)
    corpus = load_corpus(cfg.data.name, list(cfg.data.paths), cfg.data.heldout_fraction)
    check_windows(corpus, cfg.train.seq_len)
    windows = eval_windows(corpus, cfg.train.seq_len, cfg.train.eval_windows)
    n_batch_devices = plan.mesh_shape[0] * plan.mesh_shape[1]
    if len(windows) < n_batch_devices:
        raise ConfigError(
            f"only {len(windows)} held-out windows of train.seq_len={cfg.train.seq_len} tokens, fewer than the "
            f"{n_batch_devices} devices of the data axes; raise train.eval_windows, use more held-out data or fewer devices"
        )
    run_id = cfg.run_id or run_id_for(cfg)
    with _SigtermFlag() as sigterm:
        return _train(cfg, plan, corpus, windows, run_id, devices, sigterm, budget, sweep)


def _train(cfg, plan: Plan, corpus, windows, run_id: str, devices, sigterm: _SigtermFlag, budget, sweep) -> dict:
    db = ResultsDB(cfg.root)
    for dead in db.mark_dead():
        if dead != run_id:
            print(f"warning: run {dead} was left running by a process that is gone; marked failed "
                  "(re-run its command to resume it)", file=sys.stderr)
    mc = plan.model_cfg
    row = {  # params / nonembed_params follow once the model is built
        "arch": mc.name, "tokens": plan.tokens, "flops": plan.flops, "size": mc.size, "d_model": mc.d_model,
        "n_layers": mc.n_layers, "pattern": mc.pattern, "objective": mc.objective,
        "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size, "lr": plan.peak_lr,
        "seed": cfg.seed, "steps": plan.steps, "budget": budget, "sweep": sweep,
        "corpus": corpus.name, "corpus_sha256": corpus.sha256,
        "eval_samples": mc.diffusion.eval_samples if mc.objective == "diffusion" else 1,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    claim = db.claim(run_id, row)
    if claim == "done":
        print(f"{run_id}: already done, skipping", file=sys.stderr)
        return db.get(run_id)
    if claim == "busy":
        raise ConfigError(f"run {run_id} is being trained by another live process; wait for it or kill it")
    prior_wall = float((db.get(run_id) or {}).get("wall_s") or 0.0)  # earlier, interrupted attempts
    t0 = time.time()
    try:
        with db.beating(run_id):
            # Built after the claim: a run another process is training is not built twice, and a
            # failure while building or compiling (e.g. out of memory) lands in the row too.
            trainer = Trainer(cfg, plan, devices)
            db.update(run_id, params=trainer.n_params, nonembed_params=trainer.n_nonembed)
            return _train_claimed(cfg, plan, corpus, windows, run_id, trainer, db, sigterm, prior_wall, t0)
    except Preempted as e:
        _record_failure(db, run_id, f"preempted: {e}", prior_wall + time.time() - t0)
        raise
    except BaseException as e:  # XLA errors, out of memory, disk full, Ctrl-C: never leave it `running`
        _record_failure(db, run_id, _error_text(e), prior_wall + time.time() - t0)
        raise


def _record_failure(db: ResultsDB, run_id: str, error: str, wall: float) -> None:
    try:
        db.update(run_id, status="failed", error=error, eval_bpb=None, pid=None, heartbeat=time.time(), wall_s=wall)
    except Exception as e:  # noqa: BLE001 - the original exception matters more; mark_dead catches the row later
        print(f"warning: could not mark run {run_id} failed in the results database ({e})", file=sys.stderr)


def _train_claimed(cfg, plan: Plan, corpus, windows, run_id: str, trainer: Trainer, db: ResultsDB,
                   sigterm: _SigtermFlag, prior_wall: float, t0: float) -> dict:
    from sweeps import checkpoint as ckpt  # orbax: imported only once a run really starts

    mc = plan.model_cfg
    rdir = run_dir(cfg, run_id)
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (rdir / "corpus.json").write_text(json.dumps(corpus.describe(), indent=1))

    checkpointer = ckpt.Checkpointer(rdir / "ckpt", cfg.train.keep_checkpoints, owner=True)
    writer = bar = None
    try:
        params, opt_state = trainer.init_state()
        start = 0
        restored = checkpointer.restore_latest(*trainer.abstract_state())
        if restored is not None:
            start, params, opt_state = restored
            print(f"{run_id}: resumed from step {start}", file=sys.stderr)
        metrics_path = rdir / "metrics.jsonl"
        _truncate_jsonl(metrics_path, start)
        db.drop_evals_after(run_id, start)
        if sigterm.hit:
            raise Preempted(f"{run_id}: SIGTERM before training started; nothing new to save, "
                            f"re-run the same command to resume from step {start}")

        eval_every = cfg.train.eval_every or max(1, plan.steps // max(1, cfg.train.evals))
        if cfg.train.tensorboard:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(str(rdir / "tb"), purge_step=start + 1 if start else None)
        from tqdm import tqdm

        bar = tqdm(total=plan.steps, initial=start, unit="step", dynamic_ncols=True, disable=not cfg.train.progress,
                   desc=run_id[:40], file=sys.stderr, mininterval=1.0)
        last_ckpt = time.time()
        timed_tokens, timed_since = 0, time.time()
        eval_bpb, error = None, None
        every_steps = cfg.train.checkpoint_every_steps
        try:
            with metrics_path.open("a") as log:
                for step in range(start, plan.steps):
                    batch = train_batch(corpus, cfg.seed, step, cfg.train.batch_size, cfg.train.seq_len)
                    params, opt_state, m = trainer.step(params, opt_state, batch, step)
                    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                    done_steps = step + 1
                    if not math.isfinite(loss) or not math.isfinite(gnorm):
                        what = "loss" if not math.isfinite(loss) else "gradient norm"
                        raise Diverged(f"non-finite {what} at step {done_steps} (loss={loss}, grad_norm={gnorm}); "
                                       "try a lower optim.lr")
                    timed_tokens += plan.tokens_per_step
                    rec = {"step": done_steps, "tokens": done_steps * plan.tokens_per_step, "loss": loss,
                           "grad_norm": gnorm, "lr": float(trainer.lr_schedule(step))}
                    is_eval = done_steps % eval_every == 0 or done_steps == plan.steps
                    if is_eval:
                        eval_bpb = trainer.evaluate(params, windows)
                        rec["eval_bpb"] = eval_bpb
                        db.add_eval(run_id, done_steps, rec["tokens"],
                                    done_steps * plan.tokens_per_step * plan.flops_per_token, eval_bpb, loss)
                    if is_eval or done_steps % cfg.train.log_every == 0:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        if writer is not None:
                            for k, v in rec.items():
                                if k != "step":
                                    writer.add_scalar(k, v, done_steps)
                    now = time.time()
                    tps = timed_tokens / max(1e-9, now - timed_since)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}",
                                    **({"bpb": f"{eval_bpb:.3f}"} if eval_bpb is not None else {}), refresh=False)
                    bar.update(1)
                    if done_steps == plan.steps:
                        break  # the final checkpoint follows (also when SIGTERM came with the last step)
                    if sigterm.hit:
                        checkpointer.save(done_steps, params, opt_state)
                        checkpointer.wait()
                        raise Preempted(f"{run_id}: SIGTERM at step {done_steps}; checkpoint saved, "
                                        "re-run the same command to resume")
                    due = (now - last_ckpt >= cfg.train.checkpoint_every_s) or (
                        every_steps and done_steps % every_steps == 0)
                    if due:
                        checkpointer.save(done_steps, params, opt_state)
                        last_ckpt = now
                    checkpointer.poll()
            if eval_bpb is None:  # resumed from the final checkpoint: nothing left to train
                eval_bpb = trainer.evaluate(params, windows)
            checkpointer.save(plan.steps, params, opt_state)  # the trained model, for sampling
            checkpointer.wait()
        except Diverged as e:
            error = str(e)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        checkpointer.close()
    final = {
        "status": "failed" if error else "done", "error": error, "eval_bpb": None if error else eval_bpb,
        "wall_s": prior_wall + time.time() - t0,
        "tokens_per_s": timed_tokens / max(1e-9, time.time() - timed_since) if timed_tokens else None,
        "pid": None, "heartbeat": time.time(),
    }
    db.update(run_id, **final)
    result = db.get(run_id)
    (rdir / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    if error:
        print(f"{run_id}: FAILED: {error}", file=sys.stderr)
    else:
        print(f"{run_id}: done, held-out {'NELBO bound ' if mc.objective == 'diffusion' else ''}"
              f"{eval_bpb:.4f} bits/byte", file=sys.stderr)
    return result
