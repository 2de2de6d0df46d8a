"""The dataset a run trains on: token streams, their vocabulary, and deterministic batches.

    dataset = open_dataset(cfg.data)                    # stdlib | text (in memory) | tokens (shards) | mqar
    batch = dataset.train_batch(seed, step, B, T)       # [B, T + 1] int32, a pure function of (seed, step)
    local = dataset.train_batch(seed, step, B, T, rows=rows)   # one process's rows (distributed.process_rows)
    held = dataset.eval_windows(T, n)                   # fixed held-out windows and their text bytes

The three text sources go through the same sampling: a split is one stream of tokens (documents each
followed by EOD), training windows start uniformly at random in it (numpy's generator seeded by
(seed, step)), held-out windows are non-overlapping and spread evenly (the sampling of the
first release, so data=stdlib and data=text runs see the batches they always saw).

Bits per byte need the text bytes behind the scored tokens: every tokenizer maps each id to a
fixed byte string, so the bytes of a window are a sum over a per-id table (`token_len`). For the
byte tokenizer that is the number of non-special targets, as it always was.

data=mqar generates recall sequences instead (sweeps.engine.mqar): the same interface, held-out
windows that mark their answers (`EvalWindows.answers`, scored as `eval_acc`), and one "byte" per
key or value id, so its eval_bpb is bits per token.

The model's vocabulary comes from the data: `fit_vocab` sets arch.vocab_size from the dataset's
(and refuses a config that fixes another), before the model is resolved.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from archs.config import ModelConfig
from archs.errors import ConfigError
from archs.tokens import BYTES, Vocab
from sweeps.config import DataConfig, DataName
from sweeps.engine.data import Corpus, load_corpus
from sweeps.engine.mqar import MqarTask
from sweeps.engine.shards import read_manifest, open_split, Stream
from sweeps.engine.tokenizer import BpeTokenizer, ByteTokenizer, token_lengths

DEFAULT_VOCAB = ModelConfig.vocab_size  # 259: the byte vocabulary, which a config gets unless it says otherwise


class EvalWindows(NamedTuple):
    tokens: np.ndarray  # [n, T + 1] int32: column 0 precedes the scored targets 1..T
    bytes: np.ndarray  # [n] int64: text bytes behind each window's targets
    answers: np.ndarray | None = None  # [n, T] bool: targets scored for recall (data=mqar)


def window_bytes(token_len: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Text bytes behind the targets (columns 1..T) of each window, from the per-id table."""
    return token_len[np.asarray(windows)[:, 1:]].sum(axis=1, dtype=np.int64)


@dataclass
class Dataset:
    name: str  # the corpus, as the results row records it
    sha256: str  # identity of the source text
    n_files: int
    tokenizer: str  # byte | bpe
    vocab: Vocab
    train: Stream
    heldout: Stream
    token_len: np.ndarray  # [vocab.size] text bytes behind each id (0 for EOD, MASK, PAD)
    directory: Path | None = None  # data=tokens: the prepared directory

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def train_tokens(self) -> int:
        return self.train.size

    def describe(self) -> dict:
        return {"corpus": self.name, "corpus_sha256": self.sha256, "corpus_files": self.n_files,
                "train_tokens": self.train.size, "heldout_tokens": self.heldout.size, "tokenizer": self.tokenizer,
                "vocab_size": self.vocab.size, **({"dir": str(self.directory)} if self.directory else {})}

    def check_windows(self, seq_len: int) -> None:
        if self.heldout.size < seq_len + 1:
            raise ConfigError(
                f"train.seq_len={seq_len} is longer than the held-out split ({self.heldout.size} tokens) of "
                f"{self.name}; use a shorter train.seq_len or more data")
        if self.train.size < seq_len + 1:
            raise ConfigError(
                f"train.seq_len={seq_len} is longer than the training split ({self.train.size} tokens); "
                "use a shorter train.seq_len or more data")

    def train_starts(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """Where the windows of step `step` start: a pure function of (seed, step)."""
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, self.train.size - seq_len - 1, size=batch_size, endpoint=True)

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of the global batch [batch_size, seq_len + 1] of training step `step`.

        Column 0 is the token preceding the scored window, so AR (predict 1..T from 0..T-1) and
        diffusion (denoise 1..T) score exactly the same tokens. Only the requested rows are read."""
        return self.train.gather(self.train_starts(seed, step, batch_size, seq_len)[rows], seq_len + 1)


    def eval_windows(self, seq_len: int, n_windows: int) -> EvalWindows:
        """Fixed held-out windows, non-overlapping and spread over the split, with their bytes."""
        self.check_windows(seq_len)
        avail = (self.heldout.size - 1) // seq_len
        n = max(1, min(n_windows, avail))
        starts = (np.arange(n) * avail // n) * seq_len
        tokens = self.heldout.gather(starts, seq_len + 1)
        return EvalWindows(tokens, window_bytes(self.token_len, tokens))


class MqarDataset:
    """data=mqar: generated sequences, no text behind them (each key or value id counts as one byte)."""

    tokenizer = "mqar"
    n_files = 0
    train_tokens = None  # unbounded: every step draws new sequences
    directory = None

    def __init__(self, task: MqarTask):
        c = task.cfg
        self.task, self.vocab = task, task.vocab
        self.name = f"mqar(keys={c.keys},values={c.values},pairs={c.pairs},queries={c.queries})"
        self.sha256 = hashlib.sha256(self.name.encode()).hexdigest()
        self.token_len = np.r_[np.ones(self.vocab.n_text, np.int64), np.zeros(self.vocab.size - self.vocab.n_text,
                                                                               np.int64)]

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def describe(self) -> dict:
        return {"corpus": self.name, "corpus_sha256": self.sha256, "tokenizer": self.tokenizer,
                "vocab_size": self.vocab.size, **dataclasses.asdict(self.task.cfg)}

    def check_windows(self, seq_len: int) -> None:
        self.task.cfg.check(seq_len)

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int, rows: slice = slice(None)) -> np.ndarray:
        return self.task.train_batch(seed, step, batch_size, seq_len)[0][rows]

    def eval_windows(self, seq_len: int, n_windows: int) -> EvalWindows:
        tokens, answers = self.task.heldout(n_windows, seq_len)
        return EvalWindows(tokens, window_bytes(self.token_len, tokens), answers)


# --- opening ------------------------------------------------------------------------------------


def _from_corpus(corpus: Corpus) -> Dataset:
    tok = ByteTokenizer()
    return Dataset(corpus.name, corpus.sha256, corpus.n_files, tok.name, BYTES, Stream.of_array(corpus.train),
                   Stream.of_array(corpus.heldout), token_lengths(tok.token_bytes))


def manifest_tokenizer(directory: Path, manifest: dict):
    """The tokenizer a prepared directory was written with (its tokenizer.json checked)."""
    t = manifest["tokenizer"]
    if t["name"] == "byte":
        return ByteTokenizer()
    path = directory / t["file"]
    try:
        text = path.read_text()
    except OSError:
        raise ConfigError(f"{path} named in {directory}/manifest.json is missing; prepare {directory} again") from None
    tok = BpeTokenizer(text, str(path))
    if tok.sha256 != t["sha256"] or tok.vocab.size != t["vocab_size"]:
        raise ConfigError(f"{path} does not match {directory}/manifest.json (modified?); prepare {directory} again")
    return tok


def _check_tokenizer(data: DataConfig, manifest: dict, directory: Path) -> None:
    have = manifest["tokenizer"]["name"]
    if data.tokenizer and data.tokenizer != have:
        raise ConfigError(f"data.tokenizer={data.tokenizer} but {directory} was prepared with tokenizer={have}; "
                          f"prepare it with tokenizer={data.tokenizer} or set data.tokenizer={have}")


def _tokens_dir(data: DataConfig) -> Path:
    if not data.dir:
        raise ConfigError("data=tokens needs data.dir=DIR, a directory written by python -m sweeps.prepare")
    return Path(data.dir).expanduser().absolute()


AnyDataset = Dataset | MqarDataset  # what open_dataset returns: one interface, text or generated


def open_dataset(data: DataConfig) -> AnyDataset:
    """The dataset of a data config: stdlib and text read into memory, tokens memory-mapped
    (start-up reads the manifest and the tokenizer; shards are checked as they are used), mqar
    generated."""
    if data.name == DataName.mqar:
        return MqarDataset(MqarTask(data.mqar))
    if data.name != DataName.tokens:
        return _from_corpus(load_corpus(str(data.name), list(data.paths), data.heldout_fraction))
    directory = _tokens_dir(data)
    m = read_manifest(directory)
    _check_tokenizer(data, m, directory)
    tok = manifest_tokenizer(directory, m)
    src = m["source"]
    return Dataset(src["label"], src["sha256"], src["files"], tok.name, tok.vocab,
                   open_split(directory, m, "train", random_access=True),
                   open_split(directory, m, "heldout", random_access=False),
                   token_lengths(tok.token_bytes), directory)


def data_vocab(data: DataConfig) -> int:
    """The vocabulary size of a data config's tokens (reads only the manifest)."""
    if data.name == DataName.mqar:
        return MqarTask(data.mqar).vocab.size
    if data.name != DataName.tokens:
        return BYTES.size
    directory = _tokens_dir(data)
    m = read_manifest(directory)
    _check_tokenizer(data, m, directory)
    return int(m["tokenizer"]["vocab_size"])


def fit_vocab(arch: ModelConfig, data: DataConfig) -> ModelConfig:
    """The model config with the data's vocabulary size; refuses one that fixes another."""
    size = data_vocab(data)
    if arch.vocab_size not in (DEFAULT_VOCAB, size):
        raise ConfigError(f"arch.vocab_size={arch.vocab_size} but the data has {size} token ids; drop "
                          "arch.vocab_size (the engine takes it from the data)")
    return dataclasses.replace(arch, vocab_size=size)
