"""Multi-query associative recall (MQAR; Arora et al. 2023, Zoology): a synthetic recall probe.

Every sequence holds `pairs` key-value pairs, then queries of those keys, each followed by its
value; the probe's score is how often a model, seeing a query, produces the value bound to that
key earlier in the sequence. Attention solves it at any width; a fixed-size recurrent state
fails once the pairs exceed what it can hold, which is why accuracy is read against state size.

A window [T + 1] is

    EOD, k_1 v_1 ... k_P v_P, q_1 a_1, q_2 a_2, ... q_Q a_Q, EOD ...        (q_i in {k_j})

with Q = data.mqar.queries (0: as many as fit), keys distinct within a sequence drawn from ids
0 .. keys-1 and values from keys .. keys+values-1; the vocabulary is those text ids followed by EOD, MASK, PAD
(archs.tokens). Training uses each arch's own objective on whole windows; the held-out score,
`eval_acc`, is the accuracy on the answers a_i: the AR model predicts each from the tokens before
it, diffusion denoisers predict all of them in one step with every answer masked (the
objectives' `recall`). Sequences are pure functions of (seed, step) for training and of a fixed
seed for the held-out set, so every run of every arch is scored on the same sequences.
"""

from __future__ import annotations

import numpy as np

from archs.tokens import Vocab
from sweeps.config import MqarConfig

HELDOUT_SEED = 0x4D514152  # "MQAR": the held-out sequences, the same for every run


class MqarTask:
    """The sequences of one task (data.mqar), training and held-out."""

    def __init__(self, cfg: MqarConfig):
        self.cfg = cfg
        self.vocab = Vocab(cfg.keys + cfg.values)

    def windows(self, rng: np.random.Generator, n: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [n, T + 1] int32, answers [n, T] bool): the windows and which targets (columns
        1..T) are answers."""
        self.cfg.check(seq_len)
        c, p, t = self.cfg, self.cfg.pairs, seq_len
        keys = np.argsort(rng.random((n, c.keys)), axis=1)[:, :p]  # p distinct keys per row
        values = c.keys + rng.integers(0, c.values, size=(n, p))
        tokens = np.full((n, t + 1), self.vocab.eod, np.int64)
        tokens[:, 1:2 * p + 1:2] = keys
        tokens[:, 2:2 * p + 2:2] = values
        room = (t - 2 * p) // 2
        n_q = min(c.queries, room) if c.queries else room
        which = rng.integers(0, p, size=(n, n_q))
        rows = np.arange(n)[:, None]
        q_cols = 2 * p + 1 + 2 * np.arange(n_q)
        tokens[:, q_cols] = keys[rows, which]
        tokens[:, q_cols + 1] = values[rows, which]
        if not c.queries and (t - 2 * p) % 2:  # one position left: a query whose answer falls outside the window
            tokens[:, t] = keys[rows[:, 0], rng.integers(0, p, size=n)]
        answers = np.zeros((n, t), bool)
        answers[:, q_cols] = True  # target column c - 1 holds token column c: the answers sit at q_cols + 1
        return tokens.astype(np.int32), answers

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int):
        return self.windows(np.random.default_rng([seed, step]), batch_size, seq_len)

    def heldout(self, n: int, seq_len: int):
        return self.windows(np.random.default_rng(HELDOUT_SEED), n, seq_len)
