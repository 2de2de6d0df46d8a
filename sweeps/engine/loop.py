"""One run, end to end: from a typed config to a results row.

Order of work is deliberate: plan and validate everything (model shape, data, windows, budget,
mesh, memory) before anything is written or compiled, so a typo costs seconds; then claim the
row (and the run's lock), build, restore the newest good checkpoint, train with deterministic
batches and RNG, evaluate held-out bits per byte, checkpoint, and record.

Interrupts keep their progress: the first SIGTERM (preemption) or Ctrl-C saves a checkpoint at
the next step boundary and stops with `Preempted` / `Interrupted` (exit 143 / 130); re-running
the same command resumes to exactly the metrics of an uninterrupted run. A second Ctrl-C exits
at once (the row is then recognised as interrupted by its free lock, and resumes from the last
checkpoint).

A run may span several processes (sweeps.engine.distributed): each feeds its own rows of every
batch; process 0 alone claims the row, holds the lock and writes the row, metrics, TensorBoard,
profile and report; checkpoints are saved by all together; decisions that start a collective
(stop, save) are agreed by all processes at every step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
from omegaconf import OmegaConf

from archs.errors import ConfigError
from archs.mixers import model_state_bytes
from archs.sizes import pattern_shortfall
from sweeps.config import Config, Role
from sweeps.engine.checkpoint import Checkpointer
from sweeps.engine.dataset import AnyDataset, EvalWindows, open_dataset
from sweeps.engine.distributed import any_process, barrier, broadcast, initialize, is_primary
from sweeps.engine.interrupts import Interrupted, Preempted, StopSignals
from sweeps.engine.liveness import run_dir
from sweeps.engine.plan import DIFFUSION, Plan, config_hash, plan_run, run_id_for
from sweeps.engine.profiling import StepProfiler
from sweeps.engine.records import EvalRecord, ResultsDB
from sweeps.engine.trainer import Trainer, schedule_steps


class Diverged(Exception):
    """Non-finite loss or gradients."""


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
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def check_root(root: str) -> Path:
    """ROOT must be a directory that exists or can be created."""
    p = Path(os.path.expanduser(root))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"root={root} is an existing file, not a directory; choose another root=")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"root={root} cannot be created ({e.strerror or e}); choose a writable root=") from None
    if not os.access(p, os.W_OK):
        raise ConfigError(f"root={root} is not writable; choose a writable root=")
    return p


def train(cfg: Config, *, devices=None) -> dict:
    """Train one model as configured and record it. Returns the results row.

    Raises ConfigError (bad input, detected before anything is written or compiled), Preempted
    (SIGTERM) and Interrupted (Ctrl-C) after saving a checkpoint (the row is then `failed` with a
    resumable error until re-run). Divergence is recorded as a failed row and returned, not
    raised, so sweeps go on. Any other exception marks the row failed with its text and propagates.
    """
    initialize(cfg.dist)  # several processes: jax.distributed starts before anything else uses JAX
    devices = list(devices if devices is not None else jax.devices())
    plan = plan_run(cfg, len(devices), devices[0].platform)
    shortfall = pattern_shortfall(plan.model_cfg)
    if shortfall:
        print(f"warning: {shortfall}", file=sys.stderr)
    dataset = open_dataset(cfg.data)
    windows = dataset.eval_windows(cfg.train.seq_len, cfg.train.eval_windows)
    if len(windows.tokens) < plan.n_batch_devices:
        raise ConfigError(
            f"only {len(windows.tokens)} held-out windows of train.seq_len={cfg.train.seq_len} tokens, fewer than the "
            f"{plan.n_batch_devices} devices of the data axes; raise train.eval_windows, use more held-out data or "
            "fewer devices"
        )
    run_id = cfg.run_id or run_id_for(cfg)
    if cfg.role == Role.branch:
        _check_trunk(cfg, plan)
    check_root(cfg.root)
    digest = config_hash(cfg)
    with StopSignals() as signals:
        return _claim_and_train(cfg, plan, dataset, windows, run_id, digest, devices, signals)


def _open_db(cfg: Config, run_id: str, digest: str) -> ResultsDB:
    db = ResultsDB(cfg.root)
    existing = db.get(run_id)
    if cfg.run_id and existing is not None and existing.get("config_hash") not in (None, digest):
        raise ConfigError(f"run_id={run_id} belongs to a run of another config in {db.path}; drop run_id= (ids are "
                          "derived from the config) or choose a new one")
    return db


def fork_step(cfg: Config, plan: Plan) -> int:
    """The trunk step a cooldown branch starts from: where its own decay begins."""
    return plan.steps - schedule_steps(cfg.optim, plan.steps)[1]


def _check_trunk(cfg: Config, plan: Plan) -> None:
    """A branch's trunk must have a committed checkpoint at the fork step (checked again, with
    checksums, when it is read)."""
    fork = fork_step(cfg, plan)
    if fork < 1:
        raise ConfigError(f"optim.decay_steps={cfg.optim.decay_steps} leaves no trunk steps to fork from in a run of "
                          f"{plan.steps} steps")
    if not (run_dir(cfg.root, cfg.train.branch_from) / "ckpt.integrity" / f"{fork}.json").is_file():
        raise ConfigError(f"trunk {cfg.train.branch_from} has no committed checkpoint at step {fork} in {cfg.root}; "
                          "train the trunk first (the sweep does it before its branches)")


def _row_fields(cfg: Config, plan: Plan, dataset: AnyDataset, digest: str) -> dict:
    mc = plan.model_cfg
    own_steps = plan.steps - fork_step(cfg, plan) if cfg.role == Role.branch else plan.steps
    return {
        "arch": mc.name, "tokens": plan.tokens, "flops": plan.flops, "size": mc.size, "d_model": mc.d_model,
        "n_layers": mc.n_layers, "pattern": mc.pattern, "objective": str(mc.objective),
        "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size, "lr": plan.peak_lr,
        "seed": cfg.seed, "steps": plan.steps, "budget": cfg.budget,
        "sweep": cfg.sweep.name if cfg.sweep.name != "none" else None,
        "corpus": dataset.name, "corpus_sha256": dataset.sha256,
        "eval_samples": mc.diffusion.eval_samples if mc.objective in DIFFUSION else 1,
        "state_bytes": model_state_bytes(mc, cfg.train.seq_len),
        "config": dataclasses.asdict(cfg), "config_hash": digest,
        "params": plan.params, "nonembed_params": plan.nonembed_params, "active_params": plan.active_params,
        "tokenizer": dataset.tokenizer, "vocab_size": mc.vocab_size,
        "epochs": plan.tokens / max(1, dataset.train_tokens) if dataset.train_tokens else None,
        "role": str(cfg.role), "trunk_id": cfg.train.branch_from or None,
        "compute_spent": plan.flops * own_steps / plan.steps,  # a branch adds only its cooldown
    }


_CLAIMS = ("claimed", "done", "busy")


def _claim_and_train(cfg: Config, plan: Plan, dataset: AnyDataset, windows: EvalWindows, run_id: str, digest: str,
                     devices, signals: StopSignals) -> dict:
    # Process 0 claims the row and holds the lock; the others learn its decision.
    db, lock, claim, prior_wall = None, None, "claimed", 0.0
    if is_primary():
        try:
            db = _open_db(cfg, run_id, digest)
            for dead in db.mark_dead():
                if dead != run_id:
                    print(f"warning: run {dead} was left running by a process that is gone; marked failed "
                          "(re-run its command to resume it)", file=sys.stderr)
            claim, lock = db.claim(run_id, _row_fields(cfg, plan, dataset, digest))
        except BaseException:
            broadcast(-1)  # the other processes stop too
            raise
        prior_wall = float((db.get(run_id) or {}).get("wall_s") or 0.0)  # earlier, interrupted attempts
    code = broadcast(_CLAIMS.index(claim))
    if code < 0:
        raise ConfigError(f"process 0 of run {run_id} stopped before training; its output says why")
    claim = _CLAIMS[code]
    if claim == "done":
        print(f"{run_id}: already done, skipping", file=sys.stderr)
        return db.get(run_id) if db is not None else {"run_id": run_id, "status": "done", "eval_bpb": None,
                                                       "flops": plan.flops, "error": None}
    if claim == "busy":
        raise ConfigError(f"run {run_id} is being trained by another live process; wait for it or stop it")
    t0 = time.time()
    try:
        # Built after the claim: a run another process is training is not built twice, and a
        # failure while building or compiling (e.g. out of memory) lands in the row too.
        trainer = Trainer(cfg, plan, devices)
        return _train_claimed(cfg, plan, dataset, windows, run_id, trainer, db, signals, prior_wall, t0)
    except (Preempted, Interrupted) as e:
        kind = "preempted" if isinstance(e, Preempted) else "interrupted"
        _record_failure(db, run_id, f"{kind}: {e}", prior_wall + time.time() - t0)
        raise
    except BaseException as e:  # XLA errors, out of memory, disk full: never leave it `running`
        _record_failure(db, run_id, _error_text(e), prior_wall + time.time() - t0)
        raise
    finally:
        if lock is not None:
            lock.release()


def _record_failure(db: ResultsDB | None, run_id: str, error: str, wall: float) -> None:
    if db is None:  # not process 0
        return
    try:
        db.update(run_id, status="failed", error=error, eval_bpb=None, pid=None, wall_s=wall)
    except Exception as e:  # noqa: BLE001 - the original exception matters more; mark_dead catches the row later
        print(f"warning: could not mark run {run_id} failed in the results database ({e})", file=sys.stderr)


def _train_claimed(cfg: Config, plan: Plan, dataset: AnyDataset, windows: EvalWindows, run_id: str, trainer: Trainer,
                   db: ResultsDB | None, signals: StopSignals, prior_wall: float, t0: float) -> dict:
    mc = plan.model_cfg
    primary = db is not None  # process 0 writes; the others only compute and checkpoint
    rdir = run_dir(cfg.root, run_id)
    if primary:
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        (rdir / "corpus.json").write_text(json.dumps(dataset.describe(), indent=1))
    barrier("run directory")

    checkpointer = Checkpointer(rdir / "ckpt", cfg.train.keep_checkpoints, owner=True,
                                keep_steps=cfg.train.keep_steps)
    keep_steps = set(cfg.train.keep_steps)
    profiler = StepProfiler(rdir / "profile", cfg.train.profile_steps, enabled=primary)
    writer = bar = None

    def save(step: int) -> None:
        checkpointer.save(step, *trainer.checkpoint_items(*state))

    try:
        state = trainer.init_state()
        start = 0
        restored = checkpointer.restore_latest(*trainer.abstract_checkpoint())
        if restored is not None:
            start, model_state, opt_state = restored
            state = trainer.from_checkpoint(model_state, opt_state)
            print(f"{run_id}: resumed from step {start}", file=sys.stderr)
        elif cfg.role == Role.branch:  # a fresh branch starts where its trunk is at the fork step
            start = fork_step(cfg, plan)
            trunk = Checkpointer(run_dir(cfg.root, cfg.train.branch_from) / "ckpt")
            try:
                state = trainer.from_checkpoint(*trunk.restore_step(start, *trainer.abstract_checkpoint()))
            finally:
                trunk.close()
            print(f"{run_id}: branched from trunk {cfg.train.branch_from} at step {start}", file=sys.stderr)
        metrics_path = rdir / "metrics.jsonl" if primary else Path(os.devnull)
        if primary:
            _truncate_jsonl(metrics_path, start)
            db.drop_evals_after(run_id, start)
        if any_process(signals.hit)[0]:
            raise signals.stop(run_id, start, saved=False)

        eval_every = cfg.train.eval_every or max(1, plan.steps // max(1, cfg.train.evals))
        if cfg.train.tensorboard and primary:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(str(rdir / "tb"), purge_step=start + 1 if start else None)
        from tqdm import tqdm

        bar = tqdm(total=plan.steps, initial=start, unit="step", dynamic_ncols=True,
                   desc=run_id[:40], file=sys.stderr, mininterval=1.0, disable=not (cfg.train.progress and primary))
        last_ckpt = time.time()
        timed_tokens, timed_since = 0, time.time()
        eval_bpb, eval_acc, error = None, None, None

        def evaluate(state):
            acc = trainer.recall(state, windows.tokens, windows.answers) if windows.answers is not None else None
            return trainer.evaluate(state, windows.tokens, windows.bytes), acc

        every_steps = cfg.train.checkpoint_every_steps
        try:
            with metrics_path.open("a") as log:
                for step in range(start, plan.steps):
                    batch = dataset.train_batch(cfg.seed, step, cfg.train.batch_size, cfg.train.seq_len,
                                                rows=trainer.rows)
                    profiler.begin(step + 1)
                    state, m = trainer.step(state, batch, step)
                    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                    profiler.end(step + 1)
                    done_steps = step + 1
                    if not math.isfinite(loss) or not math.isfinite(gnorm):
                        what = "loss" if not math.isfinite(loss) else "gradient norm"
                        raise Diverged(f"non-finite {what} at step {done_steps} (loss={loss}, grad_norm={gnorm}); "
                                       "try a lower optim.lr")
                    timed_tokens += plan.tokens_per_step
                    rec = {"step": done_steps, "tokens": done_steps * plan.tokens_per_step, "loss": loss,
                           "grad_norm": gnorm, "lr": float(trainer.lr_schedule(step)),
                           **{k: float(v) for k, v in m.items() if k not in ("loss", "grad_norm")}}
                    is_eval = done_steps % eval_every == 0 or done_steps == plan.steps
                    if is_eval:
                        eval_bpb, eval_acc = evaluate(state)
                        rec["eval_bpb"] = eval_bpb
                        if eval_acc is not None:
                            rec["eval_acc"] = eval_acc
                        if primary:
                            db.add_eval(EvalRecord(run_id, done_steps, rec["tokens"],
                                                   done_steps * plan.tokens_per_step * plan.flops_per_token,
                                                   eval_bpb, loss, eval_acc))
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
                        break  # the final checkpoint follows (also when a signal came with the last step)
                    due = (now - last_ckpt >= cfg.train.checkpoint_every_s) or done_steps in keep_steps or (
                        every_steps and done_steps % every_steps == 0)
                    hit, due = any_process(signals.hit, due)  # every process stops / saves at the same step
                    if hit:
                        save(done_steps)
                        checkpointer.commit()
                        raise signals.stop(run_id, done_steps, saved=True)
                    if due:
                        save(done_steps)
                        last_ckpt = now
                    checkpointer.poll()
            if eval_bpb is None:  # resumed from the final checkpoint: nothing left to train
                eval_bpb, eval_acc = evaluate(state)
            save(plan.steps)  # the trained model, for sampling
            checkpointer.commit()
        except Diverged as e:
            error = str(e)
    finally:
        profiler.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        checkpointer.close()
    final = {
        "status": "failed" if error else "done", "error": error, "eval_bpb": None if error else eval_bpb,
        "eval_acc": None if error else eval_acc,
        "wall_s": prior_wall + time.time() - t0,
        "tokens_per_s": timed_tokens / max(1e-9, time.time() - timed_since) if timed_tokens else None,
        "pid": None,
    }
    if not primary:
        return {"run_id": run_id, "flops": plan.flops, **final}
    db.update(run_id, **final)
    result = db.get(run_id)
    (rdir / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    if error:
        print(f"{run_id}: FAILED: {error}", file=sys.stderr)
    else:
        print(f"{run_id}: done, held-out {'NELBO bound ' if mc.objective in DIFFUSION else ''}"
              f"{eval_bpb:.4f} bits/byte{f', recall {eval_acc:.3f}' if eval_acc is not None else ''}",
              file=sys.stderr)
    return result
