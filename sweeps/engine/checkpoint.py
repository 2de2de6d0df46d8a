"""Orbax checkpoints of (params, optimizer state), committed by an integrity record.

Orbax saves each step asynchronously into a temporary directory and renames it to `<step>` when
every file is written. A step counts as a checkpoint only once it is committed: after Orbax has
finished, a record of every file's size and sha256 is written atomically next to the checkpoint
directory (`<dir>.integrity/<step>.json`). A restore verifies the newest committed step against
its record before Orbax reads anything and never tries an uncommitted or mismatching one, so a
truncated or corrupted checkpoint is skipped with one warning line, and Orbax never reads a
damaged file (Orbax itself does not checksum array data: a flipped byte would restore silently).

The trainer that owns the run directory moves skipped checkpoints aside (`<dir>.unreadable/`)
so the resumed run can save those steps again; readers (sampling, cooldown branches reading
their trunk) leave the directory untouched. Steps listed in `keep` (a trunk's fork steps) are
never garbage-collected.

A run over several processes saves and restores collectively: every process writes its shards
(Orbax), and after a barrier process 0 alone writes the integrity record; process 0 alone
verifies and picks the checkpoint to restore, and every process restores that step. Whether a
finished save is committed now (`poll`) is agreed by all processes, as commit is collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from archs.errors import ConfigError

from sweeps.engine.distributed import any_process, barrier, broadcast, is_primary


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2, *, owner: bool = False, keep_steps=()):
        self.directory = Path(directory).resolve()
        self.records = self.directory.parent / (self.directory.name + ".integrity")
        self.aside = self.directory.parent / (self.directory.name + ".unreadable")
        self.owner = owner
        self.writer = owner and is_primary()  # writes integrity records, moves bad steps aside
        self._pending: list[int] = []  # saved by Orbax, not yet committed
        latest = checkpoint_managers.LatestN(n=max(2, keep))  # a fallback for a damaged newest one
        policy = checkpoint_managers.AnyPreservationPolicy(
            [latest, checkpoint_managers.CustomSteps(steps=list(keep_steps))]) if keep_steps else latest
        self.mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy,
                enable_async_checkpointing=True,
                create=owner,
                cleanup_tmp_directories=owner,
                read_only=not owner,
                save_interval_steps=1 if owner else 0,  # a reader never saves
            ),
        )

    # --- saving ---------------------------------------------------------------------------------

    def save(self, step: int, params, opt_state) -> bool:
        """Start an asynchronous save of `step`; False (nothing done) if that step exists."""
        if step in self.mngr.all_steps():
            return False
        self.commit()  # Orbax waits for the previous save here anyway: commit it first
        self.mngr.save(step, args=ocp.args.StandardSave({"params": params, "opt": opt_state}), force=True)
        self._pending.append(step)
        return True

    def poll(self) -> None:
        """Cheap; call often (every process at the same steps). Commits a save that has finished."""
        if self._pending and not any_process(self.mngr.is_saving_in_progress())[0]:
            self.commit()

    def commit(self) -> None:
        """Wait for Orbax (every process), then write the integrity record of every finished save."""
        if not self._pending:
            return
        self.mngr.wait_until_finished()
        barrier("checkpoint written")  # every process's shards are on disk
        self.mngr.reload()
        steps = set(self.mngr.all_steps())
        pending, self._pending = self._pending, []
        if not self.writer:
            return
        for step in pending:
            if step in steps:
                self._write_record(step)
        for rec in self.records.glob("*.json") if self.records.is_dir() else ():
            if rec.stem.isdigit() and int(rec.stem) not in steps:  # Orbax has deleted that step
                rec.unlink(missing_ok=True)

    def _write_record(self, step: int) -> None:
        root = self.directory / str(step)
        files = {p.relative_to(root).as_posix(): [p.stat().st_size, _sha256(p)]
                 for p in sorted(root.rglob("*")) if p.is_file()}
        self.records.mkdir(parents=True, exist_ok=True)
        tmp = self.records / f".{step}.json.tmp"
        tmp.write_text(json.dumps({"step": step, "files": files}))
        os.replace(tmp, self.records / f"{step}.json")

    # --- restoring ------------------------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        """Steps with an integrity record, newest first."""
        return sorted((s for s in self.mngr.all_steps() if (self.records / f"{s}.json").is_file()), reverse=True)

    def verify(self, step: int) -> str | None:
        """None if every file of `step` matches its record, else what is wrong."""
        try:
            files = json.loads((self.records / f"{step}.json").read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"its integrity record is unreadable ({type(e).__name__})"
        root = self.directory / str(step)
        for rel, (size, digest) in files.items():
            p = root / rel
            if not p.is_file():
                return f"{rel} is missing"
            if p.stat().st_size != size:
                return f"{rel} is {p.stat().st_size} bytes, {size} were written (truncated?)"
            if _sha256(p) != digest:
                return f"{rel} does not match its checksum (corrupt)"
        if sum(1 for p in root.rglob("*") if p.is_file()) != len(files):
            return "it holds files its record does not list"
        return None

    def _set_aside(self, step: int, why: str) -> None:
        print(f"warning: checkpoint at step {step} is unreadable ({why}); trying the previous one", file=sys.stderr)
        if not self.writer:
            return
        src = self.directory / str(step)
        if src.exists():
            self.aside.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(self.aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
        (self.records / f"{step}.json").unlink(missing_ok=True)
        self.mngr.reload()

    def _newest_good_step(self) -> int:
        """The newest committed step that verifies, or -1. Steps Orbax finished but we never
        committed (a kill between the two) are not tried."""
        if self.owner:
            committed = set(self.committed_steps())
            for step in sorted(set(self.mngr.all_steps()) - committed, reverse=True):
                self._set_aside(step, "its save was never committed: the run stopped while saving")
        for step in self.committed_steps():
            why = self.verify(step)
            if why:
                self._set_aside(step, why)
                continue
            return step
        return -1

    def _newest_good(self, restore_one):
        """(step, restore_one(step)) for the newest good step, or None. Process 0 picks the step
        (and moves bad ones aside); every process restores that one."""
        step = broadcast(self._newest_good_step() if is_primary() else -1)
        barrier("checkpoint chosen")
        self.mngr.reload()
        return None if step < 0 else (step, restore_one(step))

    def restore_latest(self, abstract_params, abstract_opt):
        """(step, params, opt_state) from the newest good checkpoint, or None."""
        target = {"params": abstract_params, "opt": abstract_opt}
        got = self._newest_good(lambda step: self.mngr.restore(step, args=ocp.args.StandardRestore(target)))
        return None if got is None else (got[0], got[1]["params"], got[1]["opt"])

    def restore_step(self, step: int, abstract_params, abstract_opt):
        """(params, opt_state) of exactly `step`, verified against its record first (a cooldown
        branch forking from its trunk). ConfigError if that step is not a good checkpoint."""
        if step not in self.committed_steps():
            raise ConfigError(f"{self.directory} has no committed checkpoint at step {step}; train its run to that "
                              "step first (for a cooldown branch: its trunk)")
        why = self.verify(step)
        if why:
            raise ConfigError(f"checkpoint {self.directory / str(step)} is damaged ({why}); re-train its run")
        target = {"params": abstract_params, "opt": abstract_opt}
        got = self.mngr.restore(step, args=ocp.args.StandardRestore(target))
        return got["params"], got["opt"]

    def restore_params(self, abstract_params):
        """Parameters only (sampling, evaluation), from the newest good checkpoint, or None."""
        # StandardRestore insists on the whole saved tree; a subtree restores through
        # PyTreeRestore(partial_restore=True), which a manager that saved with StandardSave refuses
        # for the same item: the partial restore goes through a separate read-only manager.
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        reader = ocp.CheckpointManager(self.directory,
                                       options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0))
        try:
            got = self._newest_good(lambda step: reader.restore(step, args=args))
            return None if got is None else (got[0], got[1]["params"])
        finally:
            reader.close()

    def wait(self) -> None:
        self.commit()

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.mngr.close()
