"""The engine's copy of each sequence's target features, for a feature-reading draft.

    step done:   record(out, features, sampled)   row i of the step -> its sequence's position
                                                  (prompt chunks and decodes: every row; a verify
                                                  step: the last token and the drafts the target kept)
    next round:  rows(seq, begin, end)            f_begin .. f_{end-1}: what the draft reads

f_i is the target's last decoder layer output at position i, before the final norm, in bf16 (half of
fp32's bytes, as training stored them). A sequence's rows stay until it finishes: a preempted one is
recomputed from its prefix-cache hits, which compute no rows, so its earlier rows are what it still has.
A new sequence whose prompt starts with cached blocks has no rows for them: they read as zeros, which
costs the draft acceptance, never the output its exactness (the target verifies every draft).
"""

from __future__ import annotations

import torch

from fuserve.workers.scheduler import SchedulerOutput
from fuserve.workers.sequence import Sequence


class FeatureRows:
    """One sequence's rows 0..len-1, [len, dim] bf16, in a buffer that doubles as it grows (a
    sequence gains a row or a few a step: a concatenation per step would copy all of them each time)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, 0, dtype=torch.bfloat16)
        self.length = 0

    def put(self, start: int, rows: torch.Tensor) -> None:
        """Rows `start..start+len(rows)-1`; any rows held past them are dropped (they were for tokens
        no longer in the sequence, or are about to be recomputed), any gap before `start` reads zero."""
        end = start + rows.shape[0]
        if self.buffer.shape[1] != rows.shape[1] or end > self.buffer.shape[0]:
            grown = torch.zeros(max(end, 2 * self.buffer.shape[0], 16), rows.shape[1], dtype=torch.bfloat16)
            if self.buffer.shape[1] == rows.shape[1]:
                grown[: self.length] = self.buffer[: self.length]
            self.buffer = grown
        if start > self.length:
            self.buffer[self.length : start] = 0
        self.buffer[start:end] = rows
        self.length = end

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def get(self, begin: int, end: int) -> torch.Tensor:
        """Rows begin..end-1, a copy; rows never put read zero."""
        out = torch.zeros(max(end - begin, 0), self.buffer.shape[1], dtype=torch.bfloat16)
        have = min(end, self.length) - begin
        if have > 0:
            out[:have] = self.buffer[begin : begin + have]
        return out


class FeatureStore:
    def __init__(self) -> None:
        self._seqs: dict[str, tuple[Sequence, FeatureRows]] = {}
        self.dim = 0  # the target's hidden size, once a step has told it

    def record(
        self, out: SchedulerOutput, features: torch.Tensor, sampled: list[int | list[int] | None]
    ) -> None:
        """A completed step's rows (features: [T, dim], the step's tokens in plan order), once the
        scheduler has taken its tokens. A speculating sequence keeps as many rows as tokens it kept: its
        last token's and each accepted draft's. Sequences that finished meanwhile are dropped."""
        self.drop_finished()
        self.dim = features.shape[1]
        at = 0
        for item, result in zip(out.scheduled, sampled, strict=True):
            n = item.num_new_tokens
            seq = item.seq
            if not seq.is_finished:
                kept = len(result) if item.spec_token_ids and isinstance(result, list) else n
                entry = self._seqs.get(seq.seq_id)
                if entry is None:
                    entry = self._seqs[seq.seq_id] = (seq, FeatureRows())
                entry[1].put(item.start, features[at : at + kept])
            at += n

    def rows(self, seq: Sequence, begin: int, end: int) -> torch.Tensor:
        """f_begin .. f_{end-1} of the sequence, [end - begin, dim] bf16 (zeros where it has none)."""
        entry = self._seqs.get(seq.seq_id)
        if entry is None:
            return torch.zeros(max(end - begin, 0), self.dim, dtype=torch.bfloat16)
        return entry[1].get(begin, end)

    def drop_finished(self) -> None:
        done = [seq_id for seq_id, (seq, _) in self._seqs.items() if seq.is_finished]
        for seq_id in done:
            del self._seqs[seq_id]

    def __len__(self) -> int:
        return len(self._seqs)
