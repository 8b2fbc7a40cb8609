"""Incremental detokenization with stop strings, per sequence.

Decoding only a short window of the newest tokens keeps the cost per token constant; a window
that ends inside a multi-byte character (U+FFFD) waits for the next token. Text that could still
grow into a stop string is held back, so streamed deltas always concatenate to the final text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuserve.workers.tokenizer import Tokenizer


@dataclass
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0

    def add(self, token_ids: list[int]) -> None:
        if self.stopped:
            return
        for tok in token_ids:
            self.ids.append(tok)
            window_start = self._prefix_offset
            prefix = self.tokenizer.decode(
                self.ids[window_start : self._read_offset], self.skip_special_tokens
            )
            full = self.tokenizer.decode(self.ids[window_start:], self.skip_special_tokens)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix) :]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self.ids)
            if self.stop and self._check_stop():
                return

    def _check_stop(self) -> bool:
        longest = max(len(s) for s in self.stop)
        search_from = max(0, self.emitted - longest)
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos = min(p for p, _ in hits)
        self.text = self.text[:pos]
        self.stopped = True
        return True

    def flush(self, final: bool) -> str:
        """The text that is safe to emit now; `final` releases what was held back."""
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            end -= self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
