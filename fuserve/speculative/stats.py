"""Speculative decoding's counters: what was proposed, what the target kept, what it cost.

The engine adds to them as it goes and sends a copy with every step's stats (core_messages.SpecCounters);
/metrics (router/metrics.py) and the benchmarks derive the rates from the counters, so a scraper can
take rates over any window.
"""

from __future__ import annotations

import msgspec

from fuserve.core_messages import SpecCounters


class SpecStats:
    def __init__(self, max_k: int) -> None:
        self.counters = SpecCounters(
            reached_at=[0] * max_k, accepted_at=[0] * max_k, k_counts=[0] * (max_k + 1)
        )

    def observe_round(
        self, ks: list[int], draft_s: float, channel_s: float = 0.0, ahead_hits: int = 0
    ) -> None:
        """One proposer call that asked each sequence for ks[i] drafts; `ahead_hits` of them the draft
        answered from drafts it made ahead (speculative.draft_ahead)."""
        c = self.counters
        c.num_rounds += 1
        c.num_ahead_hits += ahead_hits
        c.draft_seconds += draft_s
        c.channel_seconds += channel_s
        for k in ks:
            c.k_counts[min(k, len(c.k_counts) - 1)] += 1

    def observe_overlap(self, rounds: int = 0, drafted_across: int = 0, ahead_hits: int = 0) -> None:
        """speculative.draft_overlap: rounds read after a plain step (`ahead_hits` of their sequences the
        draft answered from drafts made ahead), and sequences whose drafts from such a round a step
        verified."""
        self.counters.num_rounds_overlapped += rounds
        self.counters.num_drafted_across += drafted_across
        self.counters.num_ahead_hits += ahead_hits

    def observe_verify(
        self, num_drafts: int, num_accepted: int, num_alternatives: int = 0, took_alternative: bool = False
    ) -> None:
        """One sequence checked `num_drafts` drafts (and `num_alternatives` alternatives to them) and kept
        `num_accepted` tokens before the target's own; the last of them an alternative where it took one
        (the chain ended there: the draft after it was not reached)."""
        c = self.counters
        c.num_verifies += 1
        c.num_drafts += num_drafts
        c.num_accepted += num_accepted
        c.num_alternatives += num_alternatives
        c.num_alternatives_kept += took_alternative
        reached = num_accepted if took_alternative else num_accepted + 1
        for i in range(min(num_drafts, reached, len(c.reached_at))):
            c.reached_at[i] += 1
            c.accepted_at[i] += i < num_accepted

    def observe_verify_step(self, seconds: float) -> None:
        self.counters.num_verify_steps += 1
        self.counters.verify_seconds += seconds

    def snapshot(self) -> SpecCounters:
        """A copy for the step's stats message (sent every step: lists copied, nothing deeper)."""
        c = self.counters
        return msgspec.structs.replace(
            c, reached_at=list(c.reached_at), accepted_at=list(c.accepted_at), k_counts=list(c.k_counts)
        )


def acceptance_rate(c: SpecCounters) -> float:
    """Drafts kept over drafts checked (0 before any)."""
    return c.num_accepted / c.num_drafts if c.num_drafts else 0.0


def mean_accepted_length(c: SpecCounters) -> float:
    """Tokens a speculating sequence gains per step: its kept drafts plus the target's own token."""
    return (c.num_verifies + c.num_accepted) / c.num_verifies if c.num_verifies else 0.0


def acceptance_at(c: SpecCounters) -> list[float]:
    """[i]: of the verifies that checked a draft at position i + 1, the share that kept it."""
    return [a / n if n else 0.0 for a, n in zip(c.accepted_at, c.reached_at, strict=True)]
