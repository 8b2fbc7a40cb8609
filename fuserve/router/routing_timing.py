"""The routing call's own cost, on the router process's /metrics.

Behind HAProxy one router replica per node answers every request's routing call on one event loop,
so a call of 1 ms caps that node at ~1,000 requests/s and, in a burst of 300, delays the last one
by 300 ms before it even reaches its replica. Three histograms: each routing request in the HAProxy
router replica (any policy), the length-aware router's whole `choose_replicas` call, and its ranking
alone (`ttft_model.rank_by_ttft`, which replays each replica's scheduler queue).
Process-wide (one registry per process, `ROUTING_REGISTRY`): every router object in the process
records into it, and `cluster/ingress_routing.RouteEndpoint` serves it at GET /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Histogram, generate_latest

ROUTING_BUCKETS_S = (
    0.000025, 0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
)  # fmt: skip

ROUTING_REGISTRY = CollectorRegistry()
CHOOSE_SECONDS = Histogram(
    "fuserve_router_choose_seconds",
    "Time inside one choose_replicas call of the length-aware router",
    buckets=ROUTING_BUCKETS_S,
    registry=ROUTING_REGISTRY,
)
RANKING_SECONDS = Histogram(
    "fuserve_router_ranking_seconds",
    "Time ranking the replicas by predicted TTFT within one call (the scheduler replay)",
    buckets=ROUTING_BUCKETS_S,
    registry=ROUTING_REGISTRY,
)


REQUEST_SECONDS = Histogram(
    "fuserve_router_request_seconds",
    "Wall time of one routing request in the HAProxy router replica (hint from the body, then the pick), "
    "for every policy",
    buckets=ROUTING_BUCKETS_S,
    registry=ROUTING_REGISTRY,
)


class RoutingTimer:
    """Times routing calls into the process's histograms; `last_call_s`/`last_ranking_s` for tests
    and benchmarks that time one call."""

    def __init__(self) -> None:
        self.last_call_s = 0.0
        self.last_ranking_s = 0.0

    @contextmanager
    def call(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.last_call_s = time.perf_counter() - t0
            CHOOSE_SECONDS.observe(self.last_call_s)

    @contextmanager
    def ranking(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.last_ranking_s = time.perf_counter() - t0
            RANKING_SECONDS.observe(self.last_ranking_s)


def routing_metrics_text() -> bytes:
    """The Prometheus text of this process's routing histograms."""
    return generate_latest(ROUTING_REGISTRY)
