"""A discrete-event simulation of N engine replicas behind a router: judge a routing policy in seconds.

    python benchmarks/route_sim.py                               # every workload x policy, 2 replicas
    python benchmarks/route_sim.py --workloads heavy_tail --rate 12 --replicas 4 --routers 4

Each replica is fuserve's own scheduler and block manager (workers/scheduler.py, block_manager.py:
shortest-work-first with aging, chunked prefill, the token budget, the prefix cache), stepping on
virtual time: a step takes `StepCost.step_s(prefill tokens, decodes)` seconds. Replicas report
their routing stats every `report_period_s` (as `record_routing_stats` does, through the same
`routing_report`), routers see a report `report_delay_s` later. The routers see what the HAProxy
path's router sees: each request's prompt and max_tokens, its own sends, the reports; never a
completion (a send counts until a report covers it).

Policies (one router object per simulated router; `routers` > 1 splits the requests over several):
    length_aware    fuserve's: lowest predicted TTFT (router/ttft_model.py), own sends counted K times
    least_tokens    fuserve's previous one: least outstanding tokens, prefix affinity on near-ties
    pow2            Ray Serve's default: two replicas at random, the one with fewer requests
    least_requests  the replica with the fewest requests
    round_robin
    prefix_affinity Ray Serve LLM's PrefixCacheAffinityRouter: the replica whose cache matches most
                    of the prompt when >= 10% matches, else the one with the least cached text; the
                    fewer requests among equals (`prefix_affinity@N`: pow2 instead while the replicas'
                    request counts differ by more than N, its `imbalanced_threshold`)
Request counts (pow2, least_requests, prefix_affinity) are exact and current: Serve's routers
probe the replicas' queue lengths, so this is if anything kind to them.

Writes flat JSON rows (`bench: route_sim`) with TTFT p50/p90/p99, output tok/s and the placement.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from workloads import WORKLOADS, RequestSpec, make_named  # noqa: E402

from fuserve.configs import SchedulerConfig  # noqa: E402
from fuserve.core_messages import CoreStats  # noqa: E402
from fuserve.router.prefix_affinity import AffinityCandidate, rank_by_prefix_affinity  # noqa: E402
from fuserve.router.replica_view import (  # noqa: E402
    PeerEstimate,
    admitted_by,
    covered_until,
    routing_report,
    view_from_report,
)
from fuserve.router.routing_policy import (  # noqa: E402
    Candidate,
    PrefixPopularity,
    RecentPrefixes,
    TieBreak,
    prefix_keys,
    rank_replicas,
)
from fuserve.router.ttft_model import QueuedSeq, RequestShape, StepCost, rank_by_ttft  # noqa: E402
from fuserve.router.unadmitted_sends import UnadmittedSends, still_unreported  # noqa: E402
from fuserve.sampling_params import SamplingParams  # noqa: E402
from fuserve.workers.block_manager import BlockManager  # noqa: E402
from fuserve.workers.routing_summary import prefill_tokens, summarize_queue  # noqa: E402
from fuserve.workers.scheduler import Scheduler  # noqa: E402
from fuserve.workers.sequence import Sequence  # noqa: E402

POLICIES = ("length_aware", "least_tokens", "pow2", "least_requests", "round_robin", "prefix_affinity")
# Llama-3-8B shape on one H100 (benchmarks/NOTES.md: ~7 ms decode step at small batch, ~13 ms at 64-128
# sequences; prefill ~20k tokens/s).
H100_8B = StepCost(base_s=0.0065, per_seq_s=0.00005, per_token_s=0.00005)
BLOCK_SIZE = 16


@dataclass
class SimConfig:
    num_replicas: int = 2
    cost: StepCost = H100_8B
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_blocks: int = 8192  # per replica: 131k tokens of KV at 16 tokens a block
    report_period_s: float = 0.25
    report_delay_s: float = 0.01
    num_routers: int = 1
    seed: int = 0
    # The engine's async scheduling: each step is planned as the one before it starts, so a request that
    # arrives while a step runs waits for the step after the next (one step more than planned at once).
    async_scheduling: bool = False
    path_s: float = 0.0  # the serving path's own part of every TTFT (HTTP, the router's call, IPC, SSE)
    # Transit: a request reaches its replica's engine some time after it is routed. Each router answers
    # one routing call at a time (`router_call_s` each: a burst queues there, and each request is ranked
    # when its call runs), then `transit_s` (HAProxy's forward), then each replica's frontend takes them
    # one at a time (`frontend_s` each: parse, tokenize, the event loop) before its engine core admits it.
    router_call_s: float = 0.0
    transit_s: float = 0.0
    frontend_s: float = 0.0
    # The step-cost law beyond the replicas' fitted line (issue 16, helper 16d; 0 = the line alone). A
    # step that carries any prefill runs eagerly, outside the decode CUDA graphs, and on a GPU its ~700
    # kernel launches take a floor of time whatever its tokens (`mixed_step_s`: the step lasts at least
    # this); a decode reads its whole context (`per_context_s` per KV token a decode row attends to).
    mixed_step_s: float = 0.0
    per_context_s: float = 0.0


def step_seconds(cfg: SimConfig, out: Any, prefill: int) -> float:
    """One step's seconds: the fitted line, the context its decodes read, the eager floor of a step
    with prefill (SimConfig's `mixed_step_s`, `per_context_s`)."""
    seconds = cfg.cost.step_s(prefill, out.num_tokens - prefill)
    if cfg.per_context_s:
        context = sum(s.start + 1 for s in out.scheduled if s.num_known_tokens == 1 and s.samples)
        seconds += cfg.per_context_s * context
    if prefill and cfg.mixed_step_s:
        seconds = max(seconds, cfg.mixed_step_s)
    return seconds


# ---- a replica: the engine's scheduler and block manager on virtual time -----------------------------
class SimReplica:
    def __init__(self, rid: str, cfg: SimConfig, clock: Callable[[], float]) -> None:
        self.rid = rid
        self.cfg = cfg
        self.block_manager = BlockManager(cfg.num_blocks, BLOCK_SIZE, True)
        self.scheduler = Scheduler(cfg.scheduler, self.block_manager, clock)
        self.clock = clock
        self.busy = False
        self.num_admitted = 0
        self.core_added = 0  # what the engine core counts (CoreStats.num_requests_added)
        self.ongoing = 0  # requests admitted and not finished
        self.prefixes = RecentPrefixes(2048)
        self.last_report: dict[str, Any] = {}
        self.last_report_at = 0.0
        self.stats = CoreStats()
        self.inflight: tuple[float, Any] | None = None  # (when it ends, the step running): oracles read it
        self.planned: tuple[float, Any] | None = None  # async scheduling: (seconds, the step queued next)

    def add(self, idx: int, spec: RequestSpec, keys: list[int]) -> None:
        params = SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True)
        seq = Sequence(str(idx), list(spec.prompt_ids), params, self.clock(), spec.max_tokens)
        self.scheduler.add(seq)
        self.num_admitted += 1
        self.core_added += 1
        self.ongoing += 1
        self.prefixes.add(keys)

    def start_step(self) -> tuple[float, Any] | None:
        """Plans a step and launches it: (its seconds, the plan), or None with nothing to run."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return None
        self.scheduler.on_launched(out)
        prefill = prefill_tokens(out)
        self.stats = self.core_stats(prefill)  # the engine core's stats go out as each step starts
        return step_seconds(self.cfg, out, prefill), out

    def finish_step(self, out: Any) -> tuple[list[int], list[int]]:
        """Returns (requests that got their first token, requests that finished)."""
        sampled = [1 if s.samples else None for s in out.scheduled]
        firsts = [  # this step's token is the sequence's first (a later step may be launched already)
            int(s.seq.seq_id)
            for s in out.scheduled
            if s.samples and s.start + s.num_known_tokens == s.seq.num_prompt_tokens
        ]
        done = [int(s.seq_id) for s in self.scheduler.update_from_output(out, sampled)]
        self.ongoing -= len(done)
        return firsts, done

    def core_stats(self, inflight_prefill: int) -> CoreStats:
        s, now = self.scheduler, self.clock()
        q = summarize_queue(s, now)
        return CoreStats(
            num_waiting=len(s.waiting),
            num_running=len(s.running),
            outstanding_tokens=s.outstanding_tokens(),
            step_base_s=self.cfg.cost.base_s,
            step_seq_s=self.cfg.cost.per_seq_s,
            step_token_s=self.cfg.cost.per_token_s,
            running_prefill_tokens=q.running_prefill_tokens,
            num_decoding=q.num_decoding,
            waiting_queue=q.waiting_queue,
            decode_left=q.decode_left,
            inflight_prefill_tokens=inflight_prefill,
            taken_at=now,
            num_requests_added=self.core_added,
        )

    def report(self) -> dict[str, Any]:
        """What `EngineIngress.record_routing_stats` returns (the engine core's last stats), built by
        the same functions."""
        if not self.busy:
            self.stats = self.core_stats(-1)
        stats, now = self.stats, self.clock()
        report = {
            "num_admitted": self.num_admitted,
            "outstanding_tokens": stats.outstanding_tokens,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "prefix_keys": self.prefixes.snapshot()[-512:],
            **routing_report(stats, self.cfg.scheduler),
        }
        if report != self.last_report:
            self.last_report, self.last_report_at = report, now
        return {**report, "timestamp": self.last_report_at}


# ---- routers -------------------------------------------------------------------------------------------
@dataclass
class Routed:
    replica: str
    at: float
    work: int
    prefill: int
    priority: float
    output: int


@dataclass
class RouteInput:
    spec: RequestSpec
    keys: list[int]
    reports: dict[str, dict[str, Any]]  # replica id -> the last report routers have seen
    ongoing: dict[str, int]  # replica id -> requests admitted and not finished (exact, now)
    now: float
    index: int = 0  # the request's place in the workload
    replicas: dict[str, SimReplica] = field(default_factory=dict)  # the true state: only oracles read it


class SimRouter:
    """Base: remembers its own sends (until a report covers them) and the prefixes it sent where."""

    def __init__(self, replica_ids: list[str], rng: random.Random) -> None:
        self.replica_ids = replica_ids
        self.rng = rng
        self.sent: list[Routed] = []
        self.mine = {r: RecentPrefixes(4096) for r in replica_ids}
        self.predicted: dict[int, float] = {}  # request index -> its predicted TTFT (policies that predict)

    def since_report(self, rid: str, reports: dict[str, dict[str, Any]]) -> list[Routed]:
        at = covered_until(reports.get(rid, {}))
        return [s for s in self.sent if s.replica == rid and s.at > at]

    def expire(self, reports: dict[str, dict[str, Any]]) -> None:
        self.sent = [s for s in self.sent if s.at > covered_until(reports.get(s.replica, {}))]

    def choose(self, x: RouteInput) -> str:
        raise NotImplementedError

    def route(self, x: RouteInput) -> str:
        self.expire(x.reports)
        rid = self.choose(x)
        self.record(rid, x)
        return rid

    def record(self, rid: str, x: RouteInput, prefill: int | None = None) -> None:
        spec = x.spec
        n = len(spec.prompt_ids)
        work = n + spec.max_tokens
        self.sent.append(Routed(rid, x.now, work, n if prefill is None else prefill, work, spec.max_tokens))
        self.mine[rid].add(x.keys)


class LengthAware(SimRouter):
    """The length-aware router's view, by the same functions: a send counts until a report covers it by
    time and by the replica's admitted count (`unadmitted_sends`), each counted K times (`PeerEstimate`)."""

    def __init__(self, replica_ids: list[str], rng: random.Random) -> None:
        super().__init__(replica_ids, rng)
        self.peers = PeerEstimate()
        self.popularity = PrefixPopularity()
        self.unadmitted = UnadmittedSends()

    def since_report(self, rid: str, reports: dict[str, dict[str, Any]], now: float = 0.0) -> list[Routed]:
        sends = [s for s in self.sent if s.replica == rid]
        n = self.unadmitted.count(rid, now)
        return still_unreported(sends, lambda s: s.at, covered_until(reports.get(rid, {})), n)

    def route(self, x: RouteInput) -> str:
        for rid, rep in x.reports.items():
            if rep:
                self.peers.on_report(rid, float(rep["timestamp"]), int(rep["num_admitted"]))
                self.unadmitted.on_report(rid, float(rep["timestamp"]), admitted_by(rep))
        unreported = {rid: self.since_report(rid, x.reports, x.now) for rid in self.replica_ids}
        keep = {id(s) for sends in unreported.values() for s in sends}
        self.sent = [s for s in self.sent if id(s) in keep]
        k = self.peers.factor
        views = []
        for rid in self.replica_ids:
            rep = x.reports.get(rid) or {"step_cost": [0, 0, 0]}
            known = _Union(self.mine[rid], frozenset(rep.get("prefix_keys", ())))
            since = [
                QueuedSeq(s.priority, int(s.prefill * k), s.output, x.now - s.at, reported=False)
                for s in unreported[rid]
            ]
            view = view_from_report(rid, rep, x.now, known, since)
            assert view is not None
            views.append(view)
        req = RequestShape(len(x.spec.prompt_ids), x.spec.max_tokens, x.keys, BLOCK_SIZE)
        req.shared_tokens = self.popularity.shared_tokens(x.keys, BLOCK_SIZE)
        self.popularity.add(x.keys)
        rid, pred = rank_by_ttft(views, req, peers=k)[0]
        self.predicted[x.index] = pred.ttft_s
        self.record(rid, x, len(x.spec.prompt_ids) - pred.cached_tokens)
        self.peers.on_sent(rid, x.now)
        self.unadmitted.on_sent(rid, x.now)
        return rid


class LengthAwareBoard(LengthAware):
    """Several routers on one node's send board (fuserve/router/send_board.py): each also counts the
    others' sends from the moment they are made, as if it had made them."""

    shares_sends = True

    def take_peer_send(self, send: Routed, keys: list[int]) -> None:
        self.sent.append(send)
        self.mine[send.replica].add(keys)
        self.peers.on_sent(send.replica, send.at)
        self.unadmitted.on_sent(send.replica, send.at)


class LengthAwareByTime(LengthAware):
    """Before issue 16c: a send stops counting once a report taken after it is seen, arrived or not."""

    def since_report(self, rid: str, reports: dict[str, dict[str, Any]], now: float = 0.0) -> list[Routed]:
        return SimRouter.since_report(self, rid, reports)


class _Union:
    def __init__(self, a: RecentPrefixes, b: frozenset[int]) -> None:
        self.a, self.b = a, b

    def __contains__(self, key: object) -> bool:
        return key in self.a or key in self.b


class LeastTokens(SimRouter):
    def choose(self, x: RouteInput) -> str:
        cands = []
        for rid in self.replica_ids:
            rep = x.reports.get(rid, {})
            load = int(rep.get("outstanding_tokens", 0)) + sum(
                s.work for s in self.since_report(rid, x.reports)
            )
            cands.append(Candidate(rid, load, _Union(self.mine[rid], frozenset(rep.get("prefix_keys", ())))))
        return rank_replicas(cands, x.keys, TieBreak(), BLOCK_SIZE)[0]


class Pow2(SimRouter):
    def choose(self, x: RouteInput) -> str:
        a, b = self.rng.sample(self.replica_ids, 2) if len(self.replica_ids) > 1 else self.replica_ids * 2
        return a if x.ongoing[a] <= x.ongoing[b] else b


class LeastRequests(SimRouter):
    def choose(self, x: RouteInput) -> str:
        return min(self.replica_ids, key=lambda r: (x.ongoing[r], self.rng.random()))


class RoundRobin(SimRouter):
    def __init__(self, replica_ids: list[str], rng: random.Random) -> None:
        super().__init__(replica_ids, rng)
        self.next = rng.randrange(len(replica_ids))

    def choose(self, x: RouteInput) -> str:
        self.next = (self.next + 1) % len(self.replica_ids)
        return self.replica_ids[self.next]


class PrefixAffinity(SimRouter):
    """Ray Serve LLM's PrefixCacheAffinityRouter (router/prefix_affinity.py) with exact queue lengths."""

    def __init__(
        self, replica_ids: list[str], rng: random.Random, imbalanced_threshold: float = float("inf")
    ) -> None:
        super().__init__(replica_ids, rng)
        self.tenant_tokens = dict.fromkeys(replica_ids, 0)
        self.imbalanced_threshold = imbalanced_threshold

    def choose(self, x: RouteInput) -> str:
        cands = [
            AffinityCandidate(r, x.ongoing[r], self.mine[r], self.tenant_tokens[r]) for r in self.replica_ids
        ]
        prompt = len(x.spec.prompt_ids)
        ranked = rank_by_prefix_affinity(
            cands, x.keys, prompt, BLOCK_SIZE, self.rng, self.imbalanced_threshold
        )
        rid = ranked[0]
        self.tenant_tokens[rid] += prompt
        return rid


ROUTER_CLASSES: dict[str, type[SimRouter]] = {
    "length_aware": LengthAware,
    "least_tokens": LeastTokens,
    "pow2": Pow2,
    "least_requests": LeastRequests,
    "round_robin": RoundRobin,
    "prefix_affinity": PrefixAffinity,
    "length_aware_by_time": LengthAwareByTime,  # not in POLICIES: for comparisons (NOTES, issue 16c)
    "length_aware_board": LengthAwareBoard,  # not in POLICIES: the same as length_aware with one router
}


def split_router(name: str) -> tuple[str, float | None]:
    """`prefix_affinity@N` -> ("prefix_affinity", N): Ray Serve LLM's router with its
    `imbalanced_threshold` at N requests (its default is infinite: affinity whatever the queues);
    any other name -> (name, None). bench_serve.py reads router names the same way."""
    base, _, threshold = name.partition("@")
    if threshold and base != "prefix_affinity":
        raise SystemExit(f"{name!r}: only prefix_affinity takes @N (its imbalance threshold)")
    return base, float(threshold) if threshold else None


def router_factory(name: str) -> RouterFactory:
    """A name in ROUTER_CLASSES, or `prefix_affinity@N` (split_router)."""
    base, threshold = split_router(name)
    if base not in ROUTER_CLASSES:
        raise SystemExit(f"unknown policy {name!r}: use one of {sorted(ROUTER_CLASSES)} or prefix_affinity@N")
    if threshold is not None:
        return lambda ids, rng: PrefixAffinity(ids, rng, threshold)
    return ROUTER_CLASSES[base]


# ---- the event loop ------------------------------------------------------------------------------------
@dataclass
class SimResult:
    ttft_s: list[float]
    output_tokens: int
    makespan_s: float
    placement: dict[str, int]
    kinds: list[str]
    predicted: dict[int, float] = field(default_factory=dict)  # request index -> predicted TTFT
    itl_s: list[float] = field(default_factory=list)  # every gap between a request's tokens


T0 = 1.0  # virtual time starts here: a report's timestamp 0 means "none yet", as in Serve


RouterFactory = Callable[[list[str], random.Random], SimRouter]


def simulate(specs: list[RequestSpec], policy: str | RouterFactory, cfg: SimConfig) -> SimResult:
    """`policy`: a name in ROUTER_CLASSES, or a factory of routers (benchmarks/route_bounds.py's oracles)."""
    now = T0
    clock = lambda: now  # noqa: E731 - the replicas' schedulers read virtual time
    ids = [f"r{i}" for i in range(cfg.num_replicas)]
    replicas = {rid: SimReplica(rid, cfg, clock) for rid in ids}
    rng = random.Random(cfg.seed)
    factory = router_factory(policy) if isinstance(policy, str) else policy
    routers = [factory(ids, random.Random(rng.random())) for _ in range(cfg.num_routers)]
    seen: dict[str, dict[str, Any]] = {rid: {} for rid in ids}
    keys = [prefix_keys(s.prompt_ids, BLOCK_SIZE) for s in specs]
    ttft = [math.nan] * len(specs)
    placement = dict.fromkeys(ids, 0)
    output_tokens = 0
    events: list[tuple[float, int, str, Any]] = []
    order = 0

    def push(at: float, kind: str, payload: Any) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, payload))

    for i, spec in enumerate(specs):
        push(T0 + spec.arrival_s, "arrive", i)
    push(T0 - cfg.report_period_s, "report", None)  # idle replicas have reported before the first request
    remaining = len(specs)
    last_finish = 0.0
    last_token = [math.nan] * len(specs)
    itl: list[float] = []

    def run(rid: str, step: tuple[float, Any] | None) -> None:
        rep = replicas[rid]
        rep.busy = step is not None
        rep.inflight = None if step is None else (now + step[0], step[1])
        if step is not None:
            push(now + step[0], "step", (rid, step[1]))
            if cfg.async_scheduling:
                rep.planned = rep.start_step()  # the next step is planned as this one starts

    def kick(rid: str) -> None:
        if not replicas[rid].busy:
            run(rid, replicas[rid].start_step())

    # the path from the client to the engine: router call -> transit -> the replica's frontend -> engine
    router_free = [0.0] * cfg.num_routers
    frontend_free = dict.fromkeys(ids, 0.0)
    in_transit = dict.fromkeys(ids, 0)  # routed, not admitted yet (Serve's request counts include them)

    def route(i: int) -> None:
        ongoing = {r: replicas[r].ongoing + in_transit[r] for r in ids}
        x = RouteInput(specs[i], keys[i], seen, ongoing, now, i, replicas)
        router = routers[i % cfg.num_routers]
        rid = router.route(x)
        if getattr(router, "shares_sends", False):
            for other in routers:
                if other is not router:
                    other.take_peer_send(router.sent[-1], keys[i])  # type: ignore[attr-defined]
        placement[rid] += 1
        in_transit[rid] += 1
        delay = cfg.router_call_s + cfg.transit_s
        if delay:
            push(now + delay, "reach", (i, rid))
        else:
            reach(i, rid)

    def reach(i: int, rid: str) -> None:
        if cfg.frontend_s:
            frontend_free[rid] = max(now, frontend_free[rid]) + cfg.frontend_s
            push(frontend_free[rid], "admit", (i, rid))
        else:
            admit(i, rid)

    def admit(i: int, rid: str) -> None:
        in_transit[rid] -= 1
        replicas[rid].add(i, specs[i], keys[i])
        kick(rid)

    while events and remaining:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            i = payload
            if cfg.router_call_s:  # one call at a time per router: ranked when its call starts
                r = i % cfg.num_routers
                start = max(now, router_free[r])
                router_free[r] = start + cfg.router_call_s
                push(start, "route", i)
            else:
                route(i)
        elif kind == "route":
            route(payload)
        elif kind == "reach":
            reach(*payload)
        elif kind == "admit":
            admit(*payload)
        elif kind == "step":
            rid, out = payload
            for s in out.scheduled:
                if s.samples:
                    i = int(s.seq.seq_id)
                    if last_token[i] == last_token[i]:  # not NaN: a token came before
                        itl.append(now - last_token[i])
                    last_token[i] = now
            firsts, done = replicas[rid].finish_step(out)
            for i in firsts:
                ttft[i] = now - T0 - specs[i].arrival_s + cfg.path_s
            for i in done:
                output_tokens += specs[i].max_tokens
                remaining -= 1
                last_finish = now
            planned, replicas[rid].planned = replicas[rid].planned, None
            replicas[rid].busy = False
            if planned is not None:
                run(rid, planned)
            else:
                kick(rid)
        elif kind == "report":
            snapshot = {rid: replicas[rid].report() for rid in ids}
            push(now + cfg.report_delay_s, "deliver", snapshot)
            push(now + cfg.report_period_s, "report", None)
        elif kind == "deliver":
            seen = payload
    start = T0 + min(s.arrival_s for s in specs)
    predicted = {i: p for router in routers for i, p in router.predicted.items()}
    kinds = [s.kind for s in specs]
    return SimResult(ttft, output_tokens, last_finish - start, placement, kinds, predicted, itl)


def percentile(values: list[float], q: float) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    k = (len(vals) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def summarize(result: SimResult) -> dict[str, Any]:
    """TTFT percentiles, throughput, placement; for a predicting policy, how far its predictions were off
    (|predicted - simulated| / simulated, p50 and p90): the staleness of its view, in effect."""
    errors = [
        abs(p - result.ttft_s[i]) / result.ttft_s[i]
        for i, p in result.predicted.items()
        if result.ttft_s[i] > 0
    ]
    return {
        "ttft_pred_err_p50": percentile(errors, 50),
        "ttft_pred_err_p90": percentile(errors, 90),
        "ttft_ms_p50": 1000 * percentile(result.ttft_s, 50),
        "ttft_ms_p90": 1000 * percentile(result.ttft_s, 90),
        "ttft_ms_p99": 1000 * percentile(result.ttft_s, 99),
        "itl_ms_p50": 1000 * percentile(result.itl_s, 50),
        "itl_ms_p90": 1000 * percentile(result.itl_s, 90),
        "output_tok_s": result.output_tokens / max(result.makespan_s, 1e-9),
        "makespan_s": result.makespan_s,
        "placement": result.placement,
    }


def saturation_rate(specs: list[RequestSpec], cfg: SimConfig) -> float:
    """Requests/s the replicas sustain on this mix: a burst's completed requests over its makespan
    (round robin, so the figure does not depend on the policy under test)."""
    burst = [RequestSpec(s.kind, s.prompt_ids, s.max_tokens, 0.0) for s in specs]
    r = simulate(burst, "round_robin", cfg)
    return len(specs) / r.makespan_s


def run(
    workloads: list[str],
    policies: list[str],
    cfg: SimConfig,
    num: int,
    load: float,
    scale: float,
    vocab: int = 32000,
    max_model_len: int = 16384,
    burst: bool = True,
    shapes: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every workload at `load` x its saturation rate (and in a burst), through every policy.
    `shapes`: a workload's own keywords (workloads.make_named), e.g. {"multi_turn": {"think_s": (0.2, 1)}}."""
    rows = []
    for name in workloads:
        shape = (shapes or {}).get(name, {})
        probe = make_named(name, vocab, num, math.inf, "poisson", cfg.seed, max_model_len, scale, **shape)
        sat = saturation_rate(probe, cfg)
        rates = [load * sat] + ([math.inf] if burst else [])
        for rate in rates:
            specs = make_named(name, vocab, num, rate, "poisson", cfg.seed, max_model_len, scale, **shape)
            for policy in policies:
                t0 = time.perf_counter()
                row = {
                    "bench": "route_sim",
                    "workload": name,
                    "router": policy,
                    "rate": rate,
                    "saturation_rate": sat,
                    "replicas": cfg.num_replicas,
                    "routers": cfg.num_routers,
                    "num_requests": num,
                    "scale": scale,
                    **summarize(simulate(specs, policy, cfg)),
                }
                row["sim_s"] = time.perf_counter() - t0
                rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'workload':11s} {'rate':>7s} {'router':16s} {'TTFT p50':>9s} {'p99':>9s} {'tok/s':>8s}"
        "  vs pow2 p99  prediction error p50/p90"
    )
    for r in rows:
        pow2 = next(
            (
                p
                for p in rows
                if p["workload"] == r["workload"] and p["rate"] == r["rate"] and p["router"] == "pow2"
            ),
            None,
        )
        ratio = pow2["ttft_ms_p99"] / r["ttft_ms_p99"] if pow2 else math.nan
        print(
            f"{r['workload']:11s} {r['rate']:7.2f} {r['router']:16s} {r['ttft_ms_p50']:9.1f} "
            f"{r['ttft_ms_p99']:9.1f} {r['output_tok_s']:8.0f}  {ratio:.2f}x"
            f"  {r['ttft_pred_err_p50']:.2f}/{r['ttft_pred_err_p90']:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of saturation")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--think-s", default=None, help="multi_turn's think time range, e.g. 0.2,0.6")
    p.add_argument("--router-call-ms", type=float, default=0.0, help="each routing call's cost, serialized")
    p.add_argument("--transit-ms", type=float, default=0.0, help="fixed delay from the router to the replica")
    p.add_argument(
        "--frontend-ms", type=float, default=0.0, help="each request's cost at its replica's frontend"
    )
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--replay", default=None, help="re-predict a recorded `bench_serve.py --compare routers` run's rows"
    )
    p.add_argument("--factors", action="store_true", help="--replay: each measured part added in turn")
    p.add_argument(
        "--mixed-step-ms",
        type=float,
        default=0.0,
        help="a step with prefill lasts at least this (eager, outside the CUDA graphs); --replay: for rows "
        "that did not measure it",
    )
    p.add_argument("--per-context-ns", type=float, default=0.0, help="a decode's cost per context token")
    args = p.parse_args(argv)
    if args.replay:
        return replay_main(args)
    cfg = SimConfig(
        num_replicas=args.replicas,
        num_routers=args.routers,
        seed=args.seed,
        router_call_s=args.router_call_ms / 1000,
        transit_s=args.transit_ms / 1000,
        frontend_s=args.frontend_ms / 1000,
        mixed_step_s=args.mixed_step_ms / 1000,
        per_context_s=args.per_context_ns * 1e-9,
    )
    shapes = (
        {"multi_turn": {"think_s": tuple(float(x) for x in args.think_s.split(","))}} if args.think_s else {}
    )
    rows = run(
        args.workloads.split(","),
        args.policies.split(","),
        cfg,
        args.num_requests,
        args.load,
        args.scale,
        shapes=shapes,
    )
    print_rows(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def replay_main(args: argparse.Namespace) -> int:
    import route_replay

    rows = route_replay.router_rows(args.replay)
    d = route_replay.ReplayDefaults(seed=args.seed, mixed_step_ms=args.mixed_step_ms)
    if args.think_s:
        d = route_replay.replace(d, think_s=tuple(float(x) for x in args.think_s.split(",")))
    context = {"context": bool(args.per_context_ns), "per_context_ns": args.per_context_ns}
    default = route_replay.Parts(mixed_step=bool(args.mixed_step_ms))
    runs = route_replay.FACTORS if args.factors else [("replay", default)]
    out = []
    for title, parts in runs:
        results = route_replay.replay(rows, d, route_replay.replace(parts, **context))
        route_replay.print_replay(results, f"-- {title}")
        out += [{"parts": title, **r} for r in results]
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
