"""The engine's queue in the terms the router's TTFT model uses (router/ttft_model.py ReplicaView).

Sent with every step's stats (core_messages.CoreStats). While more than `MAX_WAITING` sequences
wait it is rebuilt at most every `REFRESH_S`: the frontend reports it to the routers only every
0.25 s, and a burst can leave thousands waiting, which should not cost a sort per step. A short queue
is summarized every time, so the last stats before the engine goes idle are exact.

    running_prefill_tokens  prompt tokens running sequences still have to compute: the scheduler
                            gives them the step's token budget before admitting anyone
    num_decoding            running sequences past their prefill: one token of budget each per step
    waiting_queue           the first `MAX_WAITING` waiting sequences in admission order as
                            (priority now, tokens to prefill, tokens to generate); the rest folded
                            into one last entry
    decode_left             the fewest output tokens any running decodes have left (smallest first):
                            when the batch is full, a new sequence waits for these to end
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from operator import attrgetter, sub

from fuserve.workers.scheduler import Scheduler, SchedulerOutput
from fuserve.workers.sequence import Sequence

_TOKEN_IDS = attrgetter("token_ids")
_PROMPT = attrgetter("prompt_token_ids")
_COMPUTED = attrgetter("num_computed_tokens")
_MAX_TOKENS = attrgetter("max_tokens")

MAX_WAITING = 64
MAX_DECODE_LEFT = 32
REFRESH_S = 0.02


@dataclass
class QueueSummary:
    running_prefill_tokens: int = 0
    num_decoding: int = 0
    waiting_queue: list[tuple[float, int, int]] = field(default_factory=list)
    decode_left: list[int] = field(default_factory=list)


def prefill_tokens(out: SchedulerOutput) -> int:
    """A step's tokens less its decodes (a decode computes one token, and its drafts when it
    speculates, and samples the next)."""
    return out.num_tokens - sum(
        s.num_new_tokens for s in out.scheduled if s.num_known_tokens == 1 and s.samples
    )


def summarize_queue(scheduler: Scheduler, now: float) -> QueueSummary:
    out = QueueSummary()
    left: list[int] = []
    for seq in scheduler.running:
        n = len(seq.token_ids)
        to_prefill = n - seq.num_computed_tokens  # a decode's: 1, its in-flight token
        if to_prefill > 1:
            out.running_prefill_tokens += to_prefill
        else:
            out.num_decoding += 1
            left.append(seq.max_tokens - n + len(seq.prompt_token_ids))
    out.decode_left = heapq.nsmallest(MAX_DECODE_LEFT, left)
    queue = scheduler.waiting_in_order()
    head = [_entry(scheduler, s, now) for s in queue[:MAX_WAITING]]
    if len(queue) > MAX_WAITING:
        tail = queue[MAX_WAITING:]
        head.append((scheduler.priority(tail[0], now), *_tail_totals(tail)))
    out.waiting_queue = [(round(p, 1), n, o) for p, n, o in head]
    return out


def _tail_totals(tail: list[Sequence]) -> tuple[int, int]:
    """The tail's tokens to prefill (summed) and tokens to generate (the most), in C-level maps: a burst
    leaves thousands waiting, and a Python expression per sequence cost ~2 ms a step at 4,800."""
    sizes = list(map(len, map(_TOKEN_IDS, tail)))
    prefill = sum(sizes) - sum(map(_COMPUTED, tail))
    outputs = map(sub, sizes, map(len, map(_PROMPT, tail)))  # each one's output tokens so far
    return prefill, max(map(sub, map(_MAX_TOKENS, tail), outputs))


def _entry(scheduler: Scheduler, s: Sequence, now: float) -> tuple[float, int, int]:
    """One entry of `waiting_queue`, in the terms the router's TTFT model replays (ttft_model.predict)."""
    prefill = s.num_tokens - s.num_computed_tokens
    return scheduler.priority(s, now), prefill, s.max_tokens - s.num_output_tokens


class QueueSummaryCache:
    """`summarize_queue`; with a long queue, recomputed only when the last one is older than `REFRESH_S`."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._last = QueueSummary()
        self._at = float("-inf")

    def get(self) -> QueueSummary:
        now = self.scheduler.clock()
        if len(self.scheduler.waiting) <= MAX_WAITING or now - self._at >= REFRESH_S:
            self._last, self._at = summarize_queue(self.scheduler, now), now
        return self._last
