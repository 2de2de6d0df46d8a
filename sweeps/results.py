"""The results database: ROOT/results.sqlite, one row per training run in table `runs`.

SQLite in WAL mode with a busy timeout and short IMMEDIATE transactions, so parallel jobs
(joblib workers, separate processes started by hand) never lose or duplicate a row and a job
killed mid-write leaves the database consistent (SQLite's journal rolls the write back).
Each `running` row records its process (host, pid) and a heartbeat (kept fresh by a background
thread while the run lives, through compilation and evaluation too), so rows of dead jobs are
recognised instead of blocking their run forever: same host, the pid is gone or now belongs to a
younger process; another host, no heartbeat for STALE_AFTER_S. `mark_dead` (called when a run
starts and when the report loads the database) turns them into `failed` rows whose error starts
with "interrupted"; preempted runs (SIGTERM) are `failed` with "preempted". `is_resumable` tells
a sweep which rows to launch again (those two, and dead `running` rows) and which failures are
final (divergence, errors inside training: re-run with sweep.retry_failed=true).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    arch TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed', 'running')),
    params INTEGER,
    nonembed_params INTEGER,
    tokens INTEGER,
    flops REAL,
    eval_bpb REAL,
    error TEXT,
    size TEXT,
    d_model INTEGER,
    n_layers INTEGER,
    pattern TEXT,
    objective TEXT,
    seq_len INTEGER,
    batch_size INTEGER,
    lr REAL,
    seed INTEGER,
    steps INTEGER,
    budget REAL,
    sweep TEXT,
    corpus TEXT,
    corpus_sha256 TEXT,
    eval_samples INTEGER,
    tokens_per_s REAL,
    wall_s REAL,
    host TEXT,
    pid INTEGER,
    heartbeat REAL,
    created_at REAL,
    updated_at REAL,
    config TEXT
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    tokens INTEGER,
    flops REAL,
    eval_bpb REAL,
    train_loss REAL,
    PRIMARY KEY (run_id, step)
);
"""

COLUMNS = [
    "run_id", "arch", "status", "params", "nonembed_params", "tokens", "flops", "eval_bpb", "error",
    "size", "d_model", "n_layers", "pattern", "objective", "seq_len", "batch_size", "lr", "seed", "steps",
    "budget", "sweep", "corpus", "corpus_sha256", "eval_samples", "tokens_per_s", "wall_s", "host", "pid",
    "heartbeat", "created_at", "updated_at", "config",
]
STALE_AFTER_S = 600.0  # a running row on another host with no heartbeat for this long is dead
HEARTBEAT_S = 30.0


class ResultsDB:
    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA synchronous=NORMAL")
        con.row_factory = sqlite3.Row
        return con

    @contextmanager
    def _tx(self):
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    def get(self, run_id: str) -> dict | None:
        con = self._connect()
        try:
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        finally:
            con.close()
        return dict(row) if row else None

    def rows(self, where: str = "", args: tuple = ()) -> list[dict]:
        con = self._connect()
        try:
            cur = con.execute(f"SELECT * FROM runs {where} ORDER BY created_at, run_id", args)
            return [dict(r) for r in cur.fetchall()]
        finally:
            con.close()

    def evals(self, run_id: str) -> list[dict]:
        con = self._connect()
        try:
            cur = con.execute("SELECT * FROM evals WHERE run_id = ? ORDER BY step", (run_id,))
            return [dict(r) for r in cur.fetchall()]
        finally:
            con.close()

    def claim(self, run_id: str, fields: dict) -> str:
        """Atomically start (or resume) a run. Returns 'done' if the run already finished,
        'busy' if a live process is running it, else 'claimed' (the row is now ours)."""
        now = time.time()
        with self._tx() as con:
            row = con.execute("SELECT status, host, pid, heartbeat FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None and row["status"] == "done":
                return "done"
            if row is not None and row["status"] == "running" and _alive(row["host"], row["pid"], row["heartbeat"], now):
                return "busy"
            values = dict(fields, run_id=run_id, status="running", error=None, host=socket.gethostname(),
                          pid=os.getpid(), heartbeat=now, updated_at=now)
            if row is None:
                values["created_at"] = now
                values = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in values.items()}
                cols = [c for c in COLUMNS if c in values]
                con.execute(
                    f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [values[c] for c in cols],
                )
            else:
                self._update(con, run_id, values)
            return "claimed"

    def update(self, run_id: str, **fields) -> None:
        fields["updated_at"] = time.time()
        with self._tx() as con:
            self._update(con, run_id, fields)

    def heartbeat(self, run_id: str) -> None:
        self.update(run_id, heartbeat=time.time())

    @contextmanager
    def beating(self, run_id: str, every: float = HEARTBEAT_S):
        """Keep `run_id`'s heartbeat fresh from a daemon thread while the body runs (also
        through long compilations and evaluations, when the training loop cannot)."""
        stop = threading.Event()

        def beat():
            while not stop.wait(every):
                try:
                    self.heartbeat(run_id)
                except sqlite3.Error as e:  # a busy or briefly unavailable database: try again later
                    print(f"warning: heartbeat of {run_id} failed ({e})", file=sys.stderr)

        thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5.0)

    def add_eval(self, run_id: str, step: int, tokens: int, flops: float, eval_bpb: float, train_loss: float | None):
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO evals (run_id, step, tokens, flops, eval_bpb, train_loss) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, step, tokens, flops, eval_bpb, train_loss),
            )

    def drop_evals_after(self, run_id: str, step: int) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM evals WHERE run_id = ? AND step > ?", (run_id, step))

    def mark_dead(self) -> list[str]:
        """Mark `running` rows whose process is gone as failed (resumable: re-running resumes them)."""
        now, dead = time.time(), []
        with self._tx() as con:
            for r in con.execute("SELECT run_id, host, pid, heartbeat FROM runs WHERE status = 'running'").fetchall():
                if not _alive(r["host"], r["pid"], r["heartbeat"], now):
                    dead.append(r["run_id"])
                    self._update(con, r["run_id"], {
                        "status": "failed", "updated_at": now,
                        "error": "interrupted: its process died; re-run the same command to resume from its last checkpoint",
                    })
        return dead

    @staticmethod
    def _update(con, run_id: str, fields: dict) -> None:
        fields = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items() if k != "run_id"}
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown results columns {sorted(unknown)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*fields.values(), run_id])


# `failed` rows whose error starts with one of these were stopped from outside (SIGTERM, a dead
# process, Ctrl-C), not by their own training: re-running resumes them from their checkpoint.
INTERRUPTED_PREFIXES = ("interrupted", "preempted")


def is_resumable(row: dict | None, now: float | None = None) -> bool:
    """Should a sweep (re)launch this row's run? True for no row, a `running` row whose process
    is gone, and a `failed` row that was interrupted rather than failed by itself (divergence,
    an error in training: those are final unless retried on purpose)."""
    if row is None:
        return True
    if row["status"] == "running":
        return not _alive(row.get("host"), row.get("pid"), row.get("heartbeat"), time.time() if now is None else now)
    if row["status"] == "failed":
        return str(row.get("error") or "").startswith(INTERRUPTED_PREFIXES)
    return False


def _process_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in epoch seconds) of process `pid` from /proc; None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        return fields[0], btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(host: str | None, pid: int | None, heartbeat: float | None, now: float) -> bool:
    """Is the process that owns a `running` row still at work?

    Same host: its pid exists, is not a zombie, and is not a newer process that reused the pid
    (one started after the row's last heartbeat). Another host: its heartbeat is recent (a live run beats
    every HEARTBEAT_S from a background thread, through compilation and evaluation too).
    """
    if pid is None:
        return False
    if host == socket.gethostname():
        if pid == os.getpid():
            return False  # our own stale row (an earlier attempt in this process)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        proc = _process_state(pid)
        if proc is not None:
            state, started = proc
            if state in ("Z", "X"):
                return False  # killed, not yet reaped by its parent
            if heartbeat is not None and started > heartbeat + 5.0:
                return False  # the pid was reused by a process younger than the row's last heartbeat
        return True
    return heartbeat is not None and now - heartbeat < STALE_AFTER_S
