"""The results database: ROOT/results.sqlite, one row per training run in table `runs`, and the
held-out curve of every run in table `evals`.

The schema is declared once, as the dataclasses `RunRecord` and `EvalRecord`; the SQL is
generated from them, and a database written by an older version gains the columns it lacks
(columns are added, never renamed). SQLite in WAL mode with a busy timeout and short IMMEDIATE
transactions: parallel jobs never lose or duplicate a row, and a job killed mid-write leaves the
database consistent (the journal rolls the write back).

A `running` row is alive exactly while its run holds its lock (sweeps.engine.liveness).
`mark_dead` turns `running` rows whose lock is free into `failed` rows whose error starts with
"interrupted"; preempted (SIGTERM) and Ctrl-C'd runs are `failed` with "preempted" /
"interrupted". `is_resumable` tells a sweep which rows to launch again (those, and dead `running`
rows) and which failures are final (divergence, errors inside training: re-run with
sweep.retry_failed=true).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from archs.errors import ConfigError
from sweeps.engine.liveness import RunLock, is_alive


@dataclass
class RunRecord:
    """One training run. The first columns are the public contract (outside tools read them)."""

    run_id: str
    arch: str
    status: str  # done | failed | running
    params: Optional[int] = None  # all parameters
    nonembed_params: Optional[int] = None  # without the token embedding and the output head
    tokens: Optional[int] = None  # training tokens seen
    flops: Optional[float] = None  # training FLOPs by the analytic count (archs/flops.py)
    eval_bpb: Optional[float] = None  # final held-out bits per byte (diffusion: the NELBO bound)
    error: Optional[str] = None
    size: Optional[str] = None
    d_model: Optional[int] = None
    n_layers: Optional[int] = None
    pattern: Optional[str] = None
    objective: Optional[str] = None
    seq_len: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None  # peak learning rate after the width rule
    seed: Optional[int] = None
    steps: Optional[int] = None
    budget: Optional[float] = None  # the IsoFLOP budget this run belongs to
    sweep: Optional[str] = None
    corpus: Optional[str] = None
    corpus_sha256: Optional[str] = None
    eval_samples: Optional[int] = None
    tokens_per_s: Optional[float] = None
    wall_s: Optional[float] = None
    host: Optional[str] = None
    pid: Optional[int] = None
    created_at: Optional[float] = None
    updated_at: Optional[float] = None
    config: Optional[str] = None  # the run's whole config, JSON
    config_hash: Optional[str] = None  # hash of the result-affecting fields (sweeps.engine.plan.run_id)
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None
    epochs: Optional[float] = None  # training tokens / training-split tokens
    trunk_id: Optional[str] = None  # the run a cooldown branch forks from; NULL otherwise
    role: Optional[str] = None  # run | trunk (a cooldown trunk: not a grid point) | branch
    compute_spent: Optional[float] = None  # FLOPs this row added (a branch: its own steps only)
    active_params: Optional[int] = None  # parameters one token touches (= params for dense models)
    eval_acc: Optional[float] = None  # held-out recall accuracy (data=mqar); NULL elsewhere
    state_bytes: Optional[float] = None  # recurrent state / KV cache bytes per sequence at seq_len


@dataclass
class EvalRecord:
    run_id: str
    step: int
    tokens: Optional[int] = None
    flops: Optional[float] = None
    eval_bpb: Optional[float] = None
    train_loss: Optional[float] = None
    eval_acc: Optional[float] = None


STATUSES = ("done", "failed", "running")
_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL"}


def _columns(record) -> dict[str, str]:
    """Column name -> SQL type of a record dataclass."""
    out = {}
    for name, t in typing.get_type_hints(record).items():
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[name] = _SQL_TYPES[args[0] if args else t]
    return out


RUN_COLUMNS = _columns(RunRecord)
EVAL_COLUMNS = _columns(EvalRecord)
COLUMNS = list(RUN_COLUMNS)


def _create_sql() -> str:
    runs = []
    for name, sql_type in RUN_COLUMNS.items():
        col = f"{name} {sql_type}"
        if name == "run_id":
            col += " PRIMARY KEY"
        elif name == "arch":
            col += " NOT NULL"
        elif name == "status":
            col += f" NOT NULL CHECK (status IN ({', '.join(repr(s) for s in STATUSES)}))"
        runs.append(col)
    evals = [f"{n} {t}" + (" NOT NULL" if n in ("run_id", "step") else "") for n, t in EVAL_COLUMNS.items()]
    return (f"CREATE TABLE IF NOT EXISTS runs (\n    {', '.join(runs)}\n);\n"
            f"CREATE TABLE IF NOT EXISTS evals (\n    {', '.join(evals)},\n    PRIMARY KEY (run_id, step)\n);\n")


SCHEMA = _create_sql()

# `failed` rows whose error starts with one of these were stopped from outside (SIGTERM, Ctrl-C, a
# dead process), not by their own training: re-running resumes them from their checkpoint.
INTERRUPTED_PREFIXES = ("interrupted", "preempted")


def _jsonable(v):
    return json.dumps(v) if isinstance(v, (dict, list)) else v


class ResultsDB:
    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root)
        self.path = self.root / "results.sqlite"
        if not self.path.exists() and not create:
            raise ConfigError(f"no results database at {self.path}; run a sweep with root={root} first")
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(f"{self.path} is not a file; choose another root=")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._tx() as con:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                self._add_missing_columns(con)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path} is not a readable results database ({e}); it was left untouched: "
                              "move it aside or choose another root=") from None

    @staticmethod
    def _add_missing_columns(con) -> None:
        for table, cols in (("runs", RUN_COLUMNS), ("evals", EVAL_COLUMNS)):
            have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            for name, sql_type in cols.items():
                if name not in have:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")

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

    def _read(self, sql: str, args: tuple = ()) -> list[dict]:
        con = self._connect()
        try:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
        finally:
            con.close()

    def get(self, run_id: str) -> dict | None:
        rows = self._read("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return rows[0] if rows else None

    def rows(self, where: str = "", args: tuple = ()) -> list[dict]:
        return self._read(f"SELECT * FROM runs {where} ORDER BY created_at, run_id", args)

    def evals(self, run_id: str) -> list[dict]:
        return self._read("SELECT * FROM evals WHERE run_id = ? ORDER BY step", (run_id,))

    def claim(self, run_id: str, fields: dict) -> tuple[str, RunLock | None]:
        """Atomically start (or resume) a run: ('done', None) if it already finished, ('busy', None)
        if a live process holds it, else ('claimed', lock): the row is ours while we hold `lock`."""
        lock = RunLock(self.root, run_id)
        if not lock.acquire():
            return "busy", None
        now = time.time()
        try:
            with self._tx() as con:
                row = con.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                if row is not None and row["status"] == "done":
                    lock.release()
                    return "done", None
                values = dict(fields, run_id=run_id, status="running", error=None, host=socket.gethostname(),
                              pid=os.getpid(), updated_at=now)
                if row is None:
                    values["created_at"] = now
                    values = {k: _jsonable(v) for k, v in values.items()}
                    self._check_columns(values)
                    cols = [c for c in COLUMNS if c in values]
                    con.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                [values[c] for c in cols])
                else:
                    self._update(con, run_id, values)
        except BaseException:
            lock.release()
            raise
        return "claimed", lock

    def update(self, run_id: str, **fields) -> None:
        fields["updated_at"] = time.time()
        with self._tx() as con:
            self._update(con, run_id, fields)

    def add_eval(self, record: EvalRecord) -> None:
        values = dataclasses.asdict(record)
        with self._tx() as con:
            con.execute(f"INSERT OR REPLACE INTO evals ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                        list(values.values()))

    def drop_evals_after(self, run_id: str, step: int) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM evals WHERE run_id = ? AND step > ?", (run_id, step))

    def mark_dead(self) -> list[str]:
        """Mark `running` rows whose run no longer holds its lock as failed (resumable)."""
        now, dead = time.time(), []
        with self._tx() as con:
            for r in con.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall():
                if not is_alive(self.root, r["run_id"]):
                    dead.append(r["run_id"])
                    self._update(con, r["run_id"], {
                        "status": "failed", "updated_at": now, "pid": None,
                        "error": "interrupted: its process died; re-run the same command to resume from its last checkpoint",
                    })
        return dead

    def is_resumable(self, row: dict | None) -> bool:
        """Should a sweep (re)launch this row's run? True for no row, a `running` row whose run is
        dead, and a `failed` row that was interrupted rather than failed by itself (divergence, an
        error in training: those are final unless retried on purpose)."""
        if row is None:
            return True
        if row["status"] == "running":
            return not is_alive(self.root, row["run_id"])
        if row["status"] == "failed":
            return str(row.get("error") or "").startswith(INTERRUPTED_PREFIXES)
        return False

    def is_alive(self, run_id: str) -> bool:
        return is_alive(self.root, run_id)

    @staticmethod
    def _check_columns(fields: dict) -> None:
        unknown = set(fields) - set(RUN_COLUMNS)
        if unknown:
            raise KeyError(f"unknown results columns {sorted(unknown)}")

    @classmethod
    def _update(cls, con, run_id: str, fields: dict) -> None:
        fields = {k: _jsonable(v) for k, v in fields.items() if k != "run_id"}
        cls._check_columns(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*fields.values(), run_id])
