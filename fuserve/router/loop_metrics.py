"""Counters and histograms for the frontend's per-token path, exported to Prometheus.

A replica's event loop records every token it sends (the token count, the gap since the stream's
last token, the step message's wait to go out). prometheus_client's Counter and Histogram take a lock
and walk their buckets on each call: 9% of the frontend's CPU at 64 streams on the CPU box (py-spy,
2026-11-26), on the path whose saturation decides time to first token at 128+ streams. These are plain
numbers written by the loop's thread alone and read when /metrics renders (a render between two
writes may see a sum one observation ahead of its counts, which no rate or quantile notices).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class LoopCounter:
    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc)
        family.add_metric([], self.value)
        return family


class LoopHistogram:
    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name, self.doc = name, doc
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """`times` equal observations at once (a gap spread over several tokens sent together)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def family(self) -> Metric:
        cumulative, total = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            cumulative.append((repr(float(bound)), total))
        cumulative.append(("+Inf", total + self.counts[-1]))
        return HistogramMetricFamily(self.name, self.doc, buckets=cumulative, sum_value=self.sum)


class LoopMetricsCollector(Collector):
    def __init__(self, metrics: Iterable[LoopCounter | LoopHistogram]) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterable[Metric]:
        for m in self.metrics:
            yield m.family()
