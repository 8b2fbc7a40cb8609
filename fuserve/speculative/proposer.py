"""What the engine asks of a proposer, whatever makes the drafts (an n-gram lookup, a draft model).

One call per engine step for the whole batch: the engine sends each speculating sequence's tokens
since the last round and how many drafts it wants (k); the proposer answers with at most k token ids
per sequence. A proposer keeps its own per-sequence state (a draft model's paged KV cache), so each
request says where that state must be cut before the new tokens are appended (`start`): drafts the
target rejected are rolled back by truncation, never recomputed from the start.

A feature-reading draft (`reads_features`) also gets the target's features of the rows it has not
computed yet: f_{start-1} .. f_{n-2} for a sequence of n tokens (f_0 on at start 0), where f_i is the
target's last hidden state (before its final norm) at position i. Draft row i reads token i + 1 and f_i,
so with tokens[:start] it could compute rows up to start - 2 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass
class ProposeRequest:
    """One sequence's part of a round. The sequence is `tokens[:start]` as the proposer already holds
    them, followed by `token_ids`; `start` is 0 the first time (and after a preemption)."""

    seq_id: str
    start: int
    token_ids: list[int]
    k: int
    # rows max(start - 1, 0) .. start + len(token_ids) - 2, [rows, hidden] bf16; a feature draft only
    features: torch.Tensor | None = None


def feature_rows_begin(start: int) -> int:
    """The first row a round's features hold: the proposer already holds the rows before it."""
    return max(start - 1, 0)


class Proposer(Protocol):
    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]:
        """At most `k` proposed token ids per request, in order; an empty list proposes nothing, and
        None says the proposer no longer holds that sequence at `start` (it evicted it): the engine
        sends it whole (start 0) next round. A proposer that cannot answer (its draft replica is gone)
        raises ProposerUnavailable."""
        ...

    def release(self, seq_ids: list[str]) -> None:
        """The sequences finished or were preempted: drop their state."""
        ...


@runtime_checkable
class ReadsFeatures(Protocol):
    """A proposer that drafts from the target's features (its requests carry `features`)."""

    reads_features: bool


class ProposerUnavailable(RuntimeError):
    """The proposer cannot answer now; the engine speculates with k = 0 until it can."""
