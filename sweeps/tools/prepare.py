"""Prepare once, train many: text files, jsonl and parquet into token shards (sweeps.engine.shards).

    python -m sweeps.prepare input=PATH out=DIR [tokenizer=byte|bpe] [tokenizer.vocab_size=8192]
                             [tokenizer.path=tokenizer.json] [text_field=text] [column=text]

Documents (sweeps.engine.sources) are split into train / held-out by a hash of their name,
tokenised in input order (BPE over worker processes, one per core), and appended to each split's
shards. BPE is trained on a deterministic sample of the training split's documents (selected by
a hash of their name, about tokenizer.train_bytes of text). The output is a pure function of the
input and the settings: re-running writes the same bytes, whatever the number of workers.

When every document lands in one split (a single text file, say) the stream's tail is held out
instead, as data=text does, so byte shards of a text corpus train exactly like data=text on it.

The manifest is written last and atomically: a crash leaves none, and the same command run again
starts that directory over. A directory that already holds a prepared dataset is left alone: the
same input and settings are a no-op, other ones are refused. Bad input is one line naming the
file, exit 2, and what this prepare wrote is removed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from archs.errors import ConfigError
from sweeps.config import PrepareConfig, TokenizerName
from sweeps.engine.shards import (FORMAT, MANIFEST, SPLITS, UNFINISHED, VERIFIED, VERSION, SplitWriter, open_split,
                                  read_manifest, split_entry, write_atomic, write_stamp)
from sweeps.engine.sources import Kind, Source, file_sha256, is_heldout, precheck, segments, sources
from sweeps.engine.tokenizer import BpeTokenizer, ByteTokenizer, load_bpe, token_lengths, train_bpe

BATCH_BYTES = 1 << 22  # text handed to one encoding task
TOKENIZER_FILE = "tokenizer.json"
_SAMPLE_SALT = b"difflab-bpe-sample-v1"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- encoding (in this process or in workers) ---------------------------------------------------------

_WORKER_TOKENIZERS: dict[str, BpeTokenizer] = {}


def encode_segments(tok, batch: list[tuple[bool, bytes, bool]]) -> tuple[bytes, bytes, float] | tuple[int, int, str]:
    """(train ids, held-out ids, CPU seconds spent) with the ids as raw bytes of the shard dtype,
    an EOD after each document's last segment; or (index of the bad segment, byte offset, reason)
    for text that is not UTF-8."""
    t0 = time.process_time()
    eod = np.array([tok.vocab.eod], tok.dtype).tobytes()
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for i, (held, data, last) in enumerate(batch):
        try:
            parts[held].append(tok.encode(data))
        except UnicodeDecodeError as e:
            return i, e.start, e.reason
        if last:
            parts[held].append(eod)
    return b"".join(parts[False]), b"".join(parts[True]), time.process_time() - t0


def _worker_ready() -> None:
    """Pool initializer: importing this module is the start-up cost, paid while BPE trains."""


def _encode_in_worker(sha256: str, json_text: str, batch):
    tok = _WORKER_TOKENIZERS.get(sha256)
    if tok is None:
        tok = _WORKER_TOKENIZERS[sha256] = BpeTokenizer(json_text)
    return encode_segments(tok, batch)


class Encoder:
    """Batches of segments in, their ids out, in submission order (a bounded number in flight).
    BPE with several workers encodes in worker processes (started at once, so that their start-up
    overlaps training the tokenizer); everything else in this process."""

    def __init__(self, workers: int, bpe: bool):
        self.tok = None
        self.pool = None
        if workers > 1 and bpe:
            # Workers fork from a fresh server process that imported this module once: nothing
            # inherited from this process's threads (the tokenizers library's), one import in all.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            self.pool = ctx.Pool(workers, initializer=_worker_ready)
        self.limit = 2 * workers
        self.pending: collections.deque = collections.deque()

    def submit(self, batch, labels):
        plain = [(s.heldout, s.data, s.last) for s in batch]
        if self.pool is None:
            yield encode_segments(self.tok, plain), labels, batch
            return
        args = (self.tok.sha256, self.tok.json_text, plain)
        self.pending.append((self.pool.apply_async(_encode_in_worker, args), labels, batch))
        while len(self.pending) >= self.limit:
            fut, lab, b = self.pending.popleft()
            yield fut.get(), lab, b

    def drain(self):
        while self.pending:
            fut, lab, b = self.pending.popleft()
            yield fut.get(), lab, b

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# --- the output directory ------------------------------------------------------------------------------


def _ours(name: str) -> bool:
    stem = name.removesuffix(".tmp")
    return (name in (MANIFEST, MANIFEST + ".tmp", TOKENIZER_FILE, TOKENIZER_FILE + ".tmp", UNFINISHED, VERIFIED)
            or (stem.endswith(".bin") and stem.split("-")[0] in (*SPLITS, "resplit")))


def _clean(out: Path) -> None:
    for p in out.iterdir():
        if _ours(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _out_state(out: Path) -> str:
    """new | unfinished | done; refuses a file or a directory of other things."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a directory (new, empty, or an unfinished prepare)")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    if (out / MANIFEST).exists():
        return "done"
    if (out / UNFINISHED).exists():
        return "unfinished"
    raise ConfigError(f"out={out} holds other files and no prepared dataset; choose a new or empty directory")


# --- the tokenizer -------------------------------------------------------------------------------------


def _sampled(key: str, rate: float) -> bool:
    h = hashlib.sha256(_SAMPLE_SALT + key.encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < rate


def _sample_texts(srcs: list[Source], pc: PrepareConfig, any_split: bool = False) -> tuple[list[str], int]:
    """Training-split documents selected by a hash of their name, about train_bytes of text (the
    rate comes from the input's size on disk: compressed input fills the sample early). When no
    document is in the training split, the stream's head trains (the tail rule): any split then."""
    budget = pc.tokenizer.train_bytes
    total = sum(s.path.stat().st_size for s in srcs)
    rate = min(1.0, budget / max(1, total))
    texts, n = [], 0
    for s in srcs:
        held = s.kind == Kind.text and is_heldout(s.name, pc.heldout_fraction) and not any_split
        if held or (s.kind == Kind.text and not _sampled(s.name, rate)):
            continue  # decided by the name alone: not read
        for seg in segments(s, text_field=pc.text_field, column=pc.column, fraction=pc.heldout_fraction, cut=True,
                            digest=lambda _: None):
            if (seg.heldout and not any_split) or not seg.data or not _sampled(seg.key, rate):
                continue
            texts.append(_utf8(seg.data, s.label))
            n += len(seg.data)
            if n >= budget:
                return texts, n
    if not texts and not any_split:
        return _sample_texts(srcs, pc, any_split=True)
    return texts, n


def _utf8(data: bytes, label: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} is not UTF-8 text ({e.reason} at byte {e.start} of a document); convert it to "
                          "UTF-8 or prepare with tokenizer=byte") from None


def _tokenizer(srcs: list[Source], pc: PrepareConfig):
    tc = pc.tokenizer
    if tc.name == TokenizerName.byte:
        return ByteTokenizer(), {}
    if tc.path:
        tok = load_bpe(tc.path)
        return tok, {"path": str(Path(tc.path).expanduser().absolute())}
    t0 = time.perf_counter()
    texts, n = _sample_texts(srcs, pc)
    if not texts:
        raise ConfigError(f"no training-split text to train a BPE on in {', '.join(pc.input)}; give more input")
    tok = train_bpe(texts, tc.vocab_size, tc.min_frequency)
    _say(f"trained a {tok.vocab.size}-id byte-level BPE on {len(texts)} documents ({n / 1e6:.1f} MB) "
         f"in {time.perf_counter() - t0:.1f}s")
    if tok.vocab.size < tc.vocab_size:
        _say(f"note: the sample supports only {tok.vocab.size} of tokenizer.vocab_size={tc.vocab_size} ids "
             "(no more pairs seen tokenizer.min_frequency times)")
    return tok, {"vocab_size": tc.vocab_size, "train_bytes": tc.train_bytes, "min_frequency": tc.min_frequency,
                 "sample_documents": len(texts), "sample_bytes": n}


# --- the pass over the input ---------------------------------------------------------------------------


def _request(pc: PrepareConfig, inputs: list[str]) -> dict:
    """What the output is a function of, besides the input's bytes."""
    return {"inputs": inputs, "tokenizer": {k: str(v) if k == "name" else v for k, v in asdict(pc.tokenizer).items()},
            "text_field": pc.text_field, "column": pc.column, "heldout_fraction": pc.heldout_fraction,
            "shard_tokens": pc.shard_tokens}


def _source_digest(srcs: list[Source], text_hashes: dict[str, str] | None = None) -> str:
    """sha256 over (name, sha256 of the file) of every non-empty input file: for text files the
    same digest data=text records of the same files."""
    h = hashlib.sha256()
    for s in srcs:
        if s.path.stat().st_size == 0:
            continue
        sha = (text_hashes or {}).get(str(s.path)) or file_sha256(s)
        h.update(s.name.encode() + b"\0" + bytes.fromhex(sha))
    return h.hexdigest()


def _resplit_tail(out: Path, shards: dict, dtype, fraction: float, token_len, eod: int, shard_tokens):
    """Every document fell in one split: hold out the stream's tail instead (as data=text does)."""
    full = "train" if shards["train"] else "heldout"
    moved = []
    for info in shards[full]:
        new = "resplit-" + info.file.split("-", 1)[1]
        os.replace(out / info.file, out / new)
        moved.append(dict(vars(info), file=new))
    stream = open_split(out, {"dtype": str(np.dtype(dtype)), "splits": {full: {"shards": moved}}}, full,
                        random_access=False)
    for s in stream.shards:
        s.verified = True  # written by this process a moment ago
    total = stream.size
    cut = int(total * (1 - fraction))
    new = {}
    for split, (lo, hi) in (("train", (0, cut)), ("heldout", (cut, total))):
        w = SplitWriter(out, split, dtype, shard_tokens, token_len, eod)
        for a in range(lo, hi, 1 << 24):
            w.write(stream.read(a, min(hi, a + (1 << 24))))
        new[split] = w.close()
    for s in stream.shards:
        s.array = None
        if s._map is not None:
            s._map.close()
        s.path.unlink()
    return new


def _run(pc: PrepareConfig, srcs: list[Source], out: Path, tok, tok_settings: dict, inputs: list[str],
         encoder: Encoder) -> dict:
    t0 = time.perf_counter()
    token_len = token_lengths(tok.token_bytes)
    writers = {split: SplitWriter(out, split, tok.dtype, pc.shard_tokens, token_len, tok.vocab.eod)
               for split in SPLITS}
    encoder.tok = tok
    text_hashes: dict[str, str] = {}
    total_bytes = sum(s.path.stat().st_size for s in srcs)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not pc.progress, desc="prepare",
               file=sys.stderr, mininterval=1.0)
    docs = text = 0
    cpu = [0.0]  # CPU seconds spent encoding, wherever it ran

    def consume(results):
        for res, labels, batch in results:
            if isinstance(res[0], int):
                i, at, reason = res
                raise ConfigError(f"{labels[i]} is not UTF-8 text ({reason} at byte {at} of document "
                                  f"{batch[i].key!r}); convert it to UTF-8 or prepare with tokenizer=byte")
            for split, raw in zip(SPLITS, res[:2]):
                if raw:
                    writers[split].write(np.frombuffer(raw, tok.dtype))
            cpu[0] += res[2]

    try:
        batch, labels, size = [], [], 0
        for s in srcs:
            sha = hashlib.sha256()
            for seg in segments(s, text_field=pc.text_field, column=pc.column, fraction=pc.heldout_fraction,
                                cut=tok.name == "bpe", digest=sha.update):
                batch.append(seg)
                labels.append(s.label)
                size += len(seg.data)
                text += len(seg.data)
                docs += seg.last
                if size >= BATCH_BYTES:
                    consume(encoder.submit(batch, labels))
                    batch, labels, size = [], [], 0
            if s.kind == Kind.text:
                text_hashes[str(s.path)] = sha.hexdigest()
            bar.update(s.path.stat().st_size)
        if batch:
            consume(encoder.submit(batch, labels))
        consume(encoder.drain())
    finally:
        bar.close()
    shards = {split: w.close() for split, w in writers.items()}
    if not docs:
        raise ConfigError(f"input {', '.join(inputs)} holds no documents (every file, line or row is empty); give "
                          "text to prepare")
    split_rule = "document"
    if not shards["train"] or not shards["heldout"]:
        shards = _resplit_tail(out, shards, tok.dtype, pc.heldout_fraction, token_len, tok.vocab.eod,
                               pc.shard_tokens)
        split_rule = "tail"
    seconds = time.perf_counter() - t0
    vocab = tok.vocab
    tokenizer = {"name": tok.name, "vocab_size": vocab.size, "n_text": vocab.n_text, "eod": vocab.eod,
                 "mask": vocab.mask, "pad": vocab.pad,
                 **({"file": TOKENIZER_FILE, "sha256": tok.sha256} if tok.name == "bpe" else {}),
                 "settings": tok_settings}
    manifest = {
        "format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "dtype": str(np.dtype(tok.dtype)),
        "splits": {split: split_entry(shards[split]) for split in SPLITS},
        "source": {"label": "prepared:" + ",".join(inputs), "inputs": inputs, "files": len(srcs), "documents": docs,
                   "bytes": text, "sha256": _source_digest(srcs, text_hashes), "text_field": pc.text_field,
                   "column": pc.column, "heldout_fraction": pc.heldout_fraction, "split": split_rule},
        "shard_tokens": pc.shard_tokens,
        "request": _request(pc, inputs),
    }
    for split in SPLITS:
        for info in shards[split]:
            write_stamp(out, info.file, info.sha256)
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    (out / UNFINISHED).unlink(missing_ok=True)
    return {"manifest": manifest, "encode_s": seconds, "encode_cpu_s": cpu[0], "text_bytes": text}


def prepare(pc: PrepareConfig) -> dict:
    """Prepare `pc.input` into `pc.out`. Returns {"status": "written" | "exists", "manifest": ...,
    "seconds": ..., "text_bytes": ...} ("exists": the directory already held this very dataset)."""
    if not pc.input:
        raise ConfigError("prepare needs input=PATH (a file or directory; input=[A,B] for several)")
    if not pc.out:
        raise ConfigError("prepare needs out=DIR, the directory to write the shards to")
    out = Path(pc.out).expanduser().absolute()
    srcs = sources(pc.input, "input")
    if sum(s.path.stat().st_size for s in srcs) == 0:
        raise ConfigError(f"input {', '.join(pc.input)} holds no text (every file is empty); give text to prepare")
    for s in srcs:
        precheck(s, pc.text_field, pc.column)
    inputs = [str(Path(p).expanduser().absolute()) for p in pc.input]
    for p in inputs:
        if out == Path(p) or Path(p) in out.parents:
            raise ConfigError(f"out={out} lies inside input {p}: the shards would be read as input next time; "
                              "choose an out= outside the input")
    state = _out_state(out)
    if state == "done":
        m = read_manifest(out)
        if m.get("request") == _request(pc, inputs) and m["source"]["sha256"] == _source_digest(srcs):
            _say(f"{out} already holds this dataset ({out / MANIFEST}); nothing to do")
            return {"status": "exists", "manifest": m, "seconds": 0.0, "text_bytes": m["source"]["bytes"]}
        raise ConfigError(f"out={out} already holds a prepared dataset of other input or settings "
                          f"({m['source']['label']}, tokenizer={m['tokenizer']['name']}); choose another out= or "
                          "delete it first")
    t0 = time.perf_counter()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if state == "unfinished":
        _say(f"{out}: an earlier prepare did not finish; starting it over")
    _clean(out)
    (out / UNFINISHED).write_text("python -m sweeps.prepare is writing this directory\n")
    encoder = Encoder(pc.workers or len(os.sched_getaffinity(0)), pc.tokenizer.name == TokenizerName.bpe)
    try:
        tok, settings = _tokenizer(srcs, pc)
        if tok.name == "bpe":
            write_atomic(out / TOKENIZER_FILE, tok.json_text.encode())
        t1 = time.perf_counter()
        result = _run(pc, srcs, out, tok, settings, inputs, encoder)
    except ConfigError:
        _clean(out)  # bad input: leave the directory as it was
        if created:
            out.rmdir()
        raise
    finally:
        encoder.close()
    m = result["manifest"]
    seconds = time.perf_counter() - t0
    tr, he = m["splits"]["train"], m["splits"]["heldout"]
    _say(f"prepared {out}: {tr['tokens']:,} training tokens ({tr['documents']:,} documents, {len(tr['shards'])} "
         f"shards), {he['tokens']:,} held-out tokens; {m['tokenizer']['name']} vocabulary {m['tokenizer']['vocab_size']}; "
         f"{result['text_bytes'] / 1e6:.1f} MB of text in {seconds:.1f}s ({result['text_bytes'] / 1e6 / seconds:.1f} "
         f"MB/s; tokenising {result['text_bytes'] / 1e6 / result['encode_s']:.1f} MB/s, "
         f"{result['text_bytes'] / 1e6 / max(1e-9, result['encode_cpu_s']):.1f} MB per CPU-second)")
    return {"status": "written", "manifest": m, "seconds": seconds, "tokenizer_s": t1 - t0,
            "encode_s": result["encode_s"], "encode_cpu_s": result["encode_cpu_s"], "text_bytes": result["text_bytes"]}


def main(pc: PrepareConfig) -> dict:
    return prepare(pc)
