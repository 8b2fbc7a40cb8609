"""Prompt lookup: propose what followed the last time the sequence's newest tokens appeared.

No model: a sequence that repeats itself (code edits, quoting the prompt, lists, JSON keys) often
continues as it did before. For each n from ngram_max down to ngram_min, the last n tokens are looked up
among the earlier n-grams of the sequence; the first n that matches wins, and the tokens that followed
its most recent earlier occurrence are the drafts.

Each sequence keeps an index per n (n-gram -> where its most recent occurrence ends), grown as tokens
arrive, so a round costs O(new tokens x n) and not a scan of the whole sequence. The engine only ever
sends tokens the target confirmed, so a rollback (`start` below what is held) happens only after a
preemption; the index is then rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuserve.speculative.proposer import ProposeRequest


@dataclass
class _NgramIndex:
    tokens: list[int] = field(default_factory=list)
    # last_end[n][gram] = index of the last token of gram's most recent occurrence, not counting the suffix
    last_end: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending before this index are in last_end


class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"n-gram lengths must satisfy 1 <= min <= max, got {ngram_min}, {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._seqs: dict[str, _NgramIndex] = {}

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        return [self._propose_one(r) for r in requests]

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self._seqs.pop(seq_id, None)

    def _propose_one(self, req: ProposeRequest) -> list[int]:
        index = self._seqs.get(req.seq_id)
        if index is None or req.start < len(index.tokens):
            held = index.tokens[: req.start] if index is not None else []
            if len(held) != req.start:
                raise ValueError(
                    f"sequence {req.seq_id}: start {req.start} but the proposer holds {len(held)} tokens"
                )
            index = _NgramIndex(tokens=held)
            self._seqs[req.seq_id] = index
        elif req.start > len(index.tokens):
            raise ValueError(
                f"sequence {req.seq_id}: start {req.start} but the proposer holds {len(index.tokens)} tokens"
            )
        index.tokens.extend(req.token_ids)
        if req.k <= 0:
            return []
        return self._lookup(index, req.k)

    def _lookup(self, index: _NgramIndex, k: int) -> list[int]:
        tokens = index.tokens
        last = len(tokens) - 1  # the suffix ends here; only n-grams ending before it are candidates
        for end in range(index.indexed, last):
            for n in range(self.ngram_min, min(self.ngram_max, end + 1) + 1):
                gram = tuple(tokens[end - n + 1 : end + 1])
                index.last_end.setdefault(n, {})[gram] = end
        index.indexed = max(index.indexed, last)
        for n in range(min(self.ngram_max, len(tokens)), self.ngram_min - 1, -1):
            end = index.last_end.get(n, {}).get(tuple(tokens[last - n + 1 :]))
            if end is not None:
                return tokens[end + 1 : end + 1 + k]
        return []
