"""Input text: listing files and directories, and reading documents out of them.

A document is a text file, one line of a `.jsonl` / `.jsonl.gz` / `.jsonl.zst` file (its text
field) or one row of a `.parquet` file (its text column). Each document has a stable name (a
file's path relative to the input it was found under; `NAME:OFFSET` for a jsonl line, the byte
offset of the line in the decompressed file; `NAME:ROW` for a parquet row), and goes to the
held-out split by a hash of that name: stable under additions to the corpus and independent of
file-system order (the same rule data=text applies to whole files).

Bad input is one ConfigError line naming the file (and line) and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from archs.errors import ConfigError

_SPLIT_SALT = b"difflab-heldout-v1"
READ_CHUNK = 1 << 22  # text files are read (and tokenised) in pieces of about this many bytes


class Kind(StrEnum):
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"


def kind_of(path: Path) -> tuple[Kind, str]:
    """(kind, compression) by file name: .jsonl[.gz|.zst], .parquet, anything else is text."""
    name = path.name.lower()
    for comp in ("", ".gz", ".zst"):
        if name.endswith(".jsonl" + comp):
            return Kind.jsonl, comp.lstrip(".")
    if name.endswith(".parquet"):
        return Kind.parquet, ""
    return Kind.text, ""


def is_heldout(name: str, fraction: float) -> bool:
    h = hashlib.sha256(_SPLIT_SALT + name.encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def regular_file(p: Path, key: str) -> None:
    """A data file must be a regular, readable file: FIFOs, devices and sockets are refused (they
    hang or never end), unreadable files named."""
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise ConfigError(f"data path {str(p)!r} is {kind}; {key} takes regular text files or directories")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"data file {str(p)!r} is not readable (permission denied); fix its permissions or {key}")


def list_files(paths: list[str], key: str) -> list[tuple[str, Path]]:
    """(name, path) of every file under `paths`, in a stable order: a directory's files sorted by
    their path relative to it (hidden names skipped), a file by its own name. `key` names the
    setting in error messages (data.paths, input)."""
    out = []
    for raw in paths:
        p = Path(os.path.expanduser(str(raw))).absolute()
        if not p.exists():
            where = "" if Path(os.path.expanduser(str(raw))).is_absolute() else f" in {os.getcwd()}"
            raise ConfigError(f"data path {str(raw)!r} does not exist{where}; fix {key}")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            if not found:
                raise ConfigError(f"data path {str(p)!r} is a directory with no files; fix {key}")
            out += [(q.relative_to(p).as_posix(), q) for q in found]
        else:
            regular_file(p, key)
            out.append((p.name, p))
    return out


# --- documents ------------------------------------------------------------------------------------


@dataclass
class Segment:
    """A piece of one document's UTF-8 (or, for the byte tokenizer, any) bytes; `last` closes the
    document (an EOD follows it). Long text files come in several segments."""

    heldout: bool
    data: bytes
    last: bool
    key: str  # the document's name (what its split and sampling hash)


@dataclass
class Source:
    """One input file and how to read it."""

    name: str
    path: Path
    kind: Kind
    compression: str = ""

    @property
    def label(self) -> str:
        return str(self.path)


def sources(paths: list[str], key: str = "input") -> list[Source]:
    out = []
    for name, path in list_files(paths, key):
        regular_file(path, key)
        kind, comp = kind_of(path)
        out.append(Source(name, path, kind, comp))
    return out


def _binary(s: Source, data: bytes, base: int, where: str = "") -> None:
    at = data.find(b"\0")
    if at >= 0:
        raise ConfigError(f"{s.label}{where} holds binary data (a NUL byte at offset {base + at}), not text; remove it "
                          "from input or convert it to text")


def _read_error(s: Source, e: Exception) -> ConfigError:
    return ConfigError(f"cannot read {s.label} ({getattr(e, 'strerror', None) or e}); fix or remove it from input")


def safe_cut(data: bytes, limit: int) -> int:
    """An offset <= limit where the byte-level BPE pre-tokenizer's pieces never straddle: just
    before a space that follows a printable ASCII character (a piece never ends in the middle of
    a run of letters, digits or punctuation followed by a space, and the space opens the next
    one). 0 when there is none."""
    at = data.rfind(b" ", 1, limit + 1)
    while at > 0:
        if 0x21 <= data[at - 1] <= 0x7E:
            return at
        at = data.rfind(b" ", 1, at)
    return 0


def _text_segments(s: Source, fraction: float, cut: bool, digest: Callable[[bytes], None]) -> Iterator[Segment]:
    held = is_heldout(s.name, fraction)
    pending, base = b"", 0
    try:
        with open(s.path, "rb") as f:
            while True:
                chunk = f.read(READ_CHUNK)
                if chunk:
                    _binary(s, chunk, base)
                    base += len(chunk)
                    digest(chunk)
                    pending += chunk
                if not chunk:
                    break
                if len(pending) >= READ_CHUNK:
                    at = safe_cut(pending, READ_CHUNK) if cut else READ_CHUNK
                    if at:
                        yield Segment(held, pending[:at], False, s.name)
                        pending = pending[at:]
    except OSError as e:
        raise _read_error(s, e) from None
    if pending:
        yield Segment(held, pending, True, s.name)
    elif base:  # the document ended exactly at a cut: close it
        yield Segment(held, b"", True, s.name)


def _open_jsonl(s: Source, raw: BinaryIO) -> BinaryIO:
    """A line-iterable stream of the decompressed bytes."""
    if s.compression == "gz":
        return gzip.GzipFile(fileobj=raw)
    if s.compression == "zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), 1 << 20)
    return raw


def _jsonl_segments(s: Source, field: str, fraction: float) -> Iterator[Segment]:
    offset, lineno = 0, 0
    try:
        with open(s.path, "rb") as raw, _open_jsonl(s, raw) as f:
            for line in f:
                lineno += 1
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                where = f":{lineno}"
                try:
                    rec = json.loads(line)
                except (ValueError, UnicodeDecodeError) as e:
                    if b"\0" in line:
                        _binary(s, line, start, where)
                    raise ConfigError(f"{s.label}{where} is not a JSON object ({str(e).splitlines()[0]}); every line "
                                      "of a .jsonl file must be one JSON object") from None
                if not isinstance(rec, dict) or field not in rec:
                    have = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
                    raise ConfigError(f"{s.label}{where} has no field {field!r} (it has: {have}); set text_field=NAME "
                                      "to the field holding the text")
                text = rec[field]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise ConfigError(f"{s.label}{where}: field {field!r} holds a {type(text).__name__}, not text; "
                                      "set text_field=NAME to the field holding the text")
                if text:
                    try:
                        data = text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ConfigError(f"{s.label}{where}: field {field!r} holds a lone surrogate escape (not "
                                          "Unicode text); fix the line or remove it") from None
                    key = f"{s.name}:{start}"
                    yield Segment(is_heldout(key, fraction), data, True, key)
    except ConfigError:
        raise
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        what = {"gz": "gzip", "zst": "zstandard"}.get(s.compression)
        if what and not isinstance(e, FileNotFoundError | PermissionError):
            raise ConfigError(f"cannot decompress {s.label} as {what} after line {lineno} ({e}); the file is damaged "
                              "or not compressed as its name says: fix or remove it from input") from None
        raise _read_error(s, e) from None


def _parquet_segments(s: Source, column: str, fraction: float) -> Iterator[Segment]:
    try:
        pf = pq.ParquetFile(s.path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"cannot read {s.label} as parquet ({str(e).splitlines()[0]}); fix or remove it from "
                          "input") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise ConfigError(f"{s.label} has no column {column!r} (columns: {', '.join(names[:12])}); set column=NAME "
                          "to the column holding the text")
    typ = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise ConfigError(f"{s.label}: column {column!r} holds {typ}, not text; set column=NAME to a string column")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text:
                    key = f"{s.name}:{row}"
                    yield Segment(is_heldout(key, fraction), text.encode("utf-8"), True, key)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"cannot read {s.label} as parquet after row {row} ({str(e).splitlines()[0]}); fix or "
                          "remove it from input") from None


def segments(s: Source, *, text_field: str, column: str, fraction: float, cut: bool,
             digest: Callable[[bytes], None]) -> Iterator[Segment]:
    """The documents of one input file as segments, in file order. `cut`: split long text files
    only where a byte-level BPE tokenisation does not change (safe_cut); otherwise anywhere.
    `digest` receives a text file's bytes as they are read (other kinds are hashed separately)."""
    if s.kind == Kind.text:
        return _text_segments(s, fraction, cut, digest)
    if s.kind == Kind.jsonl:
        return _jsonl_segments(s, text_field, fraction)
    return _parquet_segments(s, column, fraction)


def precheck(s: Source, text_field: str, column: str) -> None:
    """The cheap checks of one input before anything is written: a parquet file's column, the
    first record of a jsonl file."""
    if s.kind == Kind.parquet:
        next(iter(_parquet_segments(s, column, 0.0)), None)
    elif s.kind == Kind.jsonl:
        next(iter(_jsonl_segments(s, text_field, 0.0)), None)


def file_sha256(s: Source) -> str:
    try:
        with open(s.path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise _read_error(s, e) from None
