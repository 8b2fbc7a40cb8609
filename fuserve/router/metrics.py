"""Prometheus metrics served by each replica at GET /metrics.

Request-side figures (requests, tokens in and out, time to first token, inter-token latency) are
measured where the client sees them: in the replica's frontend, as each delta leaves for the
client. Engine figures (queue length, running sequences, KV-cache use, preemptions, prefix-cache
hits, steps and their time) come from the engine core's latest step message. Each replica reports
itself under its `replica` label; a scraper that scrapes every replica sums them.

Each replica has its own registry (not prometheus_client's global one), so several apps or tests
in one process never collide. With several frontend processes a scrape's answer sums every process's
request figures (merged_metrics.py); the engine's come once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fuserve.core_messages import SpecCounters
from fuserve.router.engine_messages import ReplicaStats
from fuserve.router.loop_metrics import LoopCounter, LoopHistogram, LoopMetricsCollector
from fuserve.router.merged_metrics import merge_exposition
from fuserve.speculative.stats import acceptance_rate, mean_accepted_length

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# The frontend's own share of a request's latency is sub-millisecond when all is well.
FRONTEND_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
)  # fmt: skip


class _EngineCollector(Collector):
    """Turns the latest stats snapshot of each replica into per-replica metric families."""

    def __init__(self, replicas: dict[str, ReplicaStats]) -> None:
        self.replicas = replicas

    def collect(self) -> Iterable[Metric]:
        gauges = {
            "num_waiting": (
                "fuserve_engine_num_requests_waiting",
                "Sequences queued in the engine (queue length)",
            ),
            "num_running": ("fuserve_engine_num_requests_running", "Sequences in the running batch"),
            "num_requests": (
                "fuserve_engine_requests",
                "Requests in the engine, from every frontend process of the replica",
            ),
            "outstanding_tokens": ("fuserve_engine_outstanding_tokens", "Tokens still to prefill or decode"),
            "kv_cache_usage": ("fuserve_engine_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use"),
            "num_free_blocks": ("fuserve_engine_kv_cache_free_blocks", "Free KV-cache blocks"),
            # the step cost the router's TTFT model uses, fitted from the engine's own steps
            "step_base_s": ("fuserve_engine_step_base_seconds", "Fitted fixed cost of an engine step"),
            "step_seq_s": ("fuserve_engine_step_per_decode_seconds", "Fitted cost of one decoding sequence"),
            "step_token_s": (
                "fuserve_engine_step_per_prefill_token_seconds",
                "Fitted cost of one prefill token",
            ),
        }
        counters = {
            "num_preemptions": ("fuserve_engine_preemptions", "Sequences preempted for lack of KV blocks"),
            "prefix_hit_tokens": (
                "fuserve_engine_prefix_cache_hit_tokens",
                "Prompt tokens served from cache",
            ),
            "prefix_query_tokens": ("fuserve_engine_prefix_cache_query_tokens", "Prompt tokens looked up"),
            "num_steps": ("fuserve_engine_steps", "Engine steps run"),
            "step_seconds_total": ("fuserve_engine_step_seconds", "Wall seconds inside engine steps"),
            "device_wait_seconds_total": (
                "fuserve_engine_device_wait_seconds",
                "Of the step seconds, those spent waiting for the device to finish a step",
            ),
            "device_busy_seconds_total": (
                "fuserve_engine_device_busy_seconds",
                "The device's own time for the engine steps (first kernel to read-back, CUDA events)",
            ),
            "prefill_device_busy_seconds_total": (
                "fuserve_engine_prefill_device_busy_seconds",
                "Of the device busy seconds, those of steps that carried prefill tokens",
            ),
            "prefill_steps": ("fuserve_engine_prefill_steps", "Engine steps that carried prefill tokens"),
            "prefill_step_seconds_total": (
                "fuserve_engine_prefill_step_seconds",
                "Wall seconds of the engine steps that carried prefill tokens",
            ),
            "cpu_seconds_total": ("fuserve_engine_core_cpu_seconds", "CPU seconds of the engine core"),
            "gc_seconds_total": (
                "fuserve_engine_core_gc_seconds",
                "Seconds the engine core spent in Python's garbage collector",
            ),
        }
        snapshot = list(self.replicas.values())
        for attr, (name, doc) in gauges.items():
            g = GaugeMetricFamily(name, doc, labels=["replica"])
            for s in snapshot:
                g.add_metric([s.replica_id], float(getattr(s.engine, attr)))
            yield g
        for attr, (name, doc) in counters.items():
            c = CounterMetricFamily(name, doc, labels=["replica"])
            for s in snapshot:
                c.add_metric([s.replica_id], float(getattr(s.engine, attr)))
            yield c
        frontend_counters = {
            "frontend_cpu_seconds_total": (
                "fuserve_frontend_cpu_seconds",
                "CPU seconds of the replica's frontend process (HTTP, tokenization, SSE)",
            ),
            "frontend_gc_seconds_total": (
                "fuserve_frontend_gc_seconds",
                "Seconds the replica's frontend process spent in Python's garbage collector",
            ),
        }
        for attr, (name, doc) in frontend_counters.items():
            c = CounterMetricFamily(name, doc, labels=["replica"])
            for s in snapshot:
                c.add_metric([s.replica_id], float(getattr(s, attr)))
            yield c
        up = GaugeMetricFamily(
            "fuserve_engine_healthy", "1 while the replica's engine loop runs", labels=["replica"]
        )
        for s in snapshot:
            up.add_metric([s.replica_id], 1.0 if s.healthy else 0.0)
        yield up
        speculating = [(s.replica_id, s.engine.spec) for s in snapshot if s.engine.spec is not None]
        if speculating:
            yield from speculation_metrics(speculating)


SPEC_COUNTERS = {
    "num_rounds": ("fuserve_spec_rounds", "Proposer calls (one per engine step that wanted drafts)"),
    "num_verify_steps": ("fuserve_spec_verify_steps", "Engine steps that verified drafts"),
    "num_verifies": ("fuserve_spec_verifies", "Sequence-steps that verified drafts"),
    "num_drafts": ("fuserve_spec_draft_tokens", "Draft tokens the target verified"),
    "num_accepted": ("fuserve_spec_accepted_tokens", "Draft tokens the target kept"),
    "draft_seconds": ("fuserve_spec_draft_seconds", "Seconds in proposer calls (drafting and channel)"),
    "channel_seconds": ("fuserve_spec_channel_seconds", "Of the proposer's seconds, the channel round trips"),
    "verify_seconds": ("fuserve_spec_verify_seconds", "Seconds of steps that verified drafts, less drafting"),
    "num_alternatives": ("fuserve_spec_alternative_tokens", "Second-best draft tokens the target verified"),
    "num_alternatives_kept": ("fuserve_spec_alternatives_kept", "Of those, kept in place of a draft"),
    "num_ahead_hits": (
        "fuserve_spec_ahead_hits",
        "Sequence-rounds the draft answered from drafts it made during the verify (speculative.draft_ahead)",
    ),
    "num_rounds_overlapped": (
        "fuserve_spec_overlapped_rounds",
        "Draft rounds read after a plain step ran while the draft worked (speculative.draft_overlap)",
    ),
    "num_drafted_across": (
        "fuserve_spec_drafted_across",
        "Sequence-steps that verified drafts made across a plain step (it wrote their first)",
    ),
}


def speculation_metrics(replicas: list[tuple[str, SpecCounters]]) -> Iterable[Metric]:
    """Speculative decoding, per replica: counters (rates over any window are the scraper's), the rates
    since start, acceptance per draft position and how often each k was chosen."""
    for attr, (name, doc) in SPEC_COUNTERS.items():
        c = CounterMetricFamily(name, doc, labels=["replica"])
        for rid, spec in replicas:
            c.add_metric([rid], float(getattr(spec, attr)))
        yield c
    rate = GaugeMetricFamily(
        "fuserve_spec_acceptance_rate", "Draft tokens kept over verified, since start", labels=["replica"]
    )
    length = GaugeMetricFamily(
        "fuserve_spec_mean_accepted_length",
        "Tokens a speculating sequence gains per step (kept drafts + 1), since start",
        labels=["replica"],
    )
    for rid, spec in replicas:
        rate.add_metric([rid], acceptance_rate(spec))
        length.add_metric([rid], mean_accepted_length(spec))
    yield rate
    yield length
    reached = CounterMetricFamily(
        "fuserve_spec_position_verified",
        "Verifies that checked a draft at this position (every earlier draft kept)",
        labels=["replica", "position"],
    )
    kept = CounterMetricFamily(
        "fuserve_spec_position_accepted", "Drafts kept at this position", labels=["replica", "position"]
    )
    k_chosen = CounterMetricFamily(
        "fuserve_spec_k_chosen", "Times a sequence asked the proposer for k drafts", labels=["replica", "k"]
    )
    for rid, spec in replicas:
        for i, (n, a) in enumerate(zip(spec.reached_at, spec.accepted_at, strict=True)):
            reached.add_metric([rid, str(i + 1)], float(n))
            kept.add_metric([rid, str(i + 1)], float(a))
        for k, n in enumerate(spec.k_counts):
            k_chosen.add_metric([rid, str(k)], float(n))
    yield reached
    yield kept
    yield k_chosen


# The HAProxy router stamps its decision's wall-clock time on the request it routes (a header HAProxy
# sets, after deleting any a client sent): the replica measures the transit from decision to arrival.
ROUTED_AT_HEADER = "x-serve-router-fuserve-routed-at"
TRANSIT_HEADER = "x-fuserve-transit-ms"  # the transit, echoed on the response for benchmarks
# A request's time to first token inside the replica, in ms: "admit,core,replica" (arrival to hand-off,
# hand-off to first token back from the engine core, arrival to the response's start), for benchmarks
TTFT_PARTS_HEADER = "x-fuserve-ttft-parts-ms"


def transit_seconds(routed_at: str | None, now: float) -> float | None:
    """Seconds from the router's decision to now; None without a usable stamp. Both clocks are wall
    clocks (one host's, or NTP-synced hosts'), so small negative values are clock skew, kept at 0."""
    if not routed_at:
        return None
    try:
        return max(now - float(routed_at), 0.0)
    except ValueError:
        return None


class _ProcessCollector(Collector):
    """This frontend process's CPU and finished requests under its own `process` label (its pid).
    Merged across a replica's processes (merged_metrics.py) the labels keep them apart, so a scrape
    shows how the replica's requests and HTTP work are shared between its processes: one process
    holding most of HAProxy's connections shows as most of the requests."""

    def __init__(self, requests: Counter) -> None:
        self.requests = requests
        self.pid = str(os.getpid())

    def collect(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily(
            "fuserve_frontend_process_cpu_seconds", "CPU seconds of each frontend process", labels=["process"]
        )
        cpu.add_metric([self.pid], time.process_time())
        yield cpu
        done = sum(
            s.value for m in self.requests.collect() for s in m.samples if s.name == "fuserve_requests_total"
        )
        served = CounterMetricFamily(
            "fuserve_frontend_process_requests",
            "Finished API requests of each frontend process",
            labels=["process"],
        )
        served.add_metric([self.pid], done)
        yield served


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fuserve_requests", "Finished API requests", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("fuserve_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_prompt_tokens = Counter(
            "fuserve_cached_prompt_tokens", "Prompt tokens the prefix cache served", registry=r
        )
        self.generation_tokens = LoopCounter("fuserve_generation_tokens", "Tokens generated")
        self.ttft = Histogram(
            "fuserve_time_to_first_token_seconds",
            "Arrival to first token sent",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = LoopHistogram(
            "fuserve_inter_token_latency_seconds", "Gap between tokens sent", LATENCY_BUCKETS_S
        )
        self.e2e = Histogram(
            "fuserve_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        # Where a request's time to first token goes, in this replica's frontend and its engine core
        # (the rest of what a client sees is the network, HAProxy and its router)
        self.admit = Histogram(
            "fuserve_frontend_admit_seconds",
            "Request arrival at the replica to its hand-off to the engine core: parse, checks, tokenization",
            buckets=FRONTEND_BUCKETS_S,
            registry=r,
        )
        self.core_first_token = Histogram(
            "fuserve_engine_core_first_token_seconds",
            "Hand-off to the engine core until its first token is back in the frontend: queue and prefill",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.transit = Histogram(
            "fuserve_router_transit_seconds",
            "The HAProxy router's choice of this replica to the request's arrival here (HAProxy, the "
            "replica's event loop); requests routed another way are not counted",
            buckets=FRONTEND_BUCKETS_S,
            registry=r,
        )
        self.emit = LoopHistogram(
            "fuserve_frontend_emit_seconds",
            "An engine step's message reaching the frontend to its tokens going out on a stream",
            FRONTEND_BUCKETS_S,
        )
        r.register(LoopMetricsCollector([self.generation_tokens, self.itl, self.emit]))
        r.register(_ProcessCollector(self.requests))
        self.in_flight = Gauge("fuserve_requests_in_flight", "API requests being served", registry=r)
        self.replicas: dict[str, ReplicaStats] = {}
        self.engine_registry = CollectorRegistry(auto_describe=True)
        self.engine_registry.register(_EngineCollector(self.replicas))

    def update_replica(self, stats: ReplicaStats) -> None:
        self.replicas[stats.replica_id] = stats

    def request_text(self) -> bytes:
        """This process's request-side figures: what a sibling frontend process sums with its own."""
        return generate_latest(self.registry)

    def render(self, siblings: Sequence[bytes] = ()) -> bytes:
        """`siblings`: the other frontend processes' `request_text`, summed with this one's."""
        own = self.request_text()
        requests = merge_exposition([own, *siblings]) if siblings else own
        return requests + generate_latest(self.engine_registry)
