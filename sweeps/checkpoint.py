"""Orbax checkpoints of (params, optimizer state), saved asynchronously and atomically.

Atomicity: Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>`
only when every file is written (AtomicRenameTemporaryPath, the default on local and network
file systems), so an interrupted save never becomes the newest checkpoint; temporary
directories are ignored by the step listing and removed by the owning trainer on start.

Integrity: Orbax does not checksum array data (a flipped byte in a data file restores silently
as garbage; truncated files do fail). So once a save has finished, a manifest of every file's
size and sha256 is written next to the checkpoint directory (`<dir>.integrity/<step>.json`,
itself written atomically) and checked before a restore. Restores go against an abstract target
(shapes, dtypes and shardings), newest first; a checkpoint that fails its manifest or cannot be
read is skipped with a one-line warning and the one before it is used. The trainer (the only
writer of its run directory) also moves such a checkpoint aside (`<dir>.unreadable/`), so the
resumed run can save that step again.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import orbax.checkpoint as ocp


class _DropUnretrievedTaskErrors(logging.Filter):
    """Orbax restores run on asyncio; after a failed restore (which we report ourselves) the
    abandoned sibling tasks print 'Task exception was never retrieved' with a full traceback."""

    def filter(self, record):
        return "exception was never retrieved" not in str(record.msg)


_ASYNCIO_FILTER = _DropUnretrievedTaskErrors()


def _from_orbax(exc, obj=None) -> bool:
    """Whether an unraisable error (`obj` is what was being finalised) comes from Orbax's code."""
    root = str(Path(ocp.__file__).resolve().parent.parent)  # site-packages/orbax
    code = getattr(obj, "cr_code", None)  # an abandoned coroutine being garbage-collected
    if code is not None and code.co_filename.startswith(root):
        return True
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(root):
            return True
        tb = tb.tb_next
    return False


def _is_closed_loop_error(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _drop_restore_noise() -> None:
    """After a failed restore (which we report ourselves, in one line) Orbax leaves work behind
    that nobody can catch: sibling read coroutines are garbage-collected with their errors
    ('Exception ignored in <coroutine _read_array_index_and_device_put>', 'coroutine ... was
    never awaited'), and TensorStore reads still in flight call back into the closed asyncio
    loop from native threads ('Event loop is closed'). Each prints a full traceback although
    nothing is wrong: we have moved on to an older checkpoint. From the first restore attempt on,
    drop exactly those from the process's hooks (a healthy restore leaves none, so nothing real is
    lost). Everything else is still reported; in particular an Orbax error that reaches the top
    of a thread (a failed save) is not dropped: only garbage-collected Orbax coroutines
    ('unraisable') are."""
    import threading
    import warnings

    if getattr(sys, "_difflab_restore_noise_filter", False):
        return
    sys._difflab_restore_noise_filter = True
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    prev_except, prev_thread, prev_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

    def excepthook(tp, exc, tb):
        if not _is_closed_loop_error(exc):
            prev_except(tp, exc, tb)

    def thread_hook(args):
        if not _is_closed_loop_error(args.exc_value):
            prev_thread(args)

    def unraisable(args):
        if not (_is_closed_loop_error(args.exc_value) or _from_orbax(args.exc_value, args.object)):
            prev_unraisable(args)

    sys.excepthook, threading.excepthook, sys.unraisablehook = excepthook, thread_hook, unraisable


@contextlib.contextmanager
def _quiet_orbax():
    """Silence Orbax's own error logging while we try checkpoints that may be damaged."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0].split(" See full TensorStore details")[0][:200] if text else ""
    return f"{type(e).__name__}: {text}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2, *, owner: bool = False):
        """`owner=True` (the trainer holding the run's claim): remove leftover temporary
        directories of interrupted saves and move unreadable checkpoints aside. Readers
        (sampling, evaluation) leave the directory untouched."""
        logging.getLogger("absl").setLevel(logging.ERROR)
        asyncio_log = logging.getLogger("asyncio")
        if _ASYNCIO_FILTER not in asyncio_log.filters:
            asyncio_log.addFilter(_ASYNCIO_FILTER)
        self.directory = Path(directory).resolve()
        self.integrity_dir = self.directory.parent / (self.directory.name + ".integrity")
        self.unreadable_dir = self.directory.parent / (self.directory.name + ".unreadable")
        self.owner = owner
        self._unsealed: list[int] = []
        self.mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(2, keep),  # always keep a fallback for a corrupt newest one
                enable_async_checkpointing=True,
                create=True,
                cleanup_tmp_directories=owner,
            ),
        )

    # --- saving ---------------------------------------------------------------------------------

    def save(self, step: int, params, opt_state) -> bool:
        """Start an asynchronous save of `step`; False (nothing done) if that step exists."""
        if step in self.mngr.all_steps():
            return False
        if self._unsealed:  # Orbax waits for the previous save here anyway; seal it first
            self._seal()
        self.mngr.save(step, args=ocp.args.StandardSave({"params": params, "opt": opt_state}), force=True)
        self._unsealed.append(step)
        return True

    def poll(self) -> None:
        """Cheap; call often. Writes the integrity manifest of a save that has finished."""
        if self._unsealed and not self.mngr.is_saving_in_progress():
            self._seal()

    def _seal(self) -> None:
        self.mngr.wait_until_finished()
        steps = set(self.mngr.all_steps())
        for step in self._unsealed:
            if step in steps and (self.directory / str(step)).is_dir():
                self._write_manifest(step)
        self._unsealed = []
        if self.integrity_dir.is_dir():  # manifests of checkpoints Orbax has since deleted
            for m in self.integrity_dir.glob("*.json"):
                if m.stem.isdigit() and int(m.stem) not in steps:
                    m.unlink(missing_ok=True)

    def _write_manifest(self, step: int) -> None:
        root = self.directory / str(step)
        files = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                files[p.relative_to(root).as_posix()] = [p.stat().st_size, _sha256(p)]
        self.integrity_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.integrity_dir / f".{step}.json.tmp"
        tmp.write_text(json.dumps({"step": step, "files": files}))
        os.replace(tmp, self.integrity_dir / f"{step}.json")

    def check_integrity(self, step: int) -> str | None:
        """None if `step` matches its manifest (or has none yet), else what is wrong."""
        manifest = self.integrity_dir / f"{step}.json"
        if not manifest.exists():
            return None
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as e:
            return f"its integrity manifest is unreadable ({_first_line(e)})"
        root = self.directory / str(step)
        for rel, (size, digest) in files.items():
            p = root / rel
            if not p.is_file():
                return f"{rel} is missing"
            if p.stat().st_size != size:
                return f"{rel} is {p.stat().st_size} bytes, {size} were written (truncated?)"
            if _sha256(p) != digest:
                return f"{rel} does not match its checksum (corrupt)"
        return None

    # --- restoring ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps(), reverse=True)

    def _unusable(self, step: int, why: str) -> None:
        gc.collect()  # abandoned read coroutines go now, while the filter is in place
        print(f"warning: checkpoint at step {step} is unreadable ({why}); trying the previous one", file=sys.stderr)
        if not self.owner:
            return
        self.unreadable_dir.mkdir(parents=True, exist_ok=True)
        src = self.directory / str(step)
        if src.exists():
            shutil.move(str(src), str(self.unreadable_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
        (self.integrity_dir / f"{step}.json").unlink(missing_ok=True)
        self.mngr.reload()

    def _first_readable(self, restore_one):
        """(step, restore_one(step)) for the newest checkpoint that passes its integrity check
        and restores; damaged ones are reported (and set aside by the owner) on the way."""
        # The filter goes in before the first read, not after a failure: TensorStore can call back
        # into the closed loop while the failed read's exception is still unwinding (seen in CI).
        _drop_restore_noise()
        for step in self.steps():
            bad = self.check_integrity(step)
            if bad:
                self._unusable(step, bad)
                continue
            try:
                with _quiet_orbax():
                    return step, restore_one(step)
            except Exception as e:  # noqa: BLE001 - any failure means "unusable", try an older one
                self._unusable(step, _first_line(e))
        return None

    def restore_latest(self, abstract_params, abstract_opt):
        """(step, params, opt_state) from the newest readable checkpoint, or None."""
        target = {"params": abstract_params, "opt": abstract_opt}
        got = self._first_readable(lambda step: self.mngr.restore(step, args=ocp.args.StandardRestore(target)))
        return None if got is None else (got[0], got[1]["params"], got[1]["opt"])

    def restore_params(self, abstract_params):
        """Parameters only (for sampling and evaluation), newest readable checkpoint."""
        # StandardRestore insists on the whole saved tree (params and optimizer state); orbax
        # 0.12 restores a subtree only through PyTreeRestore(partial_restore=True), and a
        # manager that has saved with StandardSave refuses another handler type for the same
        # item, so the partial restore goes through a separate read-only manager.
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            got = self._first_readable(lambda step: reader.restore(step, args=args))
            return None if got is None else (got[0], got[1]["params"])
        finally:
            reader.close()

    def wait(self) -> None:
        self.mngr.wait_until_finished()
        self._seal()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.mngr.close()
