"""Multi-query associative recall (MQAR; Arora et al. 2023, Zoology): a synthetic recall probe.

Every sequence holds `pairs` key-value pairs, then queries of those keys, each followed by its
value; the probe's score is how often a model, seeing a query, produces the value bound to that
key earlier in the sequence. Attention solves it at any width; a fixed-size recurrent state
fails once the pairs exceed what it can hold, which is why accuracy is read against state size.

A window [T + 1] is

    EOD, k_1 v_1 ... k_P v_P, q_1 a_1, q_2 a_2, ...          (filling the window; q_i in {k_j})

with keys (distinct within a sequence) drawn from ids 0 .. keys-1 and values from
keys .. keys+values-1; the vocabulary is those text ids followed by EOD, MASK, PAD
(archs.tokens). Training uses each arch's own objective on whole windows; the held-out score,
`eval_acc`, is the accuracy on the answers a_i: the AR model predicts each from the tokens before
it, diffusion denoisers predict all of them in one step with every answer masked (the
objectives' `recall`). Sequences are pure functions of (seed, step) for training and of a fixed
seed for the held-out set, so every run of every arch is scored on the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from archs.errors import ConfigError
from archs.tokens import Vocab

HELDOUT_SEED = 0x4D514152  # "MQAR": the held-out sequences, the same for every run


@dataclass(frozen=True)
class MqarTask:
    keys: int = 64  # key vocabulary
    values: int = 64  # value vocabulary
    pairs: int = 8  # key-value pairs per sequence

    def __post_init__(self):
        if self.keys < 1 or self.values < 1 or self.pairs < 1:
            raise ConfigError(f"data.mqar needs keys, values and pairs >= 1; got {self.keys}, {self.values}, "
                              f"{self.pairs}")
        if self.pairs > self.keys:
            raise ConfigError(f"data.mqar.pairs={self.pairs} exceeds data.mqar.keys={self.keys}: the keys of a "
                              "sequence are distinct; raise keys or lower pairs")

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.keys + self.values)

    def check(self, seq_len: int) -> None:
        if seq_len < 2 * self.pairs + 2:
            raise ConfigError(f"train.seq_len={seq_len} cannot hold data.mqar.pairs={self.pairs} pairs and a query: "
                              f"it needs at least {2 * self.pairs + 2} tokens")

    def windows(self, rng: np.random.Generator, n: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [n, T + 1] int32, answers [n, T] bool): the windows and which targets (columns
        1..T) are answers."""
        self.check(seq_len)
        p, t = self.pairs, seq_len
        keys = np.argsort(rng.random((n, self.keys)), axis=1)[:, :p]  # p distinct keys per row
        values = self.keys + rng.integers(0, self.values, size=(n, p))
        tokens = np.empty((n, t + 1), np.int64)
        tokens[:, 0] = self.vocab.eod
        tokens[:, 1:2 * p + 1:2] = keys
        tokens[:, 2:2 * p + 2:2] = values
        n_q = (t - 2 * p) // 2
        which = rng.integers(0, p, size=(n, n_q))
        rows = np.arange(n)[:, None]
        q_cols = 2 * p + 1 + 2 * np.arange(n_q)
        tokens[:, q_cols] = keys[rows, which]
        tokens[:, q_cols + 1] = values[rows, which]
        if (t - 2 * p) % 2:  # one position left: a query whose answer falls outside the window
            tokens[:, t] = keys[rows[:, 0], rng.integers(0, p, size=n)]
        answers = np.zeros((n, t), bool)
        answers[:, q_cols] = True  # target column c - 1 holds token column c: the answers sit at q_cols + 1
        return tokens.astype(np.int32), answers

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int):
        return self.windows(np.random.default_rng([seed, step]), batch_size, seq_len)

    def heldout(self, n: int, seq_len: int):
        return self.windows(np.random.default_rng(HELDOUT_SEED), n, seq_len)
