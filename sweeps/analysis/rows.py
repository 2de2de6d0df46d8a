"""The report's one reader of the results database.

``load_rows(root)`` returns every row of table ``runs`` as a dict: every column (columns that an older database
lacks are present with value None), ``config`` parsed to a dict, ``evals`` (the held-out curve of a finished run:
dicts with step, tokens, flops, eval_bpb, train_loss; empty for other rows), and ``incomplete`` (True for a run
that is still running or was interrupted: a re-run resumes it; such rows are listed, never fitted).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from archs.errors import ConfigError
from sweeps.engine.records import ResultsDB

# Columns added after the first databases were written; older files lack them.
OPTIONAL_COLUMNS = ("tokenizer", "vocab_size", "epochs", "trunk_id", "compute_spent", "active_params", "eval_acc",
                    "state_bytes", "seed", "role")
EVAL_KEYS = ("step", "tokens", "flops", "eval_bpb", "train_loss")


def load_rows(root: str | Path) -> list[dict]:
    path = Path(root) / "results.sqlite"
    if not path.is_file():
        raise ConfigError(f"no results database at {path}; run a sweep with root={root} first")
    try:
        db = ResultsDB(root, create=False)
        db.mark_dead()  # `running` rows whose process is gone become interrupted (resumable) failures
        rows = db.rows()
        for r in rows:
            for c in OPTIONAL_COLUMNS:
                r.setdefault(c, None)
            try:
                r["config"] = json.loads(r["config"]) if r.get("config") else {}
            except (TypeError, ValueError):
                r["config"] = {}
            if not isinstance(r["config"], dict):
                r["config"] = {}
            r["evals"] = ([{k: e.get(k) for k in EVAL_KEYS} for e in db.evals(r["run_id"])]
                          if r["status"] == "done" else [])
            r["incomplete"] = r["status"] == "running" or (r["status"] == "failed" and db.is_resumable(r))
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"cannot read the results database {path} ({e}); it was left untouched: restore it or "
                          "point root= at another directory") from None
    return rows
