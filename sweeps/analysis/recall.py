"""The recall probe (multi-query associative recall, ``data=mqar``): accuracy against recurrent state size.

Rows with ``eval_acc`` are a probe, not language modelling: they never enter a scaling-law fit. Their seeds are
averaged per (arch, width, pair count, state size); ``state_bytes`` is the model's decode state per sequence
after ``train.seq_len`` tokens, computed from its config (archs.mixers.model_state_bytes: the fixed recurrent
state of recurrent layers, the KV cache of attention, which grows with the context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sweeps.analysis.group import row_value


def is_probe(row: dict) -> bool:
    return row.get("eval_acc") is not None


@dataclass
class RecallPoint:
    arch: str
    d_model: int | None
    pairs: int | None  # key-value pairs per sequence (config data.mqar.pairs)
    state_bytes: float | None
    acc: float  # mean over seeds
    acc_std: float  # over seeds (NaN for one)
    n_seeds: int


def recall_points(rows: Sequence[dict]) -> list[RecallPoint]:
    """Finished probe rows merged over seeds, sorted by arch, pairs, width and state size."""
    merged: dict[tuple, list[float]] = {}
    for r in rows:
        if not is_probe(r) or r["status"] != "done" or not math.isfinite(float(r["eval_acc"])):
            continue
        pairs = row_value(r, "data.mqar.pairs")
        sb = r.get("state_bytes")
        key = (str(r["arch"]), r.get("d_model"), pairs, None if sb is None else float(sb))
        merged.setdefault(key, []).append(float(r["eval_acc"]))
    out = [RecallPoint(arch=a, d_model=d, pairs=p, state_bytes=s, acc=float(np.mean(v)),
                       acc_std=float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, n_seeds=len(v))
           for (a, d, p, s), v in merged.items()]
    return sorted(out, key=lambda q: (q.arch, q.pairs or 0, q.d_model or 0, q.state_bytes or 0.0))


def line_key(points: Sequence[RecallPoint]) -> str:
    """What one line of an arch's panel joins: the widths at one pair count, or, when there is only one width,
    the pair counts at that width (attention's KV cache grows with the context, so its state size moves)."""
    return "pairs" if len({p.d_model for p in points}) > 1 else "d_model"
