"""Data: byte-level tokenizer, the embedded default corpus, user text, deterministic batches.

Token ids 0..255 are bytes; EOD ends a document (and opens the next); MASK is the absorbing
state of masked diffusion; PAD is reserved. Documents are concatenated into one stream per
split with EOD between them; training windows are sampled from the stream so that the batch
for step s is a pure function of (seed, s), whatever happened before.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archs.errors import ConfigError
from archs.tokens import BYTES
from sweeps.engine.sources import is_heldout, list_files

EOD, MASK, PAD = BYTES.eod, BYTES.mask, BYTES.pad
VOCAB = BYTES.size
# data=text reads the whole corpus into memory (as uint16, twice its size); beyond this share of
# the available memory it must be prepared into token shards instead (python -m sweeps.prepare).
MAX_MEMORY_SHARE = 0.25


@dataclass
class Corpus:
    name: str
    sha256: str
    n_files: int
    train: np.ndarray  # uint16 token stream
    heldout: np.ndarray

    def describe(self) -> dict:
        return {
            "corpus": self.name,
            "corpus_sha256": self.sha256,
            "corpus_files": self.n_files,
            "train_tokens": int(self.train.size),
            "heldout_tokens": int(self.heldout.size),
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = stdlib_root()
    files = [
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def available_memory() -> int:
    """Bytes of memory available to this process now (Linux MemAvailable; else total physical)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _user_files(paths: list[str]) -> list[tuple[str, Path]]:
    if not paths:
        raise ConfigError("data=text needs data.paths=[FILE_OR_DIR,...]; none were given")
    out = list_files(paths, "data.paths")
    total = sum(q.stat().st_size for _, q in out)
    limit = MAX_MEMORY_SHARE * available_memory() / 2  # held as uint16
    if total > limit:
        raise ConfigError(
            f"data.paths hold {total / 2**30:.1f} GiB of text, more than data=text reads into memory here "
            f"({limit / 2**30:.1f} GiB); tokenise it once with python -m sweeps.prepare and train with data=tokens")
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read data file {str(path)!r} ({e.strerror or e}); fix or remove it from data.paths") \
            from None


def _stream(docs: list[bytes]) -> np.ndarray:
    if not docs:
        return np.zeros((0,), np.uint16)
    parts = []
    for d in docs:
        parts.append(np.frombuffer(d, np.uint8).astype(np.uint16))
        parts.append(np.array([EOD], np.uint16))
    return np.concatenate(parts)


def load_corpus(name: str, paths: list[str] | None = None, heldout_fraction: float = 0.02) -> Corpus:
    """Read a corpus and split it by file into train / held-out token streams."""
    if name == "stdlib":
        root, files = _stdlib_files()
        named = [(p.relative_to(root).as_posix(), p) for p in files]
        label = f"python{sysconfig.get_python_version()}-stdlib"
    elif name == "text":
        named = _user_files(list(paths or []))
        label = "text:" + ",".join(str(p) for p in paths)
    else:
        raise ConfigError(f"data={name} is not an in-memory corpus (this reads data=stdlib or data=text "
                          "data.paths=[...]); open prepared shards with sweeps.engine.dataset.open_dataset")
    digest = hashlib.sha256()
    train_docs, held_docs = [], []
    for rel, path in named:
        blob = _read(path)
        if not blob:
            continue
        digest.update(rel.encode() + b"\0" + hashlib.sha256(blob).digest())
        (held_docs if is_heldout(rel, heldout_fraction) else train_docs).append(blob)
    if not train_docs and not held_docs:
        raise ConfigError(f"data paths {', '.join(map(str, paths or []))} hold no bytes; point data.paths at "
                          "non-empty text files")
    if not train_docs or not held_docs:
        # Too few files to split by file (e.g. one text file): hold out the stream's tail instead.
        stream = _stream(train_docs + held_docs)
        cut = int(len(stream) * (1 - heldout_fraction))
        train, held = stream[:cut], stream[cut:]
    else:
        train, held = _stream(train_docs), _stream(held_docs)
    return Corpus(label, digest.hexdigest(), len(named), train, held)


def byte_unigram_bits(stream: np.ndarray) -> float:
    """Entropy (bits per byte) of the byte unigram distribution: the no-context baseline."""
    b = stream[stream < 256]
    p = np.bincount(b, minlength=256) / max(1, b.size)
    p = p[p > 0]
    return max(0.0, float(-(p * np.log2(p)).sum()))  # a single byte value: 0, not -0
