"""Token shards on disk: the manifest, writing shards, and reading them through memory maps.

A prepared directory holds, per split (`train`, `heldout`), the split's token stream (documents
each followed by EOD) cut into fixed-dtype files `SPLIT-NNNNN.bin` of at most `shard_tokens`
tokens, and `manifest.json`, written last and atomically (a directory without one is unfinished):

    {"format": "difflab-tokens", "version": 1,
     "tokenizer": {"name": "byte" | "bpe", "vocab_size": V, "n_text": V - 3, "eod": .., "mask": ..,
                   "pad": .., "file": "tokenizer.json" (bpe), "sha256": sha256 of that file (bpe),
                   "settings": how it was made (trained: vocab_size, train_bytes, min_frequency,
                   sample_documents, sample_bytes; loaded: path)},
     "dtype": "uint16" | "uint32",
     "splits": {"train": {"tokens": N, "bytes": B, "documents": D,
                          "shards": [{"file": "train-00000.bin", "tokens": n, "bytes": b,
                                      "documents": d, "sha256": "..."}, ...]},
                "heldout": {...}},
     "source": {"label": "text:/abs/input,...", "inputs": [...], "files": F, "documents": D,
                "bytes": text bytes, "sha256": digest of the input files, "text_field": ..,
                "column": .., "heldout_fraction": f, "split": "document" | "tail"},
     "shard_tokens": S,
     "request": the prepare settings the output is a function of (with the input's sha256, what
                a re-run compares to decide that the directory already holds its result)}

`bytes` are the text bytes behind the tokens (special tokens carry none); `documents` the EODs
(a document cut by a tail split counts where its EOD lies). The manifest holds nothing that
depends on where or when it was written: the same input and settings give the same manifest and
the same shards, byte for byte.

Shards are checked against the manifest when opened: their sizes at once, their sha256 the first
time a process touches each one, unless `DIR/.verified/FILE.json` vouches for exactly this file
(size, mtime, ctime, inode: prepare writes these for the files it wrote), so start-up reads the
manifest only and an edited or truncated shard is one clear error. Windows are copied out of the
memory maps and their pages released, so resident memory stays flat however long the run.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from archs.errors import ConfigError

FORMAT, VERSION = "difflab-tokens", 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
VERIFIED = ".verified"
UNFINISHED = ".prepare-unfinished"  # present while a prepare is writing into the directory


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _stamp_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def write_stamp(directory: Path, name: str, sha256: str) -> None:
    """Record that DIR/name, as it is now, has this sha256 (best effort: a read-only directory
    keeps no stamps and its shards are hashed on first use)."""
    try:
        st = (directory / name).stat()
        (directory / VERIFIED).mkdir(exist_ok=True)
        write_atomic(directory / VERIFIED / f"{name}.json", json.dumps({"sha256": sha256, **_stamp_key(st)}).encode())
    except OSError:
        pass


def _stamped(directory: Path, name: str, sha256: str, st: os.stat_result) -> bool:
    try:
        stamp = json.loads((directory / VERIFIED / f"{name}.json").read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": sha256, **_stamp_key(st)}


def sha256_file(path: Path) -> str:
    """Hash with buffered reads (a memory map would count the whole file as resident memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- writing ----------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    file: str
    tokens: int
    bytes: int
    documents: int
    sha256: str


class SplitWriter:
    """Appends token ids to one split's shards, rolling to a new file every `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, token_len: np.ndarray,
                 eod: int):
        self.dir, self.split, self.dtype, self.limit = directory, split, np.dtype(dtype), shard_tokens
        self.token_len, self.eod = token_len, eod
        self.shards: list[ShardInfo] = []
        self._f = None

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.dir / (self._name + ".tmp"), "wb")
        self._hash = hashlib.sha256()
        self._tokens = self._bytes = self._docs = 0

    def _close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.dir / (self._name + ".tmp"), self.dir / self._name)
        self.shards.append(ShardInfo(self._name, self._tokens, self._bytes, self._docs, self._hash.hexdigest()))
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, self.dtype)
        while ids.size:
            if self._f is None:
                self._open()
            part, ids = ids[:self.limit - self._tokens], ids[self.limit - self._tokens:]
            raw = part.tobytes()
            self._f.write(raw)
            self._hash.update(raw)
            self._tokens += part.size
            self._bytes += int(self.token_len[part].sum())
            self._docs += int(np.count_nonzero(part == self.eod))
            if self._tokens == self.limit:
                self._close()

    def close(self) -> list[ShardInfo]:
        if self._f is not None:
            self._close()
        return self.shards


def split_entry(shards: list[ShardInfo]) -> dict:
    return {"tokens": sum(s.tokens for s in shards), "bytes": sum(s.bytes for s in shards),
            "documents": sum(s.documents for s in shards), "shards": [vars(s) for s in shards]}


# --- reading ----------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared directory (one ConfigError line for anything else)."""
    d = Path(os.path.expanduser(str(directory)))
    if not d.is_dir():
        raise ConfigError(f"data.dir={str(directory)!r} is not a directory; point it at a directory written by "
                          "python -m sweeps.prepare")
    path = d / MANIFEST
    if not path.exists():
        more = " (a prepare into it did not finish: run the same prepare command again)" if (d / UNFINISHED).exists() \
            else ""
        raise ConfigError(f"{d} has no {MANIFEST}{more}; prepare it with python -m sweeps.prepare input=PATH out={d}")
    try:
        m = json.loads(path.read_text())
        ok = m.get("format") == FORMAT and all(k in m for k in ("tokenizer", "dtype", "splits", "source"))
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ConfigError(f"{path} is not a manifest of python -m sweeps.prepare; prepare {d} again")
    if m.get("version") != VERSION:
        raise ConfigError(f"{path} has format version {m.get('version')}, this lab reads {VERSION}; prepare {d} again")
    return m


@dataclass
class Shard:
    path: Path
    tokens: int
    sha256: str
    verified: bool
    array: np.ndarray | None = None
    _map: mmap.mmap | None = field(default=None, repr=False)


class Stream:
    """One split as a single token stream: in-memory arrays or memory-mapped shards, in order.
    Windows that straddle two shards are joined; the data is only read where windows fall."""

    def __init__(self, shards: list[Shard], dtype: np.dtype, random_access: bool = True):
        self.shards, self.dtype, self.random_access = shards, np.dtype(dtype), random_access
        self.offsets = np.concatenate([[0], np.cumsum([s.tokens for s in shards], dtype=np.int64)])

    @classmethod
    def of_array(cls, array: np.ndarray) -> "Stream":
        return cls([Shard(Path("<memory>"), int(array.size), "", True, array)], array.dtype)

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def _array(self, i: int) -> np.ndarray:
        s = self.shards[i]
        if s.array is None:
            if not s.verified:
                got = sha256_file(s.path)
                if got != s.sha256:
                    raise ConfigError(f"shard {s.path} does not match its manifest (sha256 {got[:12]}..., manifest "
                                      f"{s.sha256[:12]}...): it was modified or damaged; prepare {s.path.parent} "
                                      "again")
                write_stamp(s.path.parent, s.path.name, s.sha256)
                s.verified = True
            if s.tokens == 0:
                s.array = np.zeros((0,), self.dtype)
            else:
                with open(s.path, "rb") as f:
                    s._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if self.random_access:  # windows land anywhere: no read-ahead, resident memory stays small
                    s._map.madvise(mmap.MADV_RANDOM)
                s.array = np.frombuffer(s._map, self.dtype)
        return s.array

    def _release(self, i: int, lo: int, hi: int) -> None:
        """Unmap the pages of tokens [lo, hi) of shard i once copied out: the kernel maps whole
        neighbourhoods of a touched page (fault-around), so without this resident memory would
        grow with every window read until it held the corpus. The pages stay in the page cache."""
        m = self.shards[i]._map
        if m is None:
            return
        a = lo * self.dtype.itemsize // mmap.PAGESIZE * mmap.PAGESIZE
        m.madvise(mmap.MADV_DONTNEED, a, hi * self.dtype.itemsize - a)

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Windows [len(starts), length] (int32) of the stream beginning at `starts`."""
        starts = np.asarray(starts, np.int64)
        if len(self.shards) == 1:
            out = self._array(0)[starts[:, None] + np.arange(length)[None, :]].astype(np.int32)
            for s in starts.tolist():
                self._release(0, s, s + length)
            return out
        out = np.empty((len(starts), length), np.int32)
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        for r, (s, i) in enumerate(zip(starts.tolist(), first.tolist())):
            filled = 0
            while filled < length:
                local = s + filled - int(self.offsets[i])
                take = min(length - filled, self.shards[i].tokens - local)
                if take > 0:
                    out[r, filled:filled + take] = self._array(i)[local:local + take]
                    self._release(i, local, local + take)
                    filled += take
                i += 1
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) in the stream's dtype (sequential reads: prepare, tests)."""
        parts = []
        for i, s in enumerate(self.shards):
            lo, hi = max(start, int(self.offsets[i])), min(stop, int(self.offsets[i + 1]))
            if lo < hi:
                parts.append(np.asarray(self._array(i)[lo - int(self.offsets[i]):hi - int(self.offsets[i])]))
        return np.concatenate(parts) if parts else np.zeros((0,), self.dtype)


def open_split(directory: Path, manifest: dict, split: str, random_access: bool = True) -> Stream:
    """A split's shards, sizes checked now, contents on first use (see the module docstring)."""
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for entry in manifest["splits"][split]["shards"]:
        path = directory / entry["file"]
        try:
            st = path.stat()
        except OSError:
            raise ConfigError(f"shard {path} named in {directory / MANIFEST} is missing; prepare {directory} "
                              "again") from None
        want = entry["tokens"] * dtype.itemsize
        if st.st_size != want:
            raise ConfigError(f"shard {path} has {st.st_size} bytes, its manifest says {want}: it was truncated or "
                              f"modified; prepare {directory} again")
        shards.append(Shard(path, entry["tokens"], entry["sha256"], _stamped(directory, entry["file"],
                                                                                 entry["sha256"], st)))
    return Stream(shards, dtype, random_access)
