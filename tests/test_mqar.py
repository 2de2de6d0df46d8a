"""The associative-recall probe: its sequences against a plain loop, and every objective's one-shot
recall against oracles that know (or cannot know) the answers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from archs.config import ModelConfig
from archs.errors import ConfigError
from archs.objective import AutoregressiveObjective
from diffusion.objective import MaskedDiffusionObjective
from sweeps.engine.mqar import MqarTask

TASK = MqarTask(keys=16, values=16, pairs=5)
T = 23  # odd: the last position is a query whose answer falls outside the window


def _bindings(row: np.ndarray, pairs: int) -> dict[int, int]:
    return {int(row[1 + 2 * i]): int(row[2 + 2 * i]) for i in range(pairs)}


def test_windows_bind_every_answer_to_its_key():
    tokens, answers = TASK.windows(np.random.default_rng(0), 64, T)
    assert tokens.shape == (64, T + 1) and answers.shape == (64, T) and tokens.dtype == np.int32
    v = TASK.vocab
    for row, ans in zip(tokens, answers):
        assert row[0] == v.eod
        kv = _bindings(row, TASK.pairs)
        assert len(kv) == TASK.pairs and all(k < TASK.keys <= x < v.n_text for k, x in kv.items())
        expected = []
        for col in range(2 * TASK.pairs + 1, T + 1, 2):  # the query region, read pairwise
            assert row[col] in kv
            if col + 1 <= T:
                assert row[col + 1] == kv[row[col]]
                expected.append(col)  # target index of the answer at column col + 1
        assert list(np.flatnonzero(ans)) == expected and len(expected) == (T - 2 * TASK.pairs) // 2
    again, _ = TASK.windows(np.random.default_rng(0), 64, T)
    np.testing.assert_array_equal(tokens, again)
    np.testing.assert_array_equal(TASK.heldout(8, T)[0], TASK.heldout(8, T)[0])
    assert not np.array_equal(TASK.train_batch(0, 1, 8, T)[0], TASK.train_batch(0, 2, 8, T)[0])


def test_bad_tasks_are_refused():
    with pytest.raises(ConfigError, match="exceeds data.mqar.keys"):
        MqarTask(keys=4, values=4, pairs=5)
    with pytest.raises(ConfigError, match="cannot hold data.mqar.pairs=5"):
        TASK.check(11)


class _Oracle:
    """A stand-in model: logits one-hot on what it knows. mode 'next': the true next token
    (an AR oracle); 'recall': at [MASK] positions the value bound to the key before it, read from
    its own input (a diffusion oracle); 'copy': its input token (it cannot know masked answers)."""

    def __init__(self, mode: str, windows: np.ndarray):
        self.mode, self.windows = mode, windows
        self.cfg = ModelConfig(objective="ar" if mode == "next" else "diffusion", causal=mode == "next",
                               vocab_size=TASK.vocab.size)

    def __call__(self, tokens_bt, *, t_b=None):
        z = np.asarray(tokens_bt)
        b, t = z.shape
        out = np.zeros((b, t), np.int64)
        for i in range(b):
            kv = _bindings(self.windows[i], TASK.pairs)
            for j in range(t):
                if self.mode == "next":
                    out[i, j] = self.windows[i, j + 1]
                elif self.mode == "recall" and z[i, j] == TASK.vocab.mask:
                    out[i, j] = kv[int(z[i, j - 1])]
                else:
                    out[i, j] = z[i, j]
        return jnp.asarray(np.eye(TASK.vocab.size, dtype=np.float32)[out] * 30.0)


def _accuracy(pred, windows, answers) -> float:
    return float((np.asarray(pred) == windows[:, 1:])[answers].mean())


def test_each_objective_recalls_what_an_oracle_knows_and_masks_the_answers():
    windows, answers = TASK.heldout(6, T)
    ar = AutoregressiveObjective(ModelConfig(vocab_size=TASK.vocab.size))
    assert _accuracy(ar.recall(_Oracle("next", windows), jnp.asarray(windows), answers), windows, answers) == 1.0
    diff = MaskedDiffusionObjective(ModelConfig(objective="diffusion", causal=False, vocab_size=TASK.vocab.size))
    pred = diff.recall(_Oracle("recall", windows), jnp.asarray(windows), jnp.asarray(answers))
    assert _accuracy(pred, windows, answers) == 1.0
    # A model that only copies its input scores 0: the answers really are hidden from the denoiser.
    pred = diff.recall(_Oracle("copy", windows), jnp.asarray(windows), jnp.asarray(answers))
    assert _accuracy(pred, windows, answers) == 0.0
    np.testing.assert_array_equal(np.asarray(pred)[~answers], windows[:, 1:][~answers])  # the rest is copied
