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
from sweeps.config import MqarConfig
from sweeps.engine.mqar import MqarTask

TASK = MqarTask(MqarConfig(keys=16, values=16, pairs=5))
T = 23  # odd: the last position is a query whose answer falls outside the window


def _bindings(row: np.ndarray, pairs: int) -> dict[int, int]:
    return {int(row[1 + 2 * i]): int(row[2 + 2 * i]) for i in range(pairs)}


def test_windows_bind_every_answer_to_its_key():
    tokens, answers = TASK.windows(np.random.default_rng(0), 64, T)
    assert tokens.shape == (64, T + 1) and answers.shape == (64, T) and tokens.dtype == np.int32
    v = TASK.vocab
    for row, ans in zip(tokens, answers):
        assert row[0] == v.eod
        kv = _bindings(row, TASK.cfg.pairs)
        assert len(kv) == TASK.cfg.pairs and all(k < TASK.cfg.keys <= x < v.n_text for k, x in kv.items())
        expected = []
        for col in range(2 * TASK.cfg.pairs + 1, T + 1, 2):  # the query region, read pairwise
            assert row[col] in kv
            if col + 1 <= T:
                assert row[col + 1] == kv[row[col]]
                expected.append(col)  # target index of the answer at column col + 1
        assert list(np.flatnonzero(ans)) == expected and len(expected) == (T - 2 * TASK.cfg.pairs) // 2
    again, _ = TASK.windows(np.random.default_rng(0), 64, T)
    np.testing.assert_array_equal(tokens, again)
    np.testing.assert_array_equal(TASK.heldout(8, T)[0], TASK.heldout(8, T)[0])
    assert not np.array_equal(TASK.train_batch(0, 1, 8, T)[0], TASK.train_batch(0, 2, 8, T)[0])


def test_bad_tasks_are_refused():
    with pytest.raises(ConfigError, match="exceeds data.mqar.keys"):
        MqarConfig(keys=4, values=4, pairs=5)
    with pytest.raises(ConfigError, match="cannot hold data.mqar.pairs=5"):
        TASK.cfg.check(11)
    with pytest.raises(ConfigError, match="cannot hold data.mqar.pairs=5 pairs and 3 queries"):
        MqarConfig(keys=16, values=16, pairs=5, queries=3).check(15)


def test_a_fixed_query_count_leaves_the_rest_of_the_window_to_eod():
    task = MqarTask(MqarConfig(keys=16, values=16, pairs=5, queries=3))
    tokens, answers = task.windows(np.random.default_rng(1), 16, T)
    eod = task.vocab.eod
    for row, ans in zip(tokens, answers):
        kv = _bindings(row, 5)
        queries = [(row[c], row[c + 1]) for c in (11, 13, 15)]
        assert all(kv[q] == a for q, a in queries)
        assert (row[17:] == eod).all()
        assert list(np.flatnonzero(ans)) == [11, 13, 15]


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
            kv = _bindings(self.windows[i], TASK.cfg.pairs)
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


@pytest.mark.parametrize("arch", ["ar", "diffusion"])
def test_the_engine_scores_recall_on_the_heldout_answers(tmp_path, arch):
    """A short data=mqar run: its row's eval_acc is the accuracy of the trained model's predictions
    at the held-out answers, recomputed here from the checkpoint with a plain forward pass (AR: the
    next-token argmax; diffusion: answers replaced by [MASK], argmax over the text ids), over
    every window the engine's batching used."""
    from conftest import compose

    from sweeps.engine.loop import train
    from sweeps.engine.records import ResultsDB
    from sweeps.tools.sample import load_run

    cfg = compose([f"+arch={arch}", "sweep=none", "data=mqar", "data.mqar.keys=8", "data.mqar.values=8",
                   "data.mqar.pairs=3", "arch.size=xxs", "train.seq_len=32", "train.batch_size=8",
                   "train.tokens=7680", "train.eval_windows=24", "train.eval_batch=8", "train.evals=2",
                   "optim.lr=1e-2", "train.progress=false", "train.tensorboard=false", f"root={tmp_path}"])
    row = train(cfg)
    assert row["status"] == "done" and row["tokenizer"] == "mqar" and row["epochs"] is None
    assert row["vocab_size"] == 8 + 8 + 3
    run = load_run(str(tmp_path), row["run_id"])
    windows, answers = MqarTask(cfg.data.mqar).heldout(24, 32)
    vocab = MqarTask(cfg.data.mqar).vocab
    if arch == "ar":
        logits = np.asarray(run.model(jnp.asarray(windows[:, :-1])))
    else:
        z = np.where(answers, vocab.mask, windows[:, 1:])
        logits = np.asarray(run.model(jnp.asarray(z)))[..., :vocab.eod + 1]  # SUBS: never [MASK] or PAD
    hits = (logits.argmax(-1) == windows[:, 1:])[answers]
    assert row["eval_acc"] == pytest.approx(hits.mean(), abs=1e-9)
    evals = ResultsDB(tmp_path).evals(row["run_id"])
    assert [e["step"] for e in evals] == [15, 30] and evals[-1]["eval_acc"] == row["eval_acc"]
    with pytest.raises(ConfigError, match="recall probe whose ids are keys and values, not text"):
        run.require_text()  # sampling text from it is refused in one line
