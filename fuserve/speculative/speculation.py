"""The engine's side of speculative decoding: who drafts, how many, one proposer round, what is kept.

    engine.step():  speculation.propose(running)        one Proposer.propose call for every running
                                                        decode that drafts (k > 0); sets spec_token_ids
                    scheduler.schedule()                 a drafting decode computes 1 + k tokens
                    model step                           logits at each; sampler verifies (rejection.py)
                    speculation.kept_rows(item, rows)    the run the target kept -> scheduler
A sequence drafts only when its tokens are all on the host (no async overlap: `wants_drafts` tells the
engine to wait), it has no penalties, and it has room for more than one token. With `second_best` a
greedy sequence without a grammar also gets the proposer's alternatives to its drafts (alternatives.py),
verified in the same step. The proposer is told, per sequence, what it already holds (`start`): every
token it was sent is one the target confirmed, so it never holds a rejected draft of ours, only its own
guesses, which it truncates at `start`. Sequences that finished, were preempted or aborted are released
at the next round.
For a feature-reading draft the engine keeps each sequence's target features (feature_store.py, filled
from every completed step by `record_features`) and hands each round the rows the draft lacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from fuserve.configs import SpeculativeConfig
from fuserve.core_messages import SpecCounters
from fuserve.speculative.adaptive_k import AdaptiveK
from fuserve.speculative.alternatives import kept_rows
from fuserve.speculative.feature_store import FeatureStore
from fuserve.speculative.proposer import (
    Proposer,
    ProposeRequest,
    ProposerUnavailable,
    ReadsFeatures,
    feature_rows_begin,
)
from fuserve.speculative.rejection import accepted_run
from fuserve.speculative.stats import SpecStats
from fuserve.workers.sampler import has_penalty
from fuserve.workers.scheduler import ScheduledSeq, SchedulerOutput
from fuserve.workers.sequence import PLACEHOLDER, Sequence, SequenceStatus

EXPLORE_EVERY = 16  # with adaptive k, every 16th step drafts nothing (the plain step's cost)


@runtime_checkable
class ReportsChannelTime(Protocol):
    """A proposer behind a channel (the draft-model deployment) may say how much of its last round was
    the channel's round trip; stats and adaptive k then count it apart from drafting."""

    last_channel_s: float


@runtime_checkable
class ReportsAheadHits(Protocol):
    """A draft that drafts ahead (speculative.draft_ahead) says how many sequences of its last round it
    answered from those drafts."""

    last_ahead_hits: int


@runtime_checkable
class OffersAlternatives(Protocol):
    """A proposer that also says, per request of its last round, its second-best token beside each
    draft it returned (speculative.second_best)."""

    last_alternatives: list[list[int]]


class Speculation:
    def __init__(
        self,
        config: SpeculativeConfig,
        proposer: Proposer,
        valid_drafts: Callable[[Sequence, list[int]], int] | None = None,
    ) -> None:
        """valid_drafts(seq, drafts): how many of them, in order, the sequence's grammar accepts."""
        self.proposer = proposer
        self.valid_drafts = valid_drafts
        self.max_k = config.num_speculative_tokens
        self.second_best = config.second_best and isinstance(proposer, OffersAlternatives)
        self.adaptive_k = AdaptiveK(self.max_k, config.adaptive)
        self.stats = SpecStats(self.max_k)
        self._held: dict[str, int] = {}  # seq id -> tokens the proposer holds
        reads = isinstance(proposer, ReadsFeatures) and proposer.reads_features
        self.features: FeatureStore | None = FeatureStore() if reads else None
        self._round_s = 0.0  # the last round's time, taken out of its step's time
        self._rounds = 0

    # ---- before the step ------------------------------------------------------------------------
    @staticmethod
    def can_draft(seq: Sequence) -> bool:
        """Penalties would count each row's earlier drafts, which is not built: such sequences draft
        nothing. A grammar's drafts are cut at the first one it rejects (`valid_drafts`) and each row
        is masked by the grammar after the drafts before it. (Logprobs come per kept row.)"""
        return not has_penalty(seq.params)

    def _limit(self, seq: Sequence) -> int:
        """Drafts that fit before max_tokens: the step yields one token more than its drafts."""
        return seq.max_tokens - seq.num_output_tokens - 1

    def wants_drafts(self, running: list[Sequence]) -> bool:
        """Whether some running sequence would draft next step (then the engine reads back the step in
        flight first). Judged on acceptance and cost alone, so it holds while tokens are in flight."""
        candidates = [s for s in running if self.can_draft(s) and self._limit(s) > 0]
        return any(self._choose_k(candidates, len(running)))

    def _choose_k(self, seqs: list[Sequence], batch_size: int) -> list[int]:
        """k for each of `seqs` (sequences that may draft) in a batch of `batch_size` decodes."""
        costs = self.adaptive_k.step_costs(batch_size)
        ids = [s.seq_id for s in seqs]
        if not self.adaptive_k.any_drafts(ids, costs):
            return [0] * len(seqs)
        return self.adaptive_k.choose_batch(ids, [self._limit(s) for s in seqs], costs)

    def propose(self, running: list[Sequence]) -> None:
        """One round: drafts for every running decode whose k > 0, in seq.spec_token_ids."""
        self._round_s = 0.0
        self._release_gone(running)
        self._rounds += 1
        if self.adaptive_k.adaptive and self._rounds % EXPLORE_EVERY == 0:
            # A plain step now and then: where every step drafts, the cost fit cannot tell a draft's
            # verify cost from the step's base (on the CPU box adaptive k kept drafting at 0.2
            # acceptance, 0.66x of no speculation).
            return
        decodes = [
            s
            for s in running
            if s.status is SequenceStatus.RUNNING
            and s.num_computed_tokens == s.num_tokens - 1
            and s.token_ids[-1] != PLACEHOLDER
            and self.can_draft(s)
        ]
        seqs: list[Sequence] = []
        requests: list[ProposeRequest] = []
        for seq, k in zip(decodes, self._choose_k(decodes, len(running)), strict=True):
            if k == 0:
                continue
            start = self._held.get(seq.seq_id, 0)
            seqs.append(seq)
            features = None
            if self.features is not None:
                features = self.features.rows(seq, feature_rows_begin(start), seq.num_tokens - 1)
            requests.append(ProposeRequest(seq.seq_id, start, seq.token_ids[start:], k, features))
        drafting = {s.seq_id for s in seqs}
        for seq in running:  # in flight, prefilling or not worth it: its acceptance drifts to the prior
            if seq.seq_id not in drafting:
                self.adaptive_k.observe_idle(seq.seq_id)
        if not requests:
            return
        t0 = time.perf_counter()
        try:
            drafts = self.proposer.propose(requests)
        except ProposerUnavailable:
            self._held.clear()  # its state may be gone: send everything when it is back
            return
        self._round_s = time.perf_counter() - t0
        alternatives = self.proposer.last_alternatives if self.second_best else [[]] * len(seqs)
        for seq, req, proposed, alts in zip(seqs, requests, drafts, alternatives, strict=True):
            if proposed is None:  # the proposer no longer holds it (evicted): all of it next round
                self._held[seq.seq_id] = 0
                seq.spec_token_ids = []
                continue
            self._held[seq.seq_id] = seq.num_tokens
            seq.spec_token_ids = list(proposed[: req.k])
            if self.valid_drafts is not None and seq.params.grammar is not None:
                del seq.spec_token_ids[self.valid_drafts(seq, seq.spec_token_ids) :]
            elif alts and seq.params.greedy and seq.params.grammar is None:
                seq.spec_alt_ids = self._alternatives(seq.spec_token_ids, alts)
        channel_s = self.proposer.last_channel_s if isinstance(self.proposer, ReportsChannelTime) else 0.0
        hits = self.proposer.last_ahead_hits if isinstance(self.proposer, ReportsAheadHits) else 0
        self.stats.observe_round([r.k for r in requests], self._round_s, channel_s, hits)
        self.adaptive_k.observe_round(self._round_s, max(r.k for r in requests), channel_s)

    @staticmethod
    def _alternatives(drafts: list[int], alts: list[int]) -> list[int]:
        """The alternatives up to the first that is no real one (none, or the draft itself)."""
        out: list[int] = []
        for draft, alt in zip(drafts, alts, strict=False):
            if alt < 0 or alt == draft:
                break
            out.append(alt)
        return out

    def after_schedule(self, running: list[Sequence]) -> None:
        """The scheduled chunks hold their drafts now; none carries over to a later step."""
        for seq in running:
            seq.spec_token_ids = []
            seq.spec_alt_ids = []

    def _release_gone(self, running: list[Sequence]) -> None:
        live = {s.seq_id for s in running}
        gone = [seq_id for seq_id in self._held if seq_id not in live]
        if gone:
            for seq_id in gone:
                del self._held[seq_id]
                self.adaptive_k.forget(seq_id)
            self.proposer.release(gone)

    # ---- after the step -------------------------------------------------------------------------
    def record_features(
        self, out: SchedulerOutput, features: torch.Tensor, sampled: list[int | list[int] | None]
    ) -> None:
        """A completed step's features (every row, in plan order), with the tokens each sequence kept."""
        if self.features is not None:
            self.features.record(out, features, sampled)

    def kept_rows(self, item: ScheduledSeq, row_tokens: list[int]) -> list[int]:
        """The rows a speculating sequence keeps, of its rows' tokens (rejection.accepted_run, and
        alternatives.kept_rows where it offered alternatives): their tokens are what it keeps."""
        if item.spec_alt_ids:
            rows = kept_rows(row_tokens, item.spec_token_ids, item.spec_alt_ids)
        else:
            rows = list(range(len(accepted_run(row_tokens, item.spec_token_ids))))
        num_drafts, num_accepted = len(item.spec_token_ids), len(rows) - 1
        self.stats.observe_verify(num_drafts, num_accepted, len(item.spec_alt_ids), rows[-1] > num_drafts)
        self.adaptive_k.observe_verify(item.seq.seq_id, num_drafts, num_accepted)
        return rows

    def observe_step(self, out: SchedulerOutput, seconds: float) -> None:
        """A completed step's time, less its proposer round, for the cost fit and the stats."""
        seconds = max(seconds - self._round_s, 0.0)
        num_drafts = sum(len(item.spec_token_ids) + len(item.spec_alt_ids) for item in out.scheduled)
        if num_drafts:
            self.stats.observe_verify_step(seconds)
        if all(item.samples and item.num_known_tokens == 1 for item in out.scheduled):
            self.adaptive_k.observe_decode_step(len(out.scheduled), num_drafts, seconds)

    def snapshot(self) -> SpecCounters:
        return self.stats.snapshot()
