"""One replica's request metrics when several frontend processes serve it.

Each process counts the requests it serves in its own registry (metrics.py), and a scrape of the
replica's port reaches whichever process accepts the connection. Answered alone, the counters would
jump between processes' values from one scrape to the next, which Prometheus reads as resets. So the
answering process gathers the others' request-side exposition (router/frontend_processes.py) and sums
it with its own: counters, histograms and the in-flight gauge add up across processes, and a
`_created` timestamp takes the earliest. The engine's figures are the same in every process (one engine
core) and are not merged: the answering process renders them once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_exposition(texts: Sequence[bytes]) -> bytes:
    """Prometheus text from several processes' registries of the same metrics, as one process's."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            earliest = family.name.endswith("_created")
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif earliest:
                    merged[key] = min(merged[key], sample.value)
                else:
                    merged[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
