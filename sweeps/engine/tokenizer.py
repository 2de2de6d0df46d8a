"""Tokenizers: bytes, and byte-level BPE (trained on the input or loaded from a tokenizer.json).

Every vocabulary is `n_text` text tokens followed by EOD, MASK and PAD (archs.tokens), so the
special ids are a function of the vocabulary size and masked diffusion works unchanged. The
special tokens live outside the Hugging Face tokenizer: encoding never produces them (a document
that contains the text "<|eod|>" is just text), and documents are separated by EOD alone.

Every text token stands for a fixed byte string (`token_bytes`): decoding is concatenation, and
the text bytes behind a block of targets (the denominator of bits per byte) is a sum over a
per-id table, so bits per byte compare across tokenizers.

BPE encoding follows the tokenizer.json exactly. For the standard byte-level configuration (no
normalizer, the GPT-2 pre-tokenizer regex, no prefix space) a fast path splits text into the
pre-tokenizer's pieces with Python's `re` (the regex spelled out with exact classes) and looks
each piece up in a cache, asking the tokenizer's BPE model only for pieces it has not seen
(natural text repeats itself: a few % of its pieces are new). It gives the ids of
`tokenizers.Tokenizer.encode` (tests check it) several times faster than it (the library spends
most of its time on its own regex). Other byte-level configurations go through the library.
"""

from __future__ import annotations

import hashlib
import json
from array import array
import re
import sys
import unicodedata
from functools import cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from archs.errors import ConfigError
from archs.tokens import BYTES, N_SPECIAL, Vocab


def dtype_for(vocab_size: int) -> np.dtype:
    """The shard dtype: uint16 below 65,536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ByteTokenizer:
    """Ids 0..255 are the bytes (today's tokenizer, archs.tokens.BYTES)."""

    name = "byte"

    def __init__(self):
        self.vocab = BYTES
        self.dtype = dtype_for(self.vocab.size)
        self.token_bytes = [bytes([i]) for i in range(256)] + [b""] * N_SPECIAL

    def encode(self, data: bytes) -> bytes:
        """The ids of `data` as raw `dtype` bytes."""
        return np.frombuffer(data, np.uint8).astype(self.dtype).tobytes()


# --- byte-level BPE ----------------------------------------------------------------------------


@cache
def byte_chars() -> tuple[str, ...]:
    """The byte-level alphabet (GPT-2's): byte b is written as one printable character, the
    printable Latin-1 bytes as themselves and the rest as U+0100 onwards, in byte order."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return tuple(out)


# The GPT-2 pre-tokenizer regex (contractions, letters, numbers, other symbols, whitespace runs
# that leave their last space to the next word). ASCII text: the classes spelled out exactly.
# (Possessive runs: a run of one class never gives characters back, so they only save backtracking.)
_ASCII_PIECES = re.compile(r"'(?:[stmd]|re|ve|ll)| ?[A-Za-z]++| ?[0-9]++| ?[^\sA-Za-z0-9]++|\s+(?!\S)|\s+", re.ASCII)
# \s of the Hugging Face regex is Unicode White_Space (not quite Python's str.isspace).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _category_class(prefix: str) -> str:
    """A character class of every code point whose Unicode general category starts with `prefix`."""
    out, start = [], None
    for c in range(sys.maxunicode + 2):
        hit = c <= sys.maxunicode and unicodedata.category(chr(c)).startswith(prefix)
        if hit and start is None:
            start = c
        elif not hit and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(c - 1))
            out.append(a if start == c - 1 else f"{a}-{b}")
            start = None
    return "".join(out)


@cache
def _unicode_pieces() -> re.Pattern:
    letters, numbers, ws = _category_class("L"), _category_class("N"), _WHITE_SPACE
    return re.compile(rf"'(?:[stmd]|re|ve|ll)| ?[{letters}]++| ?[{numbers}]++| ?[^{ws}{letters}{numbers}]++"
                      rf"|[{ws}]+(?![^{ws}])|[{ws}]+")


def pieces(text: str) -> list[str]:
    """The GPT-2 byte-level pre-tokenizer's pieces of `text` (their concatenation is `text`)."""
    return (_ASCII_PIECES if text.isascii() else _unicode_pieces()).findall(text)


class _PieceCache(dict):
    """Pre-tokenizer piece -> its ids as raw bytes; a miss asks the BPE model (a dict subclass: hits
    stay C lookups, only misses run Python). Past `limit` entries it starts over (bounded memory)."""

    def __init__(self, bpe, limit: int = 1 << 20):  # ~120 MB
        super().__init__()
        self.bpe, self.limit = bpe, limit

    def __missing__(self, piece: str) -> bytes:
        if len(self) >= self.limit:
            self.clear()
        ids = self[piece] = self.bpe(piece)
        return ids


class BpeTokenizer:
    """A byte-level BPE tokenizer.json, with our special tokens after its vocabulary."""

    name = "bpe"

    def __init__(self, json_text: str, source: str = ""):
        try:
            self.hf = HFTokenizer.from_str(json_text)
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions for bad files
            raise ConfigError(f"{source or 'tokenizer'} is not a tokenizer.json the tokenizers library reads "
                              f"({str(e).splitlines()[0]}); give tokenizer.path a Hugging Face tokenizer.json") from None
        self.json_text = json_text
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()
        spec = json.loads(json_text)
        self.fast = _check_byte_level(spec, source or "tokenizer")
        n_text = self.hf.get_vocab_size(with_added_tokens=True)
        self.vocab = Vocab(n_text)
        self.dtype = dtype_for(self.vocab.size)
        self.token_bytes = self._token_bytes(source) + [b""] * N_SPECIAL
        self._model = self.hf.model
        self._to_chars = {b: c for b, c in enumerate(byte_chars())}
        self._typecode = self.dtype.char
        assert array(self._typecode).itemsize == self.dtype.itemsize
        self._pieces = _PieceCache(self._bpe)

    def _token_bytes(self, source: str) -> list[bytes]:
        added = {i: t.content for i, t in self.hf.get_added_tokens_decoder().items()}
        inverse = {c: b for b, c in enumerate(byte_chars())}
        out = []
        for i in range(self.vocab.n_text):
            if i in added:
                out.append(added[i].encode())
                continue
            tok = self.hf.id_to_token(i)
            if tok is None or any(c not in inverse for c in tok):
                raise ConfigError(f"{source}: token {i} ({tok!r}) is not written in the byte-level alphabet; "
                                  "bits per byte need a byte-level BPE tokenizer (like GPT-2's)")
            out.append(bytes(inverse[c] for c in tok))
        return out

    # -- encoding -------------------------------------------------------------------------------------

    def _bpe(self, piece: str) -> bytes:
        """The BPE model's ids of one pre-tokenizer piece (a cache miss)."""
        chars = piece.encode("utf-8").decode("latin-1").translate(self._to_chars)
        return array(self._typecode, [t.id for t in self._model.tokenize(chars)]).tobytes()

    def encode(self, data: bytes) -> bytes:
        """The ids of UTF-8 `data` as raw `dtype` bytes (raises UnicodeDecodeError for other bytes)."""
        text = data.decode("utf-8")
        if not self.fast:
            return array(self._typecode, self.hf.encode(text, add_special_tokens=False).ids).tobytes()
        return b"".join(map(self._pieces.__getitem__, pieces(text)))

    def encode_reference(self, text: str) -> list[int]:
        """The library's own encoding (the slow reference of `encode`)."""
        return self.hf.encode(text, add_special_tokens=False).ids


def _check_byte_level(spec: dict, source: str) -> bool:
    """Refuse tokenizers whose text does not survive encode + decode byte for byte; True when the
    fast path applies (the plain GPT-2 byte-level configuration)."""
    model, norm, pre, dec = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer"), \
        spec.get("decoder")
    why = None
    if model.get("type") != "BPE":
        why = f"its model is {model.get('type')}, not BPE"
    elif model.get("dropout"):
        why = "it has BPE dropout (encoding would not be deterministic)"
    elif norm is not None:
        why = f"it has a normalizer ({norm.get('type')}) that rewrites text"
    elif (dec or {}).get("type") != "ByteLevel":
        why = f"its decoder is {(dec or {}).get('type')}, not ByteLevel"
    else:
        steps = pre.get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
        byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
        if not byte_level:
            why = "its pre-tokenizer is not ByteLevel"
        elif any(s.get("add_prefix_space") for s in byte_level):
            why = "its pre-tokenizer adds a prefix space (the text would gain bytes)"
    if why:
        raise ConfigError(f"{source} cannot be used: {why}; bits per byte need a lossless byte-level BPE "
                          "tokenizer (train one with tokenizer=bpe tokenizer.vocab_size=N)")
    return pre == {**pre, "type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> BpeTokenizer:
    """A byte-level BPE with `vocab_size` ids in all (our three special tokens included), trained
    on `texts` (deterministic: the same texts give the same tokenizer.json)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - N_SPECIAL, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok.to_str(), "the trained tokenizer")


def load_bpe(path: str | Path) -> BpeTokenizer:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read tokenizer.path={str(path)!r} ({getattr(e, 'strerror', None) or e}); give "
                          "the path of a tokenizer.json") from None
    return BpeTokenizer(text, f"tokenizer.path={str(path)!r}")


def token_lengths(token_bytes: list[bytes]) -> np.ndarray:
    """[vocab] text bytes behind each id (0 for EOD, MASK, PAD): the denominator table of bits per byte."""
    return np.array([len(b) for b in token_bytes], np.int64)


def decode(token_bytes: list[bytes], ids: Iterable[int]) -> bytes:
    """The text bytes of `ids` (special tokens carry none)."""
    return b"".join(token_bytes[i] for i in ids)


def split_documents(ids: np.ndarray, eod: int) -> Iterator[np.ndarray]:
    """The documents of a token stream (each ended by EOD); a trailing unterminated piece too."""
    ends = np.flatnonzero(ids == eod)
    start = 0
    for e in ends:
        yield ids[start:e]
        start = e + 1
    if start < len(ids):
        yield ids[start:]
