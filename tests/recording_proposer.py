"""A proposer that reads features as a feature draft does, for tests of what the engine hands it.

It keeps each sequence's tokens and features as the rounds tell them (rollback by truncation, as the
channel's client keeps them) and snapshots both every round. Its drafts are the target's own
continuation for a random number of positions, then a wrong token, so the target keeps some drafts and
rejects others. With `alternatives` it also offers one beside each draft (speculative.second_best, in
`last_alternatives`): a wrong one beside a right draft, and beside the wrong draft, half the time, the
right token, so the target takes some.
"""

from __future__ import annotations

import random

import torch

from fuserve.speculative.feature_store import FeatureRows
from fuserve.speculative.proposer import ProposeRequest, feature_rows_begin


class RecordingFeatureProposer:
    reads_features = True

    def __init__(
        self, continuations: list[list[int]], seed: int, vocab: int, alternatives: bool = False
    ) -> None:
        """continuations: every sequence's whole greedy token list (prompt + output); vocab: the
        target's, for the wrong token."""
        self.alternatives = alternatives
        self.last_alternatives: list[list[int]] = []
        self.continuations = continuations
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.tokens: dict[str, list[int]] = {}
        self.features: dict[str, FeatureRows] = {}
        self.snapshots: list[tuple[str, list[int], torch.Tensor]] = []

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        out = []
        self.last_alternatives = []
        for r in requests:
            tokens = self.tokens.setdefault(r.seq_id, [])
            del tokens[r.start :]
            tokens.extend(r.token_ids)
            rows = self.features.setdefault(r.seq_id, FeatureRows())
            assert r.features is not None and r.features.dtype == torch.bfloat16
            begin = feature_rows_begin(r.start)
            assert r.features.shape[0] == len(tokens) - 1 - begin
            rows.put(begin, r.features)
            self.snapshots.append((r.seq_id, list(tokens), rows.get(0, len(tokens) - 1)))
            full = next(c for c in self.continuations if c[: len(tokens)] == tokens)
            n = len(tokens)
            right = self.rng.randrange(0, r.k + 1)
            drafts = (full[n : n + right] + [self.vocab - 1 - full[n]])[: r.k]
            out.append(drafts)
            alts = []
            if self.alternatives:
                for i, draft in enumerate(drafts):
                    right_one = full[n + i] if n + i < len(full) else -1
                    if draft != right_one and self.rng.random() < 0.5:
                        alts.append(right_one)
                    else:  # neither the draft nor the right token
                        alts.append(next(t for t in range(self.vocab) if t not in (draft, right_one)))
            self.last_alternatives.append(alts)
        return out

    def rows_of(self, prompt: list[int]) -> torch.Tensor:
        """The rows of the first round that held this prompt (the first sequence of it, as first sent)."""
        return next(rows for _, tokens, rows in self.snapshots if tokens[: len(prompt)] == prompt)

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self.tokens.pop(s, None)
            self.features.pop(s, None)
