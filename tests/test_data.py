"""Data at scale: prepare, tokenizers, shards, training from shards, bits per byte, process slices.

Every corpus is generated here (a few hundred KB); tokenizers are tiny (a few hundred ids).
References: the input documents themselves, the tokenizers library's own encode/decode, the
in-memory data=text corpus sampled as the first release did (conftest), whole-stream numpy indexing, and a
direct recomputation of bits per byte from per-window nats and decoded window text.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from archs.errors import ConfigError
from conftest import compose, run_cli

UNICODE_WORDS = ("the quick brown fox jumps over lazy dog naïve café Straße 東京 日本語 🙂 👍🏽 don't it's we're "
                 "They'll I'M 123 4.5 ½ Ⅻ x² e\u0301 ünïcödé ру́сский עברית <|eod|> <|endoftext|> ' '' - -- ...").split()
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0", "\u3000", "\x85", "\x1c", "   "]


def _text(rng: random.Random, n: int, words=UNICODE_WORDS, seps=SEPARATORS) -> str:
    out = []
    for _ in range(n):
        out.append(rng.choice(words))
        out.append(rng.choice(seps))
    if rng.random() < 0.3:
        out.insert(0, rng.choice(["    ", " ", "\n"]))  # leading whitespace
    return "".join(out)


def _ascii_text(rng: random.Random, n: int) -> str:
    words = "def return self import class the of and to in is for if not none value data x y z 0 1 42".split()
    lines = []
    for _ in range(n):
        lines.append("    " * rng.randrange(3) + " ".join(rng.choice(words) for _ in range(rng.randrange(1, 9))))
    return "\n".join(lines) + "\n"


def write_mixed_corpus(root: Path) -> list[str]:
    """Text files, jsonl (plain, gzip, zstandard) and parquet; the documents in input order."""
    rng = random.Random(7)
    docs = []
    (root / "a").mkdir(parents=True)
    for i in range(12):
        t = _text(rng, rng.randrange(20, 300))
        (root / "a" / f"doc{i:02d}.txt").write_text(t)
        docs.append(t)
    (root / "a" / "empty.txt").write_text("")
    (root / "a" / ".hidden").write_text("never read")
    recs = [_text(rng, rng.randrange(5, 120)) for _ in range(40)]
    lines = [json.dumps({"text": t, "n": i}) for i, t in enumerate(recs)]
    lines.insert(3, "")  # blank lines are skipped
    lines.insert(7, json.dumps({"text": ""}))  # so are empty documents
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    gz = [_text(rng, rng.randrange(5, 80)) for _ in range(15)]
    (root / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in gz).encode()))
    zs = [_text(rng, rng.randrange(5, 80)) for _ in range(15)]
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in zs).encode()))
    pqt = [_text(rng, rng.randrange(5, 80)) for _ in range(25)]
    pq.write_table(pa.table({"id": list(range(25)), "body": pqt}), root / "e.parquet", row_group_size=7)
    # Input order: files sorted by path relative to the input directory.
    return docs + recs + gz + zs + pqt


def write_ascii_corpus(root: Path, n_files: int = 40) -> None:
    rng = random.Random(3)
    root.mkdir(parents=True)
    for i in range(n_files):
        (root / f"f{i:03d}.py").write_text(_ascii_text(rng, rng.randrange(20, 120)))


def prepare(inp, out, **kw):
    from sweeps.config import PrepareConfig, TokenizerConfig
    from sweeps.tools.prepare import prepare as run

    tok = kw.pop("tokenizer", {})
    return run(PrepareConfig(input=[str(p) for p in (inp if isinstance(inp, list) else [inp])], out=str(out),
                             tokenizer=TokenizerConfig(**tok), progress=False, workers=kw.pop("workers", 1), **kw))


BPE = {"name": "bpe", "vocab_size": 300}


def _data(d: Path, **kw):
    from sweeps.config import DataConfig

    return DataConfig(name="tokens", dir=str(d), **kw)


def _documents(directory: Path) -> tuple[list[bytes], list[bytes]]:
    """The decoded documents of each split, through the manifest's tokenizer."""
    from sweeps.engine.dataset import manifest_tokenizer, open_dataset
    from sweeps.engine.tokenizer import decode, split_documents

    ds = open_dataset(_data(directory))
    tok = manifest_tokenizer(directory, json.loads((directory / "manifest.json").read_text()))
    out = []
    for stream in (ds.train, ds.heldout):
        ids = stream.read(0, stream.size)
        assert ids.size == 0 or ids[-1] == tok.vocab.eod  # every document ends with EOD
        out.append([decode(tok.token_bytes, d.tolist()) for d in split_documents(ids, tok.vocab.eod)])
    return out[0], out[1]


def _in_order(sub: list, full: list) -> bool:
    it = iter(full)
    return all(any(x == y for y in it) for x in sub)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    docs = write_mixed_corpus(root / "in")
    return root, docs


@pytest.fixture(scope="module")
def ascii_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ascii")
    write_ascii_corpus(root / "in")
    prepare(root / "in", root / "byte", heldout_fraction=0.1, shard_tokens=10_000)
    prepare(root / "in", root / "bpe", tokenizer=BPE, heldout_fraction=0.1, shard_tokens=4_000)
    return root


# --- prepare: round trips, determinism -----------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [{}, BPE], ids=["byte", "bpe"])
def test_shards_decode_to_the_input_documents(mixed, tmp_path, tokenizer):
    """Every document of every input kind comes back byte for byte, each split in input order,
    the manifest's counts equal the documents'; BPE: the tokenizers library decodes them too."""
    root, docs = mixed
    out = tmp_path / "out"
    r = prepare(root / "in", out, tokenizer=tokenizer, column="body", heldout_fraction=0.25, shard_tokens=3000)
    m = r["manifest"]
    train, held = _documents(out)
    want = [d.encode() for d in docs]
    assert held and train and sorted(train + held) == sorted(want)
    assert _in_order(train, want) and _in_order(held, want)
    assert m["source"]["split"] == "document" and m["source"]["documents"] == len(want)
    for split, got in (("train", train), ("heldout", held)):
        entry = m["splits"][split]
        assert entry["documents"] == len(got) and entry["bytes"] == sum(map(len, got))
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
    assert len(m["splits"]["train"]["shards"]) > 1  # several shards, windows cross them
    if tokenizer:
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(out / "tokenizer.json"))
        from sweeps.engine.dataset import open_dataset

        ds = open_dataset(_data(out))
        eod = ds.vocab.eod
        ids = ds.train.read(0, ds.train.size)
        ends = np.flatnonzero(ids == eod)
        first = ids[:ends[0]].tolist()
        assert hf.decode(first) == train[0].decode()
        assert m["tokenizer"]["vocab_size"] == hf.get_vocab_size() + 3 == ds.vocab.size
        assert (m["tokenizer"]["eod"], m["tokenizer"]["mask"], m["tokenizer"]["pad"]) == (eod, eod + 1, eod + 2)


@pytest.mark.parametrize("tokenizer", [{}, BPE], ids=["byte", "bpe"])
def test_one_document_is_split_by_its_tail(tmp_path, tokenizer):
    """A single file (here one whose name the hash holds out): the stream's last 2% is held out
    instead, as data=text does; the two splits together are the document and its EOD."""
    from sweeps.engine.dataset import manifest_tokenizer, open_dataset
    from sweeps.engine.sources import is_heldout
    from sweeps.engine.tokenizer import decode

    name = next(f"doc{i}.txt" for i in range(1000) if is_heldout(f"doc{i}.txt", 0.02))
    text = _ascii_text(random.Random(0), 400) + "naïve 東京\n"
    (tmp_path / name).write_text(text)
    m = prepare(tmp_path / name, tmp_path / "out", tokenizer=tokenizer, shard_tokens=1000)["manifest"]
    ds = open_dataset(_data(tmp_path / "out"))
    tok = manifest_tokenizer(tmp_path / "out", m)
    ids = np.concatenate([ds.train.read(0, ds.train.size), ds.heldout.read(0, ds.heldout.size)])
    assert m["source"]["split"] == "tail" and ds.train.size == int(ids.size * 0.98)
    assert ids[-1] == tok.vocab.eod and decode(tok.token_bytes, ids.tolist()) == text.encode()


def test_fast_bpe_encoding_equals_the_tokenizers_library(mixed, tmp_path):
    """The cached fast path gives the ids of tokenizers.Tokenizer.encode on text that exercises
    every branch of the GPT-2 pre-tokenizer (Unicode letters, numbers, marks, White_Space that
    Python's isspace disagrees with, contractions, whitespace runs, CRLF, leading spaces)."""
    from sweeps.engine.tokenizer import pieces, train_bpe

    root, docs = mixed
    tok = train_bpe(docs, 600, 2)
    assert tok.fast
    rng = random.Random(11)
    texts = docs + [_text(rng, 200) for _ in range(30)] + [_ascii_text(rng, 60) for _ in range(10)] + [
        "", " ", "  ", "a", " a", "a ", "a  b", "x \n y", "'s'S 've'", "don't\n's", "\n\n\n", "a\u00a0 b", "a\x1c b",
        "tab\t b", "z\u3000 y", "1\u2003 2", "end ", "😀 😀  😀", "e\u0301 \u0301", "½ Ⅻ x²", "<|eod|>"]
    for t in texts:
        got = np.frombuffer(tok.encode(t.encode()), tok.dtype).tolist()
        assert got == tok.encode_reference(t), repr(t[:80])
        assert "".join(pieces(t)) == t
    # The same text again goes through the caches; still the library's answer.
    for t in texts[:20]:
        assert np.frombuffer(tok.encode(t.encode()), tok.dtype).tolist() == tok.encode_reference(t)


def test_two_prepares_are_identical_whatever_the_workers(ascii_corpus, tmp_path):
    """A prepare with two worker processes writes the very files an in-process prepare wrote
    (manifest, tokenizer and shards byte for byte)."""
    out = tmp_path / "again"
    prepare(ascii_corpus / "in", out, tokenizer=BPE, heldout_fraction=0.1, shard_tokens=4_000, workers=2)
    ref = ascii_corpus / "bpe"
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    names = sorted(p.name for p in ref.iterdir() if p.is_file())
    assert names == sorted(p.name for p in out.iterdir() if p.is_file())
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_a_tokenizer_json_is_loaded_and_lossy_ones_are_refused(ascii_corpus, tmp_path):
    """tokenizer.path=FILE encodes exactly as the prepare that trained that file; tokenizers that
    would not give the text back byte for byte are refused in one line."""
    ref = ascii_corpus / "bpe"
    out = tmp_path / "loaded"
    r = prepare(ascii_corpus / "in", out, tokenizer={"name": "bpe", "path": str(ref / "tokenizer.json")},
                heldout_fraction=0.1, shard_tokens=4_000)
    assert r["manifest"]["tokenizer"]["settings"] == {"path": str(ref / "tokenizer.json")}
    for p in ref.glob("*.bin"):
        assert (out / p.name).read_bytes() == p.read_bytes()
    spec = json.loads((ref / "tokenizer.json").read_text())
    # The same pre-tokenizer inside a Sequence: not the fast path's configuration, so the library
    # encodes; the shards come out the same.
    seq = tmp_path / "sequence.json"
    seq.write_text(json.dumps(dict(spec, pre_tokenizer={"type": "Sequence", "pretokenizers": [spec["pre_tokenizer"]]})))
    prepare(ascii_corpus / "in", tmp_path / "slow", tokenizer={"name": "bpe", "path": str(seq)}, heldout_fraction=0.1,
            shard_tokens=4_000)
    from sweeps.engine.tokenizer import load_bpe

    assert not load_bpe(seq).fast and load_bpe(ref / "tokenizer.json").fast
    for p in ref.glob("*.bin"):
        assert (tmp_path / "slow" / p.name).read_bytes() == p.read_bytes()
    bad = {"normalizer": dict(spec, normalizer={"type": "Lowercase"}),
           "prefix": dict(spec, pre_tokenizer=dict(spec["pre_tokenizer"], add_prefix_space=True)),
           "model": dict(spec, model={"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"})}
    for name, body in bad.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=r"cannot be used: .*; bits per byte need a lossless byte-level BPE"):
            prepare(ascii_corpus / "in", tmp_path / f"out-{name}", tokenizer={"name": "bpe", "path": str(f)})
        assert not (tmp_path / f"out-{name}").exists()
    with pytest.raises(ConfigError, match=r"lies inside input"):
        prepare(ascii_corpus / "in", ascii_corpus / "in" / "shards")


def test_a_crashed_prepare_leaves_no_manifest_and_rerunning_finishes_it(ascii_corpus, tmp_path, monkeypatch):
    from sweeps.engine import shards
    from sweeps.engine.dataset import open_dataset
    from sweeps.tools import prepare as prep

    out = tmp_path / "out"
    real = shards.SplitWriter.close

    def crash(self):
        if self.split == "heldout":
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(shards.SplitWriter, "close", crash)
    with pytest.raises(RuntimeError):
        prepare(ascii_corpus / "in", out, heldout_fraction=0.1, shard_tokens=10_000)
    monkeypatch.setattr(shards.SplitWriter, "close", real)
    assert not (out / "manifest.json").exists() and any(out.glob("train-*.bin"))
    with pytest.raises(ConfigError, match="did not finish: run the same prepare command again"):
        open_dataset(_data(out))
    r = prepare(ascii_corpus / "in", out, heldout_fraction=0.1, shard_tokens=10_000)
    assert r["status"] == "written"
    ref = ascii_corpus / "byte"
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert prep.prepare  # the module stays importable after the crash


def test_a_prepared_directory_is_never_written_over(ascii_corpus, tmp_path):
    out = ascii_corpus / "byte"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert prepare(ascii_corpus / "in", out, heldout_fraction=0.1, shard_tokens=10_000)["status"] == "exists"
    with pytest.raises(ConfigError, match=r"already holds a prepared dataset of other input or settings"):
        prepare(ascii_corpus / "in", out, tokenizer=BPE, heldout_fraction=0.1)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds other files and no prepared dataset; choose a new or empty"):
        prepare(ascii_corpus / "in", other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# --- bad input ----------------------------------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> dict:
    tmp.mkdir()
    good = tmp / "good.txt"
    good.write_text("print('hello')\n" * 20)
    cases = {}

    def case(name, files, expect, **kw):
        d = tmp / name
        d.mkdir()
        for rel, data in files.items():
            (d / rel).write_bytes(data if isinstance(data, bytes) else data.encode())
        cases[name] = ([d, good] if kw.pop("with_good", True) else [d], expect, kw)

    case("missing_field", {"x.jsonl": '{"text": "a"}\n{"body": "b", "id": 3}\n'},
         r"x\.jsonl:2 has no field 'text' \(it has: body, id\); set text_field=NAME")
    case("not_json", {"x.jsonl": '{"text": "a"}\n{"text": oops}\n'}, r"x\.jsonl:2 is not a JSON object")
    case("not_text", {"x.jsonl": '{"text": ["a"]}\n'}, r"x\.jsonl:1: field 'text' holds a list, not text")
    case("no_column", {"x.parquet": b""}, r"x\.parquet has no column 'text' \(columns: body\); set column=NAME")
    pq.write_table(pa.table({"body": ["a"]}), tmp / "no_column" / "x.parquet")
    case("binary", {"a.txt": "fine", "z.bin": bytes(range(256)) * 4}, r"z\.bin holds binary data \(a NUL byte at offset 0")
    case("bad_gzip", {"x.jsonl.gz": b"this is not gzip data at all" * 3}, r"cannot decompress .*x\.jsonl\.gz as gzip")
    case("bad_parquet", {"x.parquet": b"PAR1 garbage"}, r"cannot read .*x\.parquet as parquet")
    case("empty", {"a.txt": "", "b.txt": ""}, r"holds no text \(every file is empty\)", with_good=False)
    case("no_documents", {"x.jsonl": '{"text": ""}\n\n{"text": null}\n'}, r"holds no documents", with_good=False)
    case("latin1", {"a.txt": "caf\xe9".encode("latin-1")}, r"a\.txt is not UTF-8 text .*prepare with tokenizer=byte",
         tokenizer=BPE)
    cases["missing_path"] = ([tmp / "nope"], r"data path '.*nope' does not exist; fix input", {})
    return cases


def test_bad_inputs_are_one_clear_line_and_leave_nothing(tmp_path):
    for name, (inputs, expect, kw) in _bad_inputs(tmp_path / "in").items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(ConfigError) as e:
            prepare(inputs, out, **kw)
        msg = str(e.value)
        assert re.search(expect, msg) and "\n" not in msg, (name, msg)
        assert not out.exists(), name


def test_bad_input_on_the_command_line_is_exit_2_and_one_line(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"body": "b"}\n')
    proc = run_cli(["-m", "sweeps.prepare", f"input={bad}", f"out={tmp_path / 'out'}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "has no field 'text'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_damaged_shards_and_mismatched_configs_are_refused(ascii_corpus, tmp_path):
    import shutil

    from archs.config import ModelConfig
    from sweeps.engine.dataset import fit_vocab, open_dataset
    from sweeps.engine.plan import plan_run

    d = tmp_path / "copy"
    shutil.copytree(ascii_corpus / "byte", d)
    shard = sorted(d.glob("train-*.bin"))[1]
    # Modified in place, same size: its stamp no longer vouches for it; caught on first use.
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))
    ds = open_dataset(_data(d))
    with pytest.raises(ConfigError, match=rf"shard .*{shard.name} does not match its manifest \(sha256"):
        ds.train.read(0, ds.train.size)
    # Truncated: refused when opened.
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ConfigError, match=rf"shard .*{shard.name} has \d+ bytes, its manifest says \d+: it was "
                                          "truncated"):
        open_dataset(_data(d))
    # A manifest of another tokenizer than the run asks for; a fixed vocabulary of another size.
    with pytest.raises(ConfigError, match=r"data.tokenizer=bpe but .* was prepared with tokenizer=byte"):
        open_dataset(_data(ascii_corpus / "byte", tokenizer="bpe"))
    with pytest.raises(ConfigError, match=r"arch.vocab_size=1000 but the data has 300 token ids"):
        fit_vocab(ModelConfig(vocab_size=1000), _data(ascii_corpus / "bpe"))
    assert fit_vocab(ModelConfig(), _data(ascii_corpus / "bpe")).vocab_size == 300
    with pytest.raises(ConfigError, match=r"data=tokens needs data.dir=DIR"):
        plan_run(compose(["+arch=ar", "sweep=none", "data=tokens"]), 1)
    with pytest.raises(ConfigError, match=r"data.dir and data.tokenizer apply to data=tokens"):
        compose(["+arch=ar", "sweep=none", f"data.dir={d}"])
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size and tokenizer.path apply to tokenizer=bpe"):
        compose(["input=x", "out=y", "tokenizer.vocab_size=300"], "prepare")
    assert compose(["input=x", "out=y"], "prepare").input == ["x"]
    assert compose(["input=[a,b]", "out=y", "tokenizer=bpe"], "prepare").input == ["a", "b"]


# --- batches --------------------------------------------------------------------------------------------------


def test_batches_and_windows_from_shards_equal_whole_stream_indexing(ascii_corpus):
    """Windows that straddle shards, held-out windows and their bytes, for byte and BPE shards,
    against numpy indexing of the whole stream read into memory; byte shards against the
    unchanged data=text path too (same stream, same batches, same held-out windows and bytes)."""
    from sweeps.config import DataConfig
    from conftest import eval_windows, n_bytes, train_batch

    from sweeps.engine.data import load_corpus
    from sweeps.engine.dataset import open_dataset

    text = load_corpus("text", [str(ascii_corpus / "in")], 0.1)
    for name in ("byte", "bpe"):
        ds = open_dataset(_data(ascii_corpus / name))
        assert len(ds.train.shards) > 2
        whole = ds.train.read(0, ds.train.size).astype(np.int32)
        held = ds.heldout.read(0, ds.heldout.size).astype(np.int32)
        for step in range(20):
            starts = ds.train_starts(0, step, 8, 64)
            np.testing.assert_array_equal(ds.train_batch(0, step, 8, 64), whole[starts[:, None] + np.arange(65)])
        w = ds.eval_windows(64, 12)
        avail = (held.size - 1) // 64
        ref = np.stack([held[s:s + 65] for s in (np.arange(12) * avail // 12) * 64])
        np.testing.assert_array_equal(w.tokens, ref)
        if name == "byte":
            np.testing.assert_array_equal(whole, text.train.astype(np.int32))
            for step in range(5):
                np.testing.assert_array_equal(ds.train_batch(3, step, 8, 64), train_batch(text, 3, step, 8, 64))
            np.testing.assert_array_equal(w.tokens, eval_windows(text, 64, 12))
            assert w.bytes.sum() == n_bytes(eval_windows(text, 64, 12)[:, 1:])
            assert ds.sha256 == text.sha256  # the same text: the same corpus digest as data=text
            stdlib = open_dataset(DataConfig())
            ref = load_corpus("stdlib")
            np.testing.assert_array_equal(stdlib.train_batch(0, 7, 16, 256), train_batch(ref, 0, 7, 16, 256))


def test_resident_memory_of_the_shards_stays_small(ascii_corpus):
    """Pages of the memory-mapped shards are released once a window is copied out: after many
    batches almost nothing of them is resident (the kernel would otherwise map whole
    neighbourhoods of every window, and a long run would end holding the corpus)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("needs Linux /proc")
    from sweeps.engine.dataset import open_dataset

    d = ascii_corpus / "byte"
    ds = open_dataset(_data(d))
    for step in range(300):
        ds.train_batch(0, step, 16, 64)

    def resident_kb() -> int:
        total, inside = 0, False
        for line in smaps.read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = str(d) in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    assert any(s._map is not None for s in ds.train.shards)  # the shards are mapped
    assert resident_kb() <= 64, resident_kb()  # 300 x 16 windows of 130 bytes touched, none kept


def test_process_slices_concatenate_to_the_global_batch(ascii_corpus):
    """Each process reads only its rows of the step's global batch; in process order they are it."""
    from sweeps.engine.dataset import open_dataset

    ds = open_dataset(_data(ascii_corpus / "bpe"))
    for step in (0, 5):
        full = ds.train_batch(1, step, 16, 32)
        for count in (1, 2, 4, 8, 16):
            per = 16 // count
            parts = [ds.train_batch(1, step, 16, 32, rows=slice(i * per, (i + 1) * per)) for i in range(count)]
            assert all(p.shape == (per, 33) for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), full)


PROCESS_ROWS = textwrap.dedent("""
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from types import SimpleNamespace
    from archs.sharding import batch_sharding, make_mesh
    from sweeps.engine.distributed import process_rows
    B, T = 16, 9
    glob = np.arange(B * T, dtype=np.int32).reshape(B, T)
    out = []
    for data, fsdp, tensor, procs in [(8, 1, 1, 4), (2, 2, 2, 4), (1, 4, 2, 2), (2, 4, 1, 8)]:
        mesh = make_mesh(SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor, expert=1))
        sh = batch_sharding(mesh)
        devs = jax.devices()
        per = len(devs) // procs
        groups = [devs[i * per:(i + 1) * per] for i in range(procs)]
        rows = [process_rows(sh, B, g) for g in groups]
        # each simulated process holds only its rows; each device takes its part of them
        index = sh.devices_indices_map((B, T))
        arrays = []
        for g, r in zip(groups, rows):
            local = glob[r]
            for d in g:
                lo, hi, _ = index[d][0].indices(B)
                arrays.append(jax.device_put(local[lo - r.start:hi - r.start], d))
        built = jax.make_array_from_single_device_arrays((B, T), sh, arrays)
        even = [(i * B // procs, (i + 1) * B // procs) for i in range(procs)]
        out.append({"mesh": [data, fsdp, tensor], "same": bool((np.asarray(built) == glob).all()),
                    "even": [(r.start, r.stop) for r in rows] == even})
    print(json.dumps(out))
""")


def test_process_rows_assemble_the_global_batch_on_simulated_devices():
    """8 simulated devices split into 2, 4 or 8 'processes' in device order, for meshes with and
    without a tensor axis: each process's rows (sweeps.engine.distributed.process_rows) are an even
    split in process order, and the global array built from per-process data equals the global batch (the
    single-process equivalent of jax.make_array_from_process_local_data)."""
    proc = run_cli(["-c", PROCESS_ROWS], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["same"] and r["even"] for r in res), res


# --- training from shards ---------------------------------------------------------------------------------

RUN = ["+arch=ar", "sweep=none", "arch.size=xxs", "train.seq_len=32", "train.batch_size=4", "train.tokens=768",
       "train.eval_windows=8", "train.eval_batch=4", "train.evals=2", "train.log_every=1", "train.progress=false",
       "train.tensorboard=false", "train.checkpoint_every_s=3600", "train.checkpoint_every_steps=2"]


def test_byte_run_from_shards_equals_the_same_run_from_text(ascii_corpus, tmp_path):
    """Bits per byte (and every logged number) of a run from byte shards equal those of the same
    run from data=text to 1e-6; the row records tokenizer, vocabulary and epochs."""
    from sweeps.engine.loop import train

    rows, logs = {}, {}
    for name, data in (("text", ["data=text", f"data.paths=[{ascii_corpus / 'in'}]", "data.heldout_fraction=0.1"]),
                       ("tokens", ["data=tokens", f"data.dir={ascii_corpus / 'byte'}"])):
        row = train(compose(RUN + data + [f"root={tmp_path / name}"]))
        assert row["status"] == "done", row["error"]
        rows[name] = row
        logs[name] = [json.loads(ln) for ln in (tmp_path / name / "runs" / row["run_id"] / "metrics.jsonl").open()]
    assert rows["tokens"]["eval_bpb"] == pytest.approx(rows["text"]["eval_bpb"], abs=1e-6)
    for a, b in zip(logs["text"], logs["tokens"], strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
    m = json.loads((ascii_corpus / "byte" / "manifest.json").read_text())
    for row in rows.values():
        assert (row["tokenizer"], row["vocab_size"]) == ("byte", 259)
        assert row["epochs"] == pytest.approx(768 / m["splits"]["train"]["tokens"])
    assert rows["tokens"]["corpus_sha256"] == rows["text"]["corpus_sha256"]


def test_bpe_bits_per_byte_equal_nats_over_decoded_window_text(ascii_corpus):
    """Trainer.evaluate on BPE windows (token NLL / the bytes table) against a direct
    recomputation: every window's nats summed, over ln 2 times the UTF-8 length of the window's
    target text as the tokenizers library decodes it. The model's vocabulary is the data's."""
    import jax
    from tokenizers import Tokenizer

    from sweeps.engine.dataset import open_dataset
    from sweeps.engine.plan import plan_run
    from sweeps.engine.trainer import EVAL_KEY, Trainer

    d = ascii_corpus / "bpe"
    cfg = compose(RUN + ["data=tokens", f"data.dir={d}"])
    plan = plan_run(cfg, 1)
    assert plan.model_cfg.vocab_size == 300 and cfg.arch.vocab_size == 259
    ds = open_dataset(cfg.data)
    w = ds.eval_windows(32, 8)
    tr = Trainer(cfg, plan, jax.devices()[:1])
    state = tr.init_state()
    bpb = tr.evaluate(state, w.tokens, w.bytes)
    params, _, other = state
    nats = float(sum(np.sum(tr._eval(params, other, w.tokens[i:i + 4], jax.random.fold_in(jax.random.key(EVAL_KEY), i)))
                     for i in range(0, 8, 4)))
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    text_bytes = sum(len(hf.decode([t for t in row[1:].tolist() if t < ds.vocab.eod]).encode()) for row in w.tokens)
    assert bpb == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-6)
    assert text_bytes / w.tokens[:, 1:].size > 1.5  # BPE tokens hold several bytes each


def test_a_resumed_run_from_shards_sees_the_batches_it_would_have_seen(ascii_corpus, tmp_path, monkeypatch):
    """A BPE run from shards killed at step 5 resumes from its last checkpoint: every step, before
    and after, gets the very batch of an uninterrupted run, and it ends with the same bits per byte."""
    from sweeps.engine.loop import train
    from sweeps.engine.trainer import Trainer

    seen = []
    real = Trainer.step
    fail_at = {"step": None}

    def step(self, state, batch, s):
        if s == fail_at["step"]:
            fail_at["step"] = None
            raise RuntimeError("killed")
        seen.append((s, np.array(batch)))
        return real(self, state, batch, s)

    monkeypatch.setattr(Trainer, "step", step)
    data = ["data=tokens", f"data.dir={ascii_corpus / 'bpe'}", "data.tokenizer=bpe"]
    ref = train(compose(RUN + data + [f"root={tmp_path / 'ref'}"]))
    reference, seen[:] = list(seen), []
    fail_at["step"] = 5
    cfg = compose(RUN + data + [f"root={tmp_path / 'resumed'}"])
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    row = train(cfg)
    steps = [s for s, _ in seen]
    assert steps[:5] == [0, 1, 2, 3, 4] and steps[5:] in ([4, 5], [2, 3, 4, 5])  # resumed from a checkpoint
    for s, batch in seen:
        np.testing.assert_array_equal(batch, dict(reference)[s])
    assert row["status"] == ref["status"] == "done"
    assert row["eval_bpb"] == pytest.approx(ref["eval_bpb"], abs=1e-6)
    m = json.loads((ascii_corpus / "bpe" / "manifest.json").read_text())
    assert (row["tokenizer"], row["vocab_size"]) == ("bpe", 300)
    assert row["epochs"] == pytest.approx(768 / m["splits"]["train"]["tokens"])
    corpus = json.loads((tmp_path / "resumed" / "runs" / row["run_id"] / "corpus.json").read_text())
    assert corpus["tokenizer"] == "bpe" and corpus["vocab_size"] == 300
