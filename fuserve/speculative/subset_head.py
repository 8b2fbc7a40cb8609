"""A draft's LM head over a subset of the vocabulary: the draft chooses among the V' tokens the target
says most often, and reads V' rows of the tied embedding per token instead of all V.

The shipped draft (2 layers, hidden 576) reads ~87 % of its per-token bytes in the 49,152 x 576 head;
its greedy token chosen among the 4k-8k most frequent tokens of its training data is the full head's
choice at all but a few positions (training/results/draft_acceptance.json), at a fraction of the cost.

    load:    weight [V, H] (the tied embedding) --rows `ids`--> a contiguous [V', H] copy, gathered once
    draft:   hidden [S, H] --linear--> logits [S, V'] --argmax--> index [S] --ids[index]--> target ids [S]

The input embedding stays whole (the draft reads whatever the target said); only the output side shrinks.

Context tokens. A feature draft predicts the rare tokens a reply copies from its context (names, words of
the question, identifiers) about as well as common ones, and a subset of the 4,096 most frequent tokens
cannot propose them: on the held-out set, the two-layer feature draft kept 1.23 chat tokens a round of 4
over the subset, 1.31 over the whole vocabulary, and 1.30 over the subset plus the tokens already in the
sequence (training/results/eagle_acceptance_*). So `greedy` also takes extra candidates: rows of the
embedding for the context tokens outside the subset (`ContextTokens`), a few hundred a sequence.

Exactness. The target verifies every draft, so which tokens a draft can propose changes the speed of
speculation, never its output:
  greedy        a draft is kept iff it equals the target's argmax (rejection.py), whatever proposed it.
  temperature   the engine keeps draft x with probability p(x) and otherwise draws from p with x
                removed, the point-mass rule for a deterministic proposal (rejection.py): exact for any
                way of choosing x, so a draft that can never propose a token outside the subset keeps
                the target's distribution. Should drafts ever sample and be verified with the ratio
                rule (keep x ~ q with probability min(1, p(x)/q(x)), else draw from max(0, p - q)), q
                must be this head's softmax over the subset (0 outside it) and x drawn from that q:
                the rule is exact for any q, and every token outside the subset reaches the output
                through the residual, where q = 0 leaves its whole p(y).

Second best. With speculative.second_best a draft also offers, beside each draft, the best other token
of the same candidates: the target verifies both in one step, and where it rejects the draft but takes
the other, the step still keeps a token it would have lost. The best stays exactly `greedy`'s (the same
argmax, ties to the first column), so turning it on changes no draft; the other is the best of the
columns whose token id differs from it, so it is never the draft again even if a candidate list names a
token twice (ContextTokens never does: it leaves out the subset's tokens, and each token once).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fuserve.workers.kernels.argmax import greedy_tokens

VOCAB_FILE = "draft_vocab.json"  # in a draft's model folder: {"token_ids": [...], ...}


class SubsetHead:
    def __init__(
        self, weight: torch.Tensor, token_ids: torch.Tensor, linear: Callable[..., torch.Tensor] = F.linear
    ) -> None:
        """weight: the full head [V, H] (the draft's tied embedding); token_ids: [V'] the target ids the
        draft may propose, ascending (so that ties go to the lowest id, as over the whole vocabulary);
        linear: the model's own linear op (the full head's: Triton GEMV on the GPU, torch elsewhere)."""
        ids = token_ids.to(device=weight.device, dtype=torch.int64)
        if ids.numel() == 0 or bool((ids[1:] <= ids[:-1]).any()):
            raise ValueError("a draft vocabulary needs distinct token ids in ascending order")
        if int(ids[0]) < 0 or int(ids[-1]) >= weight.shape[0]:
            raise ValueError(
                f"draft vocabulary ids span {int(ids[0])}..{int(ids[-1])}, outside the model's "
                f"{weight.shape[0]} tokens: the vocabulary file belongs to another model"
            )
        self.token_ids = ids
        self.linear = linear
        self.full = weight
        self.weight = weight.index_select(0, ids).contiguous()  # [V', H], gathered once

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, H] -> logits [S, V'] over the subset (column i is token `token_ids[i]`)."""
        return self.linear(hidden, self.weight, None)

    def greedy(
        self, hidden: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """hidden [S, H] -> each row's argmax over the subset (and `extra`'s tokens), as target token
        ids [S] int64."""
        ids, logits = self._candidates(hidden, extra)
        return ids[greedy_tokens(logits)]

    def greedy_with_confidence(
        self, hidden: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`greedy`'s tokens and the draft's probability of each (softmax over the same candidates) [S]
        fp32: how likely the target is to keep it (speculative.draft_confidence)."""
        ids, logits = self._candidates(hidden, extra)
        return ids[greedy_tokens(logits)], confidence(logits)

    def best_two(
        self,
        hidden: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
        with_confidence: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`greedy`'s tokens [S], each row's best other token [S] over the same candidates ("Second
        best"), and with `with_confidence` `greedy_with_confidence`'s probability of the first [S] fp32
        (else None)."""
        ids, logits = self._candidates(hidden, extra)
        best, second = top_two(logits, ids)
        return best, second, confidence(logits) if with_confidence else None

    def _candidates(
        self, hidden: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate token ids [C] and each row's logits over them [S, C]."""
        logits = self.logits(hidden)
        if extra is None:
            return self.token_ids, logits
        ids, rows = extra
        return torch.cat([self.token_ids, ids]), torch.cat([logits, self.linear(hidden, rows, None)], dim=1)


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """[S, C] -> [S] fp32: the softmax probability of each row's largest logit."""
    lf = logits.float()
    return torch.exp(lf.amax(dim=-1) - torch.logsumexp(lf, dim=-1))


def top_two(logits: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, C] over candidate token ids [C] (None: column i is token i) -> each row's best token
    [S] (`greedy_tokens`: ties to the first column) and its best token of another id [S]. Needs two
    distinct candidate ids; the second costs one more masked pass over the logits."""
    if logits.shape[-1] < 2:
        raise ValueError("a second-best token needs at least two candidates")
    where = greedy_tokens(logits)
    if ids is None:
        return where, greedy_tokens(logits.scatter(1, where.unsqueeze(1), float("-inf")))
    best = ids[where]
    others = logits.masked_fill(ids.unsqueeze(0) == best.unsqueeze(1), float("-inf"))
    return best, ids[greedy_tokens(others)]


class ContextTokens:
    """The tokens outside a head's subset that the draft's live sequences hold, with their head rows: the
    extra candidates of `SubsetHead.greedy`. Kept up to date as tokens arrive and sequences leave, at a
    cost in the new tokens only; the rows are gathered again only on a round after the set changed."""

    def __init__(self, head: SubsetHead) -> None:
        self.head = head
        self.subset = set(head.token_ids.tolist())
        self.vocab = head.full.shape[0]
        self.of_seq: dict[str, set[int]] = {}
        self.holders: dict[int, int] = {}  # token -> how many live sequences hold it
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._changed = False

    def add(self, seq_id: str, token_ids: list[int]) -> None:
        held = self.of_seq.setdefault(seq_id, set())
        for t in set(token_ids) - held - self.subset:
            if 0 <= t < self.vocab:
                held.add(t)
                self.holders[t] = self.holders.get(t, 0) + 1
                self._changed |= self.holders[t] == 1

    def drop(self, seq_id: str) -> None:
        for t in self.of_seq.pop(seq_id, ()):
            self.holders[t] -= 1
            if self.holders[t] == 0:
                del self.holders[t]
                self._changed = True

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token ids [E], head rows [E, H]) of every held token outside the subset; None if none."""
        if self._changed:
            self._changed = False
            self._rows = None
            if self.holders:
                ids = torch.tensor(list(self.holders), dtype=torch.int64, device=self.head.full.device)
                self._rows = ids, self.head.full.index_select(0, ids)
        return self._rows

    def __len__(self) -> int:
        return len(self.of_seq)


def read_vocab_file(folder: Path) -> torch.Tensor | None:
    """The token ids of a model folder's draft vocabulary, or None when it has none (full head)."""
    file = Path(folder) / VOCAB_FILE
    if not file.is_file():
        return None
    return torch.tensor(json.loads(file.read_text())["token_ids"], dtype=torch.int64)


def write_vocab_file(folder: Path, token_ids: torch.Tensor, note: str) -> None:
    body = {"token_ids": [int(t) for t in token_ids], "note": note}
    (Path(folder) / VOCAB_FILE).write_text(json.dumps(body) + "\n")
