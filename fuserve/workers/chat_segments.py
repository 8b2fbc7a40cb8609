"""A rendered chat prompt tokenized piece by piece between its added tokens, the pieces kept for later.

Every turn of a conversation sends the whole history again, and both the HAProxy router (for its
routing hint) and the replica's frontend tokenize all of it: ~2 us a token on a 2-core CPU, 9.7 ms for
a 4,600-token history (benchmarks/NOTES.md, 2026-11-27), almost all of it text seen on the turn
before. `tokenizers` cuts the text at its added tokens (`<|im_start|>`, `<|im_end|>`, ...) before it
normalizes, pre-tokenizes and runs the model on each piece alone, so the ids of a piece do not depend
on its neighbours: encoding the pieces one by one and joining them gives the same ids, and a piece
seen before costs a dictionary lookup. Pieces not seen are encoded together in one batch call.

That holds only where the cut is plain: no added token strips the spaces beside it, matches whole
words only or matches after normalization, and the pre-tokenizer treats every piece alike (a
`Metaspace` that prefixes only the first piece does not). `for_backend` checks the flags and compares
one probe text both ways, and returns None where either fails: such a tokenizer encodes whole texts.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from typing import Any

import tokenizers

MAX_CACHED_CHARS = 8_000_000  # of piece text; its ids kept as 4-byte arrays: ~20 MB in all at most
_PROBE_WORDS = ("Hello", " world", "\n\n", " 2026", "é x")


class SegmentEncoder:
    """Encodes texts (without special tokens added) piece by piece, keeping the pieces' ids in an LRU
    bounded by their total length. Thread-safe: the frontends tokenize long bodies off the event loop."""

    def __init__(self, backend: tokenizers.Tokenizer, added: list[str], max_chars: int = MAX_CACHED_CHARS):
        self.backend = backend
        # leftmost, then longest first at one position: the order `tokenizers` matches added tokens in
        self._split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
        )
        self.max_chars = max_chars
        self._cache: OrderedDict[str, array] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    @classmethod
    def for_backend(cls, backend: tokenizers.Tokenizer) -> SegmentEncoder | None:
        """An encoder for this tokenizer, or None where piecewise ids could differ from whole-text ids."""
        added = list(backend.get_added_tokens_decoder().values())
        if not added or any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added):
            return None
        encoder = cls(backend, [t.content for t in added if t.content])
        probe = "".join(w + t.content for w in _PROBE_WORDS for t in added[:4]) + " tail"
        whole = backend.encode(probe, add_special_tokens=False).ids
        return encoder if encoder.encode(probe) == whole else None

    def encode(self, text: str) -> list[int]:
        pieces = [p for p in self._split.split(text) if p]
        with self._lock:
            found = [self._cache.get(p) for p in pieces]
            for piece, ids in zip(pieces, found, strict=True):
                if ids is not None:
                    self._cache.move_to_end(piece)
        missing = list(dict.fromkeys(p for p, ids in zip(pieces, found, strict=True) if ids is None))
        if missing:
            new = dict(zip(missing, (e.ids for e in _encode_batch(self.backend, missing)), strict=True))
            with self._lock:
                for piece, ids in new.items():
                    self._keep(piece, ids)
            found = [new[p] if ids is None else ids for p, ids in zip(pieces, found, strict=True)]
        out: list[int] = []
        for ids in found:
            out.extend(ids)
        return out

    def _keep(self, piece: str, ids: list[int]) -> None:
        if len(piece) > self.max_chars or piece in self._cache:
            return
        self._cache[piece] = array("I", ids)  # a list of ints would take 9x the memory
        self._chars += len(piece)
        while self._chars > self.max_chars:
            old, _ = self._cache.popitem(last=False)
            self._chars -= len(old)

    @property
    def cached_chars(self) -> int:
        return self._chars

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its pieces and lock (the tokenizer travels to spawned frontend processes)."""
        return {"backend": self.backend, "split": self._split.pattern, "max_chars": self.max_chars}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.backend = state["backend"]
        self._split = re.compile(state["split"])
        self.max_chars = state["max_chars"]
        self._cache = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()


def _encode_batch(backend: tokenizers.Tokenizer, texts: list[str]) -> list[Any]:
    """One call for every new piece; `encode_batch_fast` (no offsets) where this `tokenizers` has it."""
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:
        return fast(texts, add_special_tokens=False)
    return backend.encode_batch(texts, add_special_tokens=False)
