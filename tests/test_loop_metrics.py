"""The frontend's per-token metrics (router/loop_metrics.py) render exactly as prometheus_client's own
Counter and Histogram would for the same observations, so scrapers and dashboards see no difference."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fuserve.router.loop_metrics import LoopCounter, LoopHistogram, LoopMetricsCollector
from fuserve.router.metrics import LATENCY_BUCKETS_S


def test_loop_metrics_render_like_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter, hist = (
        LoopCounter("t_tokens", "Tokens"),
        LoopHistogram("t_gap_seconds", "Gaps", LATENCY_BUCKETS_S),
    )
    ours.register(LoopMetricsCollector([counter, hist]))
    ref_counter = Counter("t_tokens", "Tokens", registry=theirs)
    ref_hist = Histogram("t_gap_seconds", "Gaps", buckets=LATENCY_BUCKETS_S, registry=theirs)
    # values on bucket bounds (le is inclusive), between them, past the last, and several at once
    for value, times in [(0.001, 1), (0.0011, 3), (0.04, 2), (0.7, 1), (61.0, 1), (0.0, 1)]:
        counter.inc(times)
        ref_counter.inc(times)
        hist.observe(value, times)
        for _ in range(times):
            ref_hist.observe(value)

    def lines(registry: CollectorRegistry) -> list[str]:
        return sorted(
            line
            for line in generate_latest(registry).decode().splitlines()
            if not line.endswith("created") and "_created" not in line
        )

    assert lines(ours) == lines(theirs)
    assert 't_gap_seconds_bucket{le="0.001"} 2.0' in lines(ours)
