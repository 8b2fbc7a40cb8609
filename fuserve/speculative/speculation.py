"""The engine's side of speculative decoding: who drafts, how many, one proposer round, what is kept.

    engine.step():  speculation.propose(running)        one Proposer.propose call for every running
                                                        decode that drafts (k > 0); sets spec_token_ids
                                                        (with draft_overlap: a submit, and the reply read
                                                        now or after a plain step: _propose_overlapped;
                                                        with async scheduling too, the step after that
                                                        plain step planned while it runs: propose_behind)
                    scheduler.schedule()                 a drafting decode computes 1 + k tokens
                    model step                           logits at each; sampler verifies (rejection.py)
                    speculation.kept_rows(item, rows)    the run the target kept -> scheduler
A sequence drafts only when its tokens are all on the host (no async overlap: `wants_drafts` tells the
engine to wait; but for propose_behind, whose drafts follow the one token still on the device), it has no
penalties, and it has room for more than one token. With `second_best` a
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
from fuserve.speculative.adaptive_k import PROBE_AFTER, AdaptiveK
from fuserve.speculative.alternatives import kept_rows
from fuserve.speculative.draft_costs import catch_up_tokens
from fuserve.speculative.feature_store import FeatureStore
from fuserve.speculative.overlap import HIT_WAIT_MAX_S, OverlapDrafts
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

# With adaptive k, three rounds in every 48 draft nothing: plain steps for the cost fit while the batch
# drafts. Three in a row so that the middle one is launched behind the step before and the next is launched
# behind it (as a batch that does not draft runs its plain steps: async scheduling), its host work hidden;
# the first carries the host's work after a verify's read-back, the last (at batch > 1) the read-back
# before a verify (AdaptiveK.observe_decode_step fits those apart).
EXPLORE_EVERY = 48
EXPLORE_RUN = 3
PROBE_AFTER_WAITING = 4 * PROBE_AFTER  # a large batch's probe where its round is waited for
BEHIND_POLL_S = 2e-5  # propose_behind looks for the reply, then whether the plain step ended, this often


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
class Overlaps(Protocol):
    """A proposer whose round can be sent and read back apart (DraftProposer's submit / collect), and
    that says whether its draft drafts ahead (speculative.draft_overlap's default)."""

    drafts_ahead: bool
    pending: bool

    def submit(self, requests: list[ProposeRequest]) -> None: ...

    def collect(self, wait_s: float, spin: bool = False) -> list[list[int]] | None: ...


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
        # what the proposer reports, asked once: isinstance against a runtime-checkable Protocol reads
        # every member (7-17 us each on the CI box, several a step)
        self._overlaps = isinstance(proposer, Overlaps)
        self._reports_channel = isinstance(proposer, ReportsChannelTime)
        self._reports_hits = isinstance(proposer, ReportsAheadHits)
        self.adaptive_k = AdaptiveK(self.max_k, config.adaptive)
        self.stats = SpecStats(self.max_k)
        self._held: dict[str, int] = {}  # seq id -> tokens the proposer holds
        reads = isinstance(proposer, ReadsFeatures) and proposer.reads_features
        self.features: FeatureStore | None = FeatureStore() if reads else None
        self._round_s = 0.0  # the last round's time, taken out of its step's time
        self._rounds = 0
        self.overlap = config.draft_overlap  # None: as the draft says (Overlaps.drafts_ahead)
        self._kept = OverlapDrafts()  # overlap's drafts of rounds read after a plain step
        # seq id -> the draft's guess for the token in flight that its drafts this step follow
        self.guesses_behind: dict[str, int] = {}

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

    def _explores(self, round_index: int) -> bool:
        """Whether that round drafts nothing (EXPLORE_EVERY, EXPLORE_RUN)."""
        return self.adaptive_k.adaptive and round_index % EXPLORE_EVERY < EXPLORE_RUN

    def wants_drafts(self, running: list[Sequence]) -> bool:
        """Whether some running sequence would draft next step (then the engine reads back the step in
        flight first). Judged on acceptance and cost alone, so it holds while tokens are in flight; the
        choice is not the step's until `propose` makes it (AdaptiveK.commit)."""
        if self._explores(self._rounds + 1):
            return False
        candidates = [s for s in running if self.can_draft(s) and self._limit(s) > 0]
        return any(self._choose_k(candidates, len(running)))

    def _choose_k(self, seqs: list[Sequence], batch_size: int) -> list[int]:
        """k for each of `seqs` (sequences that may draft) in a batch of `batch_size` decodes."""
        if not self.adaptive_k.adaptive:  # fixed k: no cost fit to evaluate (two a step, ~50 us each)
            return [max(min(self.max_k, self._limit(s)), 0) for s in seqs]
        ak = self.adaptive_k
        # a probe's round costs the target nothing where it overlaps a plain step, a round where not
        ak.probe_after = PROBE_AFTER if self._overlapping() else PROBE_AFTER_WAITING
        costs = ak.step_costs(batch_size)
        ids = [s.seq_id for s in seqs]
        if not ak.any_drafts(ids, costs):
            return [0] * len(seqs)
        # what catching each sequence up would cost a round: its tokens the proposer lacks, beyond the usual
        lacking = [catch_up_tokens(s.num_tokens - self._held.get(s.seq_id, 0), self.max_k) for s in seqs]
        return ak.choose_batch(ids, [self._limit(s) for s in seqs], costs, lacking)

    def propose(self, running: list[Sequence]) -> None:
        """One round: drafts for every running decode whose k > 0, in seq.spec_token_ids."""
        self._round_s = 0.0
        self._release_gone(running)
        self._rounds += 1
        if self._explores(self._rounds):
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
        ks = self._choose_k(decodes, len(running))
        self.adaptive_k.commit(ks)
        chosen = [(s, k) for s, k in zip(decodes, ks, strict=True) if k > 0]
        drafting = {s.seq_id for s, _ in chosen}
        for seq in running:  # in flight, prefilling or not worth it: its acceptance drifts to the prior
            if seq.seq_id not in drafting:
                self.adaptive_k.observe_idle(seq.seq_id)
        if self._overlapping():
            self._propose_overlapped(chosen, running)
            return
        if not chosen:
            return
        requests = [self._request(seq, k) for seq, k in chosen]
        t0 = time.perf_counter()
        try:
            drafts = self.proposer.propose(requests)
        except ProposerUnavailable:
            self._lost()
            return
        self._round_s = time.perf_counter() - t0
        alternatives = self.proposer.last_alternatives if self.second_best else [[]] * len(chosen)
        for (seq, _), req, proposed, alts in zip(chosen, requests, drafts, alternatives, strict=True):
            if proposed is None:  # the proposer no longer holds it (evicted): all of it next round
                self._held[seq.seq_id] = 0
                seq.spec_token_ids = []
                continue
            self._held[seq.seq_id] = seq.num_tokens
            self._use(seq, proposed[: req.k])
            if alts and seq.params.greedy and seq.params.grammar is None:
                seq.spec_alt_ids = self._alternatives(seq.spec_token_ids, alts)
        self._observe_round(requests, self._round_s, self._channel_s(), self._hits())

    def _request(self, seq: Sequence, k: int) -> ProposeRequest:
        """The sequence's round: its tokens the proposer lacks, up to a step in flight (redraft_missed's)."""
        start, end = self._held.get(seq.seq_id, 0), seq.settled_end()
        features = None
        if self.features is not None:
            features = self.features.rows(seq, feature_rows_begin(start), end - 1)
        return ProposeRequest(seq.seq_id, start, seq.token_ids[start:end], k, features)

    def _use(self, seq: Sequence, drafts: list[int]) -> None:
        """The drafts this step verifies for the sequence, cut at the first its grammar rejects."""
        seq.spec_token_ids = list(drafts)
        if self.valid_drafts is not None and seq.params.grammar is not None:
            del seq.spec_token_ids[self.valid_drafts(seq, seq.spec_token_ids) :]

    def _hits(self) -> int:
        return self.proposer.last_ahead_hits if self._reports_hits else 0  # type: ignore[attr-defined]

    def _channel_s(self) -> float:
        """Of the last round's seconds, the channel's round trip (0 for a proposer without one)."""
        return self.proposer.last_channel_s if self._reports_channel else 0.0  # type: ignore[attr-defined]

    def _observe_round(
        self, requests: list[ProposeRequest], seconds: float, channel_s: float, hits: int
    ) -> None:
        ks = [r.k for r in requests]
        self.stats.observe_round(ks, seconds, channel_s, hits)
        catch_up = sum(catch_up_tokens(len(r.token_ids), r.k) for r in requests)  # priced apart
        self.adaptive_k.observe_round(seconds, max(ks), channel_s, catch_up)

    # ---- overlap: a plain step rather than a wait (speculative.draft_overlap) ----------------------
    def _overlapping(self) -> bool:
        if not self._overlaps:
            return False
        return self.proposer.drafts_ahead if self.overlap is None else self.overlap  # type: ignore[attr-defined]

    def _propose_overlapped(self, chosen: list[tuple[Sequence, int]], running: list[Sequence]) -> None:
        """Each sequence verifies drafts it already has, if the tokens since they were drafted are their
        head (the plain steps run meanwhile took the draft's guesses); the others go out in one round,
        whose reply this step takes only if it comes at once (the draft had drafted it ahead). Otherwise
        they step plain while the draft works, and the next step reads the reply, waiting only for what
        the draft has not finished by then: one round pending at a time (overlap.py keeps the drafts).
        Where more than OVERLAP_MAX_SEQS sequences draft this step, their round waits for its reply
        (measured: a batch lost)."""
        proposer: Overlaps = self.proposer  # type: ignore[assignment]
        kept = self._kept
        t0 = time.perf_counter()
        channel_s, hits = 0.0, 0
        asked: list[ProposeRequest] = []
        live = {s.seq_id for s in running}
        try:
            drafting = {s.seq_id for s, _ in chosen}
            if proposer.pending and any(r.seq_id in drafting for r in kept.sent):
                self.collect_pending(live)  # sent before the plain step just run
            need = []
            for seq, k in chosen:
                drafts = kept.drafts_now(seq, k)
                if drafts:
                    self._use(seq, drafts)
                    self.stats.observe_overlap(drafted_across=int(kept.made_before_a_plain_step(seq)))
                else:
                    need.append((seq, k))
            if need:
                sent = time.perf_counter()
                self._submit(need)
                asked = list(kept.sent)
                wait_s = kept.wait_s([seq.seq_id for seq, _ in need], len(chosen))
                reply = proposer.collect(wait_s, spin=wait_s <= HIT_WAIT_MAX_S)
                for seq, _ in need:  # next: a plain step, or drafts the draft had not guessed
                    kept.may_hit[seq.seq_id] = False
                if reply is not None:
                    if wait_s > 0:
                        kept.fastest_reply_s = min(kept.fastest_reply_s, time.perf_counter() - sent)
                    self._absorb(reply, live)
                    hits = self._hits()
                    channel_s = self._channel_s()
                    for seq, k in need:
                        self._use(seq, kept.drafts_now(seq, k))
        except ProposerUnavailable:
            self._lost()
            return
        self._round_s = time.perf_counter() - t0
        if asked:
            self._observe_round(asked, self._round_s, channel_s, hits)

    def propose_behind(self, running: list[Sequence], step_done: Callable[[], bool]) -> bool:
        """With overlap, drafts for the step after the plain step in flight, set before its token is read
        back: the round sent with the plain step drafted from before that token, and its first draft is
        the draft's guess for it, so the drafts after the guess follow the token on the device. Where the
        plain step wrote another token they are verified all the same, against the token on the device
        (exact whatever they follow: one kept by chance is the target's token), and nearly always rejected:
        a verify spent for one token, against the host time between steps that the plain step no longer
        waits for (the engine plans the next step as with async plain steps).
        Only when the round's reply comes before the plain step ends (`step_done`): after that, reading the
        step back first costs the GPU nothing, and it tells whether the guess held. A lone sequence only
        (where overlap steps plain: OVERLAP_MAX_SEQS), without a grammar (which checks drafts on the host).
        Returns whether it set drafts."""
        if len(running) != 1 or not self._overlapping() or self.features is not None:
            return False
        seq = running[0]
        if (
            seq.status is not SequenceStatus.RUNNING
            or seq.token_ids[-1] != PLACEHOLDER
            or seq.num_computed_tokens != seq.num_tokens - 1
            or seq.params.grammar is not None
            or not self.can_draft(seq)
        ):
            return False
        (k,) = self._choose_k([seq], len(running))
        if k <= 0:
            return False
        try:  # the wait runs while the plain step does (no round time: it is the step's)
            if self.has_round_pending(seq.seq_id) and not self.collect_pending({seq.seq_id}, step_done):
                return False
        except ProposerUnavailable:
            self._lost()
            return False
        drafts = self._kept.drafts_now(seq, k + 1)  # the guess for the token in flight, then k after it
        if len(drafts) < 2:
            return False
        self.guesses_behind[seq.seq_id] = drafts[0]
        self._use(seq, drafts[1:])
        self.stats.observe_overlap(drafted_across=1)
        return True

    def redraft_missed(self, running: list[Sequence]) -> None:
        """After the plain step behind which drafts were set (propose_behind) is read back: where it did not
        write the draft's guess, the verify in flight checks drafts that follow another token, so a new
        round goes out now, from the token it wrote. The draft works while that verify runs, and the next
        step reads the reply as after any plain step (its first draft a guess for the verify's token)."""
        guesses = self.guesses_behind
        missed = [
            seq
            for seq in running
            if seq.seq_id in guesses and seq.token_ids[seq.settled_end() - 1] != guesses[seq.seq_id]
        ]
        rounds = [(s, k) for s, k in zip(missed, self._choose_k(missed, len(running)), strict=True) if k > 0]
        if not rounds:
            return
        t0 = time.perf_counter()
        try:
            self._submit(rounds)
        except ProposerUnavailable:
            self._lost()
        self._round_s += time.perf_counter() - t0

    def _lost(self) -> None:
        """The proposer was unavailable: its state may be gone, so everything is sent when it is back,
        and no kept draft applies."""
        self._held.clear()
        self._kept.clear()

    def _submit(self, rounds: list[tuple[Sequence, int]]) -> None:
        """Send one round for these (sequence, k) without reading its reply (overlap's pending round)."""
        kept = self._kept
        kept.sent = [self._request(seq, k) for seq, k in rounds]
        for req in kept.sent:
            self._held[req.seq_id] = req.start + len(req.token_ids)
        self.proposer.submit(kept.sent)  # type: ignore[attr-defined]

    def has_round_pending(self, seq_id: str) -> bool:
        """Whether a round for the sequence was sent and its reply not read yet (overlap)."""
        return self._overlaps and self.proposer.pending and any(r.seq_id == seq_id for r in self._kept.sent)  # type: ignore[attr-defined]

    def collect_pending(self, live: set[str] | None = None, until: Callable[[], bool] | None = None) -> bool:
        """The pending round's reply, waited for (at most the channel's timeout: ProposerUnavailable), or
        only until `until()` says to stop (then False, and the round stays pending); its sequences' drafts
        kept for the steps after the plain step that ran meanwhile (only those of `live` sequences, if
        given). A pending round no sequence of a step can use is left to be replaced by the next one (its
        late reply is dropped)."""
        proposer: Overlaps = self.proposer  # type: ignore[assignment]
        if until is None:
            reply = proposer.collect(float("inf"))
        else:
            reply = proposer.collect(0.0)
            while reply is None and not until():
                reply = proposer.collect(BEHIND_POLL_S, spin=True)
            if reply is None:
                return False
        self._absorb(reply, live)
        self.stats.observe_overlap(rounds=1, ahead_hits=self._hits())
        return True

    def _absorb(self, drafts: list[list[int] | None] | None, live: set[str] | None) -> None:
        assert drafts is not None
        for seq_id in self._kept.absorb(drafts, live):  # the proposer no longer holds it: all next round
            self._held[seq_id] = 0

    def expected_token(self, seq: Sequence) -> int | None:
        """With overlap, the draft's guess for the token the sequence's next step writes (None if it has
        none): what the step must write for the kept drafts after it to apply."""
        drafts = self._kept.drafts_now(seq, 1)
        return drafts[0] if drafts else None

    @staticmethod
    def _alternatives(drafts: list[int], alts: list[int]) -> list[int]:
        """The alternatives up to the first that is no real one (none, or the draft itself)."""
        out: list[int] = []
        for draft, alt in zip(drafts, alts, strict=False):
            if alt < 0 or alt == draft:
                break
            out.append(alt)
        return out

    def after_schedule(self, running: list[Sequence], out: SchedulerOutput) -> None:
        """The scheduled chunks hold their drafts now; none carries over to a later step. A guess behind a
        plain step whose drafts the scheduler dropped (no room) has nothing to follow."""
        for seq in running:
            seq.spec_token_ids = []
            seq.spec_alt_ids = []
        if self.guesses_behind:
            with_drafts = {item.seq.seq_id for item in out.scheduled if item.spec_token_ids}
            for seq_id in [s for s in self.guesses_behind if s not in with_drafts]:
                del self.guesses_behind[seq_id]

    def _release_gone(self, running: list[Sequence]) -> None:
        live = {s.seq_id for s in running}
        self._kept.forget(live)
        for seq_id in [s for s in self.guesses_behind if s not in live]:
            del self.guesses_behind[seq_id]
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
        self.guesses_behind.pop(item.seq.seq_id, None)
        if item.seq.is_finished:  # ended by the plain step before it (propose_behind): nothing was verified
            return rows
        self.stats.observe_verify(num_drafts, num_accepted, len(item.spec_alt_ids), rows[-1] > num_drafts)
        self.observe_kept(item.seq.seq_id, num_drafts, num_accepted)
        return rows

    def observe_kept(self, seq_id: str, num_drafts: int, num_accepted: int) -> None:
        """A verify's outcome for adaptive k, and for overlap whether the next round can be one the draft
        drafted ahead: only after a verify that kept every draft (what drafting ahead assumes)."""
        self.adaptive_k.observe_verify(seq_id, num_drafts, num_accepted)
        self._kept.may_hit[seq_id] = num_accepted == num_drafts

    def observe_step(self, out: SchedulerOutput, seconds: float, hidden: bool = False) -> None:
        """A completed step's time, less its proposer round, for the cost fit and the stats; `hidden`: its
        host work on both sides ran under the GPU's (LLMEngine._complete)."""
        seconds = max(seconds - self._round_s, 0.0)
        self._round_s = 0.0  # a round sent as a step was read back (redraft_missed): out of that one only
        num_drafts = sum(len(item.spec_token_ids) + len(item.spec_alt_ids) for item in out.scheduled)
        if num_drafts:
            self.stats.observe_verify_step(seconds)
        if all(item.samples and item.num_known_tokens == 1 for item in out.scheduled):
            self.adaptive_k.observe_decode_step(len(out.scheduled), num_drafts, seconds, hidden)

    def snapshot(self) -> SpecCounters:
        return self.stats.snapshot()
