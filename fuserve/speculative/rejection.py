"""Verification: which drafts the target keeps, so the output is exactly what the target alone gives.

A speculating sequence's step computes logits at 1 + k rows: row j is the target's distribution p_j
for the position right after draft j - 1 (row 0: after the last confirmed token), given drafts
1..j as context. Row j "verifies" draft j + 1; the last row verifies nothing (the bonus row).

Every row yields one token, drawn as follows, and the sequence keeps rows 0..a where a is the first row
whose token differs from the draft it verifies (all k + 1 rows when every draft matches):
  greedy        token_j = argmax p_j. A draft is kept iff it equals the target's own choice, so the
                output is the non-speculative greedy output token for token.
  temperature   p_j is the row's distribution after temperature, top-k, top-p and min-p. Draft x is
                kept with probability p_j(x) (u < p_j(x), u ~ U[0, 1)); on rejection the token is
                drawn from p_j with x removed (the normalized max(p_j - onehot(x), 0)). Then
                P(token = y) = P(x = y) p(y) + sum_{x != y} P(x) (1 - p(x)) p(y) / (1 - p(x)) = p(y)
                for ANY way of choosing x: a greedy draft, a sampled one, a prompt lookup. Only the
                draft's token id is needed, never the draft's distribution.
                Bonus row: a plain draw from p_k.
In both cases the row's token equals its draft exactly when the draft was kept (the residual never
yields x), so the host finds the kept run by comparing tokens with drafts (`accepted_run`).
"""

from __future__ import annotations

import torch

NO_DRAFT = -1  # a row that verifies nothing (the bonus row, or a sequence not speculating)


def rejection_sample(
    probs: torch.Tensor, draft_ids: torch.Tensor, uniform: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One token per row: [R] int64.
    probs: [R, V] the rows' filtered probabilities (need not sum to 1; a row's scale is divided out);
    draft_ids: [R] the draft each row verifies, NO_DRAFT for none; uniform: [R] in [0, 1);
    noise: [R, V] Exp(1) draws for the exponential race (argmax p / E draws from p)."""
    has_draft = draft_ids >= 0
    x = draft_ids.clamp(min=0).unsqueeze(1)
    total = probs.sum(dim=-1)
    p_x = probs.gather(1, x).squeeze(1) / total
    accept = has_draft & (uniform < p_x)
    residual = torch.where(has_draft.unsqueeze(1), probs.scatter(1, x, 0.0), probs)
    drawn = residual.div_(noise).argmax(dim=-1)
    return torch.where(accept, x.squeeze(1), drawn)


def accepted_run(row_tokens: list[int], drafts: list[int]) -> list[int]:
    """The tokens a speculating sequence keeps from its 1 + k rows: every row up to and including the
    first whose token is not the draft it verifies."""
    assert len(row_tokens) == len(drafts) + 1, "one row per draft plus the bonus row"
    for j, draft in enumerate(drafts):
        if row_tokens[j] != draft:
            return row_tokens[: j + 1]
    return list(row_tokens)
