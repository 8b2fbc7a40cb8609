"""What an engine that overlaps its draft rounds with plain steps keeps (speculative.draft_overlap): the
drafts of rounds it read after a plain step, and which of them still apply.

    a round sent when a sequence had n tokens  ->  drafts d1 d2 .. dk for tokens n, n+1, ..
    a plain step then wrote token n = y        ->  d2 .. dk still apply if y == d1 (the plain step verified
                                                   d1: PEARL's pre-verify), else none does
    a verify that kept every draft             ->  the next round may be one the draft drafted ahead
                                                   (DraftRunner.draft_ahead): worth a short wait for it

Pure Python over plain data; Speculation._propose_overlapped sends and reads the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuserve.speculative.proposer import ProposeRequest
from fuserve.workers.sequence import Sequence

# how long a step waits for a reply before it steps plain (3x the quickest reply, within these)
HIT_WAIT_MIN_S = 2e-4
HIT_WAIT_MAX_S = 1e-3
# overlap steps plain only for a round of at most this many sequences: at batch 8 (an 8B-shape target, a
# 1B-shape draft on a second H200) it lost to waiting, 0.97-1.05x against 1.09-1.14x at acceptance 0.7
OVERLAP_MAX_SEQS = 1


@dataclass
class OverlapDrafts:
    drafted: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # seq id -> (length then, drafts)
    sent: list[ProposeRequest] = field(default_factory=list)  # the round submitted and not read yet
    may_hit: dict[str, bool] = field(default_factory=dict)  # its last verify kept every draft
    fastest_reply_s: float = HIT_WAIT_MAX_S / 3  # the quickest reply seen (a round drafted ahead)

    def absorb(self, drafts: list[list[int] | None], live: set[str] | None) -> list[str]:
        """The read round's drafts, each kept with the length its sequence had when they were asked for
        (what they follow), for `live` sequences only (all, if None). Returns the sequences the proposer
        no longer holds (it evicted them: they go whole next round)."""
        evicted = []
        for req, proposed in zip(self.sent, drafts, strict=True):
            if live is not None and req.seq_id not in live:
                continue
            if proposed is None:
                self.drafted.pop(req.seq_id, None)
                evicted.append(req.seq_id)
                continue
            self.drafted[req.seq_id] = (req.start + len(req.token_ids), list(proposed))
        self.sent = []
        return evicted

    def drafts_now(self, seq: Sequence, k: int) -> list[int]:
        """Up to k of the sequence's kept drafts that still apply: the tokens it gained since they were
        drafted (plain steps, a verify) are their first ones, and some are left after those."""
        entry = self.drafted.get(seq.seq_id)
        if entry is None:
            return []
        at, drafts = entry
        end = seq.settled_end()  # before the placeholder of a step in flight (expected_token's case)
        gained = end - at
        if gained < 0 or gained >= len(drafts) or seq.token_ids[at:end] != drafts[:gained]:
            del self.drafted[seq.seq_id]
            return []
        return drafts[gained : gained + k]

    def made_before_a_plain_step(self, seq: Sequence) -> bool:
        """Whether the sequence's kept drafts were asked for before the tokens it has gained since."""
        entry = self.drafted.get(seq.seq_id)
        return entry is not None and seq.num_tokens > entry[0]

    def wait_s(self, seq_ids: list[str], num_drafting: int) -> float:
        """How long a round of these sequences waits for its reply before they step plain: a moment where
        the draft may have drafted it ahead, none where it cannot have (the last verify rejected a draft,
        a plain step ran, a first round), and all of it for a batch (OVERLAP_MAX_SEQS)."""
        if num_drafting > OVERLAP_MAX_SEQS:
            return float("inf")
        if not any(self.may_hit.get(s, False) for s in seq_ids):
            return 0.0
        return min(max(3 * self.fastest_reply_s, HIT_WAIT_MIN_S), HIT_WAIT_MAX_S)

    def forget(self, live: set[str]) -> None:
        """Drop what it keeps of sequences no longer running."""
        for seq_id in [s for s in self.drafted if s not in live]:
            del self.drafted[seq_id]
        for seq_id in [s for s in self.may_hit if s not in live]:
            del self.may_hit[seq_id]

    def clear(self) -> None:
        """The proposer's state may be gone (it was unavailable): nothing kept applies."""
        self.drafted.clear()
        self.sent = []
