"""Predicted time to first token of a request on each replica, and the ranking that minimizes it.

Pure Python on plain dataclasses (no Ray, no torch): the router (`length_aware_router.py`), the
simulator (`benchmarks/route_sim.py`) and the tests call the same functions.

    StepCost      one engine step's seconds = base + per_seq * decoding sequences + per_token * prefill
                  tokens; measured by each engine core from its own steps (workers/step_cost_meter.py)
    ReplicaView   what the router knows of one replica: its step cost, the prefill its running sequences
                  still owe, its decode batch, its waiting queue (each item's priority and prefill, in
                  the engine's own terms: workers/scheduler.py), the prefixes it holds, how old that is
    RequestShape  the new request: prompt tokens, max output tokens, prefix keys
    predict()     -> Prediction: the prefill queued ahead of the request under the engine's order
                  (running prefills first, then waiting sequences of better priority: shortest work
                  first with aging, or arrival order under fcfs), the prompt tokens it finds cached
                  there, the decode batch its prefill shares steps with, and the TTFT that follows
    rank_by_ttft  replicas best first by TTFT + the decode time the request will spend in that
                  replica's batch (capped at `OUTPUT_HORIZON` tokens) + the delay its prefill causes
                  the requests queued behind it there and a few that share its steps: prefill-heavy
                  requests are steered by the queued prefill, decode-heavy ones by the batch size
                  (inter-token latency); a cached prefix counts as the prefill it saves, this request
                  and those its prefill would delay (in a burst: the sum of first-token waits)

Why TTFT and not outstanding tokens: a request's first token waits for the prefill ahead of it, not
for the decode tokens other requests still have to generate; the engine runs running prefills first
and admits waiting ones shortest-work-first, so a 4k-token document that has started prefilling
delays everything behind it while 10k tokens of pending decodes barely do.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace

from fuserve.router.routing_policy import cached_blocks

OUTPUT_HORIZON = 256  # output tokens that count in the score (max_tokens is often the whole context)
BACKLOG_WEIGHT = 0.1  # how much a replica's whole backlog (seconds of work) counts for a long decode
# Requests besides those queued behind it whose first token a request's prefill delays (they arrive and
# share its steps): a prefill's cost to others, so a cached prefix counts for them too. Chosen in the
# simulator (benchmarks/NOTES.md, issue 16b): multi-turn TTFT p99 vs pow2 at 80% load, mean of seeds
# 0-3, was 1.53x with 0, 1.78x with 1, 1.89x with 2, 1.86x with 3; the other rows barely move.
PREFILL_SHARERS = 2.0


@dataclass(frozen=True)
class StepCost:
    """Seconds of one engine step. The defaults are a guess (a mid-size model on one GPU), used only
    until the replica reports its own measured figures."""

    base_s: float = 0.010
    per_seq_s: float = 0.0001
    per_token_s: float = 0.0001

    def step_s(self, prefill_tokens: int, num_decodes: int) -> float:
        return self.base_s + self.per_seq_s * num_decodes + self.per_token_s * prefill_tokens


@dataclass
class QueuedSeq:
    """One waiting sequence: the engine admits the lowest priority first."""

    priority: float  # remaining work minus the aging credit, when taken (fcfs: arrival order key)
    prefill: int  # prompt tokens it still has to compute
    output: int = OUTPUT_HORIZON // 2  # tokens it will generate (decode steps it holds a slot for)
    age_s: float = 0.0  # seconds since `priority` was taken: it has aged this much since
    reported: bool = True  # in the replica's report (False: routed here since, by this router)


@dataclass
class ReplicaView:
    replica_id: str
    cost: StepCost = field(default_factory=StepCost)
    running_prefill: int = 0  # prompt tokens running sequences still have to compute (they go first)
    num_running: int = 0
    num_decoding: int = 0
    waiting: list[QueuedSeq] = field(default_factory=list)
    decode_left: list[int] = field(default_factory=list)  # running decodes' tokens left, smallest first
    known_prefixes: Container[int] = field(default_factory=frozenset)
    token_budget: int = 2048
    max_num_seqs: int = 128
    aging_per_s: float = 200.0
    fcfs: bool = False
    age_s: float = 0.0  # seconds since the reported figures were taken
    inflight_prefill: int = -1  # prefill tokens of the step running when they were taken; -1: none
    cost_samples: int = 0  # engine steps behind `cost` (few: still mostly the meter's prior)


MIN_COST_SAMPLES = 32


def share_step_costs(views: list[ReplicaView]) -> list[ReplicaView]:
    """Every replica takes the step cost of the one that has run the most steps.

    The replicas of a deployment run the same model on the same kind of device, so their costs differ
    only by what each fit has seen. A fit moves only when its replica runs steps: one that stops
    getting traffic keeps the cost of its last regime (a burst's, or its first compiles'), looks slower
    than the busy one, and so never gets traffic again. Seen on two H100s: after a burst one replica's
    fit said 25 ms a step against the other's 10, and it received 0 of the next 300 requests. A fresh
    replica's cost is its meter's prior, which can be off either way (a CPU test: every request went to
    the busy replica)."""
    best = max(views, key=lambda v: v.cost_samples, default=None)
    if best is None or best.cost_samples < MIN_COST_SAMPLES:
        return views
    return [v if v.cost == best.cost else replace(v, cost=best.cost) for v in views]


@dataclass
class RequestShape:
    prompt_tokens: int
    max_tokens: int
    prefix_keys: Sequence[int] = ()
    block_size: int = 16
    # Leading tokens that many routed requests share (routing_policy.PrefixPopularity): a replica that does
    # not hold them yet misses them once, so they do not count in the delay a prefill causes the others.
    shared_tokens: int = 0


@dataclass
class Prediction:
    ttft_s: float
    cached_tokens: int
    prefill_ahead: int
    decode_batch: int
    score_s: float  # ttft_s + the decode time in that batch + its prefill's delay to others (see below)
    behind: int = 0  # waiting requests the engine would admit after it (its prefill delays theirs)


MAX_STEPS = 2000  # a prediction replays at most this many engine steps (or jumps)
ARRIVES_AFTER_S = 1e-9  # the new request comes an instant after those routed before it (a burst)


@dataclass(eq=False)  # compared by identity: `me in finished` and `remove` run every replayed step
class _Seq:
    key: float  # admission order: lower first
    arrival: float  # seconds relative to now (<= 0: already there)
    prefill: int  # tokens still to prefill
    output: int
    new: bool = False


def predict(view: ReplicaView, req: RequestShape) -> Prediction:
    """Replays the replica's scheduler on the view, from when its figures were taken to the new
    request's first token. Each step: decodes take one token of the budget each, running prefills
    the rest first, then waiting sequences already there are admitted in priority order (stopping at
    the first that does not fit) while budget and sequence slots last; the step takes
    `cost.step_s(prefill tokens, decodes)`; a sequence whose prefill ends decodes `output` steps, then
    frees its slot. Steps with nothing to admit are jumped over. The replica's work since its report is
    part of the replay, and a request routed here since enters when it was routed. Later arrivals that
    would cut in (shortest work first) are unknown, so not counted."""
    cost = view.cost
    # the engine never serves a prompt's last token from the cache: whole blocks before it only
    blocks = min(
        cached_blocks(req.prefix_keys, view.known_prefixes), (req.prompt_tokens - 1) // req.block_size
    )
    cached = max(blocks, 0) * req.block_size
    own = max(req.prompt_tokens - cached, 1)
    new_key = float(req.prompt_tokens + req.max_tokens)
    pending = [
        _Seq(
            q.priority if view.fcfs else q.priority - view.aging_per_s * q.age_s,
            -q.age_s,
            max(q.prefill, 1),
            q.output,
        )
        for q in view.waiting
    ]
    # it arrives after every request already sent there: an idle replica has started a step without it
    me = _Seq(math.inf if view.fcfs else new_key, ARRIVES_AFTER_S, own, req.max_tokens, new=True)
    pending.append(me)
    pending.sort(key=lambda s: (s.key, s.arrival))
    ahead = view.running_prefill + sum(s.prefill for s in pending if s.key < me.key)
    behind = sum(1 for s in pending if s.key > me.key)

    # running decodes, as the step number at which each ends (unknown ones: like the longest known)
    known = sorted(view.decode_left)
    unknown = max(view.num_decoding - len(known), 0)
    ends = known + [known[-1] if known else OUTPUT_HORIZON // 2] * unknown
    heapq.heapify(ends)
    prefilling: list[_Seq] = []
    if view.running_prefill:
        prefilling.append(_Seq(0.0, -view.age_s, view.running_prefill, OUTPUT_HORIZON // 2))
    slots_used = max(view.num_running, len(ends) + len(prefilling))
    t, step = -view.age_s, 0
    if view.inflight_prefill >= 0:  # the step running when the figures were taken comes first
        t += cost.step_s(view.inflight_prefill, len(ends))
        step = 1
        while ends and ends[0] <= step:
            heapq.heappop(ends)
            slots_used -= 1
    for _ in range(MAX_STEPS):
        decodes = len(ends)
        budget = max(view.token_budget - decodes, 0)
        tokens, finished = 0, []
        for s in prefilling:  # running prefills first
            chunk = min(s.prefill, budget)
            s.prefill -= chunk
            budget -= chunk
            tokens += chunk
            if s.prefill == 0:
                finished.append(s)
        i = 0
        while i < len(pending) and budget > 0 and slots_used < view.max_num_seqs:
            s = pending[i]
            if s.arrival > t:  # not there yet
                i += 1
                continue
            del pending[i]
            chunk = min(s.prefill, budget)
            s.prefill -= chunk
            budget -= chunk
            tokens += chunk
            slots_used += 1
            prefilling.append(s)
            if s.prefill == 0:
                finished.append(s)
        if tokens == 0:  # nothing to prefill now: jump to the next arrival or the next slot freed
            arrivals = [s.arrival for s in pending if s.arrival > t]
            next_arrival = min(arrivals) if arrivals else math.inf
            if not ends:
                if next_arrival == math.inf:
                    break  # nothing more can happen (the request cannot be admitted)
                t = next_arrival
                continue
            k = ends[0] - step
            if next_arrival < math.inf:
                k = min(k, max(1, math.ceil((next_arrival - t) / cost.step_s(0, decodes))))
            k = max(k, 1)
            t += k * cost.step_s(0, decodes)
            step += k
        else:
            t += cost.step_s(tokens, decodes)
            step += 1
        if me in finished:
            return _prediction(view, req, cached, ahead, t, decodes, behind)
        for s in finished:
            prefilling.remove(s)
            heapq.heappush(ends, step + s.output)
        while ends and ends[0] <= step:
            heapq.heappop(ends)
            slots_used -= 1
    return _prediction(
        view, req, cached, ahead, max(t, 0.0) + 60.0, len(ends), behind
    )  # cannot tell: far off


def backlog_s(view: ReplicaView) -> float:
    """Seconds of work the replica holds, with every step full: what a burst's makespan balances."""
    cost = view.cost
    known = view.decode_left
    typical = known[-1] if known else OUTPUT_HORIZON // 2
    decode_tokens = sum(known) + typical * max(view.num_decoding - len(known), 0)
    decode_tokens += sum(q.output for q in view.waiting) + OUTPUT_HORIZON // 2 * (view.running_prefill > 0)
    prefill = view.running_prefill + sum(q.prefill for q in view.waiting)
    per_decode = cost.per_seq_s + cost.base_s / view.max_num_seqs
    return max(prefill * cost.per_token_s + decode_tokens * per_decode - view.age_s, 0.0)


def _prediction(
    view: ReplicaView, req: RequestShape, cached: int, ahead: int, ttft: float, decodes: int, behind: int
) -> Prediction:
    batch = min(max(decodes, view.num_running) + 1, view.max_num_seqs)
    decode_s = min(req.max_tokens, OUTPUT_HORIZON) * view.cost.step_s(0, batch)
    ttft = max(ttft, 0.0)
    # the longer the request decodes, the more the replica's whole backlog is its business (it shares
    # steps with all of it): balances decode-heavy requests on work, which is what a burst's throughput needs
    share = min(req.max_tokens, OUTPUT_HORIZON) / OUTPUT_HORIZON
    score = ttft + decode_s + BACKLOG_WEIGHT * share * backlog_s(view)
    # its prefill delays the first token of every request queued behind it there, and of those that
    # share its steps meanwhile: a cached prefix is worth the prefill it saves them too
    # (a prefix many requests share is charged to this request's own TTFT only: see RequestShape)
    prefill_s = max(req.prompt_tokens - max(cached, req.shared_tokens), 1) * view.cost.per_token_s
    score += prefill_s * (behind + PREFILL_SHARERS)
    return Prediction(ttft, cached, ahead, decodes, score, behind)


@dataclass(frozen=True)
class TtftTie:
    """Scores this close are a tie, decided by the cached prefix, then a hash of it (stickiness)."""

    seconds: float = 0.002
    fraction: float = 0.05

    def margin(self, best: float) -> float:
        return max(self.seconds, self.fraction * best)


def _spread(key: int, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{key}:{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rank_by_ttft(
    views: Sequence[ReplicaView], req: RequestShape, tie: TtftTie = TtftTie(), peers: float = 1.0
) -> list[tuple[str, Prediction]]:
    """(replica id, its prediction), best first: near-ties by deeper cache, then a rendezvous hash of
    the request's deepest prefix key, then the score; the rest by score. `peers`: how many routers send
    on the same reports (replica_view.PeerEstimate.factor)."""
    if not views:
        return []
    preds = {v.replica_id: predict(v, req) for v in views}
    best = min(preds.values(), key=lambda p: p.score_s)
    # One router: the margin scales with the first token's wait, not with the score's decode time (5% of
    # a long answer's decode time called 100 ms of TTFT a tie, which the cache or the hash then decided).
    # `peers` routers on one stale report: (peers - 1) / peers of the sends since are unknown, so the
    # margin grows toward the whole score's and near-ties spread by the hash (4 routers herded without).
    others = 1 - 1 / max(peers, 1.0)
    limit = best.score_s + tie.margin(best.ttft_s + others * (best.score_s - best.ttft_s))
    deepest = req.prefix_keys[-1] if req.prefix_keys else None

    def order(rid: str) -> tuple:
        p = preds[rid]
        if p.score_s > limit:
            return (1, 0, 0, p.score_s, rid)
        spread = _spread(deepest, rid) if deepest is not None else 0
        return (0, -p.cached_tokens, -spread, p.score_s, rid)

    return [(rid, preds[rid]) for rid in sorted(preds, key=order)]
