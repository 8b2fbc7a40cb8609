"""What the engine asks of a proposer, whatever makes the drafts (an n-gram lookup, a draft model).

One call per engine step for the whole batch: the engine sends each speculating sequence's tokens
since the last round and how many drafts it wants (k); the proposer answers with at most k token ids
per sequence. A proposer keeps its own per-sequence state (a draft model's paged KV cache), so each
request says where that state must be cut before the new tokens are appended (`start`): drafts the
target rejected are rolled back by truncation, never recomputed from the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class ProposeRequest:
    """One sequence's part of a round. The sequence is `tokens[:start]` as the proposer already holds
    them, followed by `token_ids`; `start` is 0 the first time (and after a preemption)."""

    seq_id: str
    start: int
    token_ids: list[int]
    k: int


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


class ProposerUnavailable(RuntimeError):
    """The proposer cannot answer now; the engine speculates with k = 0 until it can."""
