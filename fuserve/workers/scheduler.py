"""Iteration-level scheduling: which sequences run this step, and how many tokens each computes.

Each step:
  1. running sequences go first (decodes cost one token each; unfinished prefills take a chunk),
     preempting the running sequence with the most work left when blocks run out;
  2. waiting sequences are admitted in priority order while the token budget, the sequence limit
     and the block pool allow. Priority is shortest estimated work first, less an aging credit for
     the time waited, so a long request cannot be passed over for ever.
A preempted sequence frees its blocks and is recomputed later (its finished blocks usually come
back as prefix-cache hits). Pure Python on plain data: no torch, no model.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from fuserve.configs import SchedulerConfig
from fuserve.speculative.alternatives import alternative_kept
from fuserve.workers.block_manager import BlockManager
from fuserve.workers.sequence import PLACEHOLDER, FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """A chunk of tokens [start, start + num_new_tokens) of one sequence; fixed when scheduled. A
    speculating decode's chunk is its last token followed by its drafts (`spec_token_ids`, counted in
    num_new_tokens): the step yields a token at each of them and keeps those the target agrees with."""

    seq: Sequence
    num_new_tokens: int
    start: int = -1
    samples: bool = False  # the chunk reaches the end of the known tokens, so it yields the next one
    spec_token_ids: list[int] = field(default_factory=list)
    # alternatives to the first drafts (Sequence.spec_alt_ids), after the drafts in the chunk
    spec_alt_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        seq = self.seq  # made for every scheduled sequence every step: no property calls here
        if self.start < 0:
            self.start = seq.num_computed_tokens
        known = self.num_new_tokens - len(self.spec_token_ids) - len(self.spec_alt_ids)
        self.samples = self.start + known == len(seq.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """The chunk's tokens of the sequence itself, drafts and alternatives not counted."""
        return self.num_new_tokens - len(self.spec_token_ids) - len(self.spec_alt_ids)

    @property
    def num_rows(self) -> int:
        """Logit rows the chunk yields: one per draft and alternative plus one, when it samples."""
        return 1 + len(self.spec_token_ids) + len(self.spec_alt_ids) if self.samples else 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # (source, destination) cache slots, flattened: a kept alternative's K/V goes from where the last
    # verify step wrote it to its position, before this step's forward reads or writes the cache
    kv_copies: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def has_drafts(self) -> bool:
        """Whether a sequence verifies drafts in this step: how many tokens it keeps is known only once
        the step is read back, so no later step may be planned for it before then."""
        return any(s.spec_token_ids for s in self.scheduled)


_QUEUE_KEY = attrgetter("queue_key")
_ARRIVAL = attrgetter("arrival_time")


class Scheduler:
    """The waiting queue keeps, for each sequence, a key fixed when it joins (`queue_key`) and the
    queue's total work: a waiting sequence computes nothing, so its work and its order against the
    others do not change while it waits (every priority gains the same aging credit). A burst leaves
    thousands waiting; ordering them and summing their work then costs no Python call per sequence."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.clock = clock
        self.waiting: list[Sequence] = []  # change it only through _enqueue / _dequeue
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._waiting_work: dict[Sequence, int] = {}  # each waiting sequence's work when it joined
        self._kv_copies: list[int] = []  # for the next step's output (SchedulerOutput.kv_copies)

    # ---- queue management -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.queue_key = self._priority_key()(seq)  # fixed while it waits: it computes nothing
        self.waiting.append(seq)
        self._waiting_work[seq] = seq.remaining_work

    def _dequeue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        del self._waiting_work[seq]

    @property
    def waiting_work(self) -> int:
        """The waiting queue's work in tokens: summed in C over the values kept on joining."""
        return sum(self._waiting_work.values())

    def waiting_in_order(self) -> list[Sequence]:
        """The waiting queue in admission order (sorted in place: mostly sorted already, so cheap)."""
        self.waiting.sort(key=_QUEUE_KEY)
        return self.waiting

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is and give back its blocks."""
        if seq.is_finished:
            return
        seq.drop_placeholders()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self._waiting_work:
            self._dequeue(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def outstanding_tokens(self) -> int:
        """Work still queued here, in tokens: what the router balances on."""
        return self.waiting_work + sum(s.remaining_work for s in self.running)

    def priority(self, seq: Sequence, now: float) -> float:
        if self.config.policy == "fcfs":
            return seq.arrival_time
        return seq.remaining_work - self.config.aging_tokens_per_s * (now - seq.arrival_time)

    def _priority_key(self) -> Callable[[Sequence], float]:
        """A key in `priority`'s order at any `now`: priority(seq, now) = key(seq) - aging * now, the same
        shift for every sequence. The running batch sorts by it each step; a waiting sequence keeps its
        value from when it joined (`queue_key`)."""
        if self.config.policy == "fcfs":
            return _ARRIVAL
        aging = self.config.aging_tokens_per_s
        return lambda s: s.remaining_work + aging * s.arrival_time

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(kv_copies=self._kv_copies)
        self._kv_copies = []
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        bm = self.block_manager

        # Running first, best priority first; victims are taken from the back of this order.
        self.running.sort(key=self._priority_key())
        queue = deque(self.running)  # taken from the front, victims from the back: O(1) each
        kept: list[Sequence] = []
        block_size = bm.block_size
        while queue and budget > 0:
            seq = queue.popleft()
            num_tokens = len(seq.token_ids)
            if num_tokens - len(seq.prompt_token_ids) >= seq.max_tokens:  # its in-flight token is its last
                kept.append(seq)
                continue
            n = num_tokens - seq.num_computed_tokens
            if n > budget:
                if not chunked:
                    kept.append(seq)
                    continue
                n = budget
            drafts, alts = self._drafts_that_fit(seq, n, budget) if seq.spec_token_ids else ([], [])
            extra = len(drafts) + len(alts)
            end = seq.num_computed_tokens + n + extra
            if end > len(seq.block_table) * block_size:  # it needs a block: there may be none left
                while not bm.can_append(seq, seq.num_computed_tokens + n):
                    victim = queue.pop() if queue else seq
                    self._preempt(victim, out)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    break
                bm.append_slots(seq, end)
            out.scheduled.append(ScheduledSeq(seq, n + extra, spec_token_ids=drafts, spec_alt_ids=alts))
            kept.append(seq)
            budget -= n + extra
        kept.extend(queue)
        self.running = kept

        # Admit waiting sequences; stop at the first that does not fit so it is not starved. One whose
        # grammar still compiles is passed over: it never holds up the others. A full batch or a spent
        # budget admits no one, so the queue (thousands under a burst) is not sorted for nothing.
        room = budget > 0 and len(self.running) < self.config.max_num_seqs
        if not out.preempted and room and self.waiting:
            ready = [s for s in self.waiting_in_order() if not s.waiting_for_grammar]
            for seq in ready:
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                if (not chunked and seq.num_tokens > budget) or not bm.can_allocate(seq):
                    break
                bm.allocate(seq)
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                self._dequeue(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        if out.is_empty:  # no forward runs: the copies wait for the next one (a hit may read the block)
            self._kv_copies, out.kv_copies = out.kv_copies, []
        return out

    def _drafts_that_fit(self, seq: Sequence, n: int, budget: int) -> tuple[list[int], list[int]]:
        """A decode's drafts and their alternatives, as many as the token budget and the free blocks
        allow: alternatives, then drafts, are the first things a short step gives up, before any
        sequence is preempted."""
        if not seq.spec_token_ids or n != 1:
            return [], []
        drafts = seq.spec_token_ids[: max(0, budget - n)]
        alts = seq.spec_alt_ids[: min(len(drafts), max(0, budget - n - len(drafts)))]
        can_append, computed = self.block_manager.can_append, seq.num_computed_tokens
        if alts and not can_append(seq, computed + n + len(drafts) + len(alts)):
            alts = []
        if drafts and not can_append(seq, computed + n + len(drafts)):
            return [], []
        return drafts, alts

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if seq in self.running:
            self.running.remove(seq)
        seq.spec_token_ids = []
        seq.spec_alt_ids = []
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)
        out.preempted.append(seq)

    def on_launched(self, out: SchedulerOutput) -> None:
        """The step is on its way: its chunks count as computed, and each sampling sequence holds a
        placeholder for its coming token, so the next step can be scheduled before this one ends."""
        row = 0
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens = item.start + item.num_known_tokens  # drafts count once kept
            if item.samples:
                seq.token_ids.append(PLACEHOLDER)
                seq.pending_row = row
                row += item.num_rows

    def update_from_output(
        self, out: SchedulerOutput, sampled: list[int | list[int] | None]
    ) -> list[Sequence]:
        """Put each sampled token in its placeholder, publish full blocks for prefix hits, and finish
        the sequences that hit EOS, a stop token or max_tokens. Returns those finished.
        A speculating sequence's entry is the list of tokens it keeps (its kept drafts, then the
        target's own next token): each is checked for a stop in turn, so nothing after a stop is kept,
        and the slots of its rejected drafts go back (`_take_back_drafts`)."""
        finished: list[Sequence] = []
        commit = self.block_manager.commit_computed
        for item, result in zip(out.scheduled, sampled, strict=True):
            seq = item.seq
            if seq.is_finished:  # aborted or stopped while the step ran
                continue
            if result is None:
                commit(seq)
                continue
            pos = item.start + item.num_known_tokens  # the placeholder's index
            if isinstance(result, int):  # one token: nearly every sequence of every step
                seq.token_ids[pos] = result
                reason = self._stop_reason(seq, result, pos + 1 - len(seq.prompt_token_ids))
            else:
                reason = self._keep_tokens(seq, result, pos)
                if item.spec_alt_ids:
                    self._move_kept_alternative(item, result)
            if item.spec_token_ids:
                self._take_back_drafts(seq)
            commit(seq)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _keep_tokens(self, seq: Sequence, tokens: list[int], pos: int) -> FinishReason | None:
        """A speculating sequence's kept tokens from its placeholder at `pos` on, up to the first stop."""
        for i, token in enumerate(tokens):
            if i == 0:
                seq.token_ids[pos] = token
            else:  # the draft before it was kept, so its K/V (computed this step) is valid
                seq.token_ids.append(token)
                seq.num_computed_tokens += 1
            reason = self._stop_reason(seq, token, pos + i + 1 - len(seq.prompt_token_ids))
            if reason is not None:
                return reason
        return None

    def _move_kept_alternative(self, item: ScheduledSeq, kept: list[int]) -> None:
        """Where the target took an alternative, its K/V (written after the drafts) goes to its
        position at the next step, before anything reads it; its slot's block may be given back now,
        but nothing writes there before that copy."""
        at = alternative_kept(kept, item.spec_token_ids, item.spec_alt_ids)
        if at is None:
            return
        table, bs = item.seq.block_table, self.block_manager.block_size
        src = item.start + 1 + len(item.spec_token_ids) + at  # the chunk is [last, drafts, alternatives]
        dst = item.start + 1 + at
        self._kv_copies += [table[src // bs] * bs + src % bs, table[dst // bs] * bs + dst % bs]

    def _take_back_drafts(self, seq: Sequence) -> None:
        """Blocks that held only rejected drafts go back to the pool; rejected slots in a kept block
        are simply written over later (num_computed_tokens already stops before them)."""
        self.block_manager.trim(seq, seq.num_tokens)

    @staticmethod
    def _stop_reason(seq: Sequence, token: int, num_output: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if not p.ignore_eos and token in seq.eos_token_ids:
            return FinishReason.STOP
        if num_output >= seq.max_tokens:
            return FinishReason.LENGTH
        return None
