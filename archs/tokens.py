"""Token ids shared by every tokenizer: the text tokens first, then three special tokens.

A vocabulary of n text tokens (256 for bytes, the merges of a BPE model, the symbols of a
synthetic task) is followed by

    EOD   ends a document and opens the next (it plays the BOS role for what follows it)
    MASK  the absorbing state of masked diffusion; never a target, never sampled
    PAD   reserved; never a target, never sampled

so the special ids are a pure function of the vocabulary size, and a model, an objective or a
sampler that knows its vocabulary size knows them too.
"""

from __future__ import annotations

from dataclasses import dataclass

N_SPECIAL = 3


@dataclass(frozen=True)
class Vocab:
    n_text: int  # text tokens: ids 0 .. n_text - 1

    @classmethod
    def of_size(cls, size: int) -> "Vocab":
        return cls(int(size) - N_SPECIAL)

    @property
    def eod(self) -> int:
        return self.n_text

    @property
    def mask(self) -> int:
        return self.n_text + 1

    @property
    def pad(self) -> int:
        return self.n_text + 2

    @property
    def size(self) -> int:
        return self.n_text + N_SPECIAL

    @property
    def never_emitted(self) -> tuple[int, int]:
        """Ids that are not text and are never targets or samples."""
        return (self.mask, self.pad)


BYTES = Vocab(256)  # the byte-level tokenizer: ids 0..255 are bytes, then EOD 256, MASK 257, PAD 258
