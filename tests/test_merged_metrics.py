"""/metrics with several frontend processes: each counts its own requests, and the answer to a scrape
sums them (counters, histograms, the in-flight gauge; the earliest `_created`), with the engine's
figures once. Pure: two ServingMetrics stand for two processes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fuserve.core_messages import CoreStats
from fuserve.router.engine_messages import ReplicaStats
from fuserve.router.merged_metrics import merge_exposition
from fuserve.router.metrics import ServingMetrics


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_two_processes_figures_add_up_and_the_engines_come_once() -> None:
    first, second = ServingMetrics(), ServingMetrics()
    first.requests.labels("completions", "200").inc(3)
    second.requests.labels("completions", "200").inc(2)
    second.requests.labels("chat", "429").inc()
    first.ttft.observe(0.003)
    second.ttft.observe(0.3)
    second.ttft.observe(0.004)
    first.generation_tokens.inc(10)
    second.generation_tokens.inc(5)
    first.in_flight.inc(2)
    second.in_flight.inc()
    first.update_replica(ReplicaStats("r1", CoreStats(num_running=7, num_requests=3)))

    text = first.render([second.request_text()])
    got = samples(text)
    assert got[("fuserve_requests_total", (("endpoint", "completions"), ("status", "200")))] == 5
    assert got[("fuserve_requests_total", (("endpoint", "chat"), ("status", "429")))] == 1
    assert got[("fuserve_time_to_first_token_seconds_count", ())] == 3
    assert got[("fuserve_time_to_first_token_seconds_bucket", (("le", "0.005"),))] == 2
    assert got[("fuserve_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 3
    assert abs(got[("fuserve_time_to_first_token_seconds_sum", ())] - 0.307) < 1e-9
    assert got[("fuserve_generation_tokens_total", ())] == 15
    assert got[("fuserve_requests_in_flight", ())] == 3
    own_created = samples(first.request_text())[
        ("fuserve_requests_created", (("endpoint", "completions"), ("status", "200")))
    ]
    assert got[("fuserve_requests_created", (("endpoint", "completions"), ("status", "200")))] == own_created
    # the engine's figures: once, as the answering process has them
    assert got[("fuserve_engine_num_requests_running", (("replica", "r1"),))] == 7
    assert got[("fuserve_engine_requests", (("replica", "r1"),))] == 3
    assert text.decode().count("# TYPE fuserve_engine_num_requests_running gauge") == 1
    assert text.decode().count("# TYPE fuserve_requests_total counter") == 1


def test_alone_the_answer_is_this_processes_own() -> None:
    m = ServingMetrics()
    m.requests.labels("completions", "200").inc()

    def steady(text: bytes) -> bytes:  # the process's CPU seconds move between two renders
        return b"\n".join(line for line in text.split(b"\n") if b"fuserve_frontend_process_cpu" not in line)

    assert steady(m.render()).startswith(steady(m.request_text()))
    own = m.request_text()
    assert merge_exposition([own]) == own
    assert b'fuserve_frontend_process_requests_total{process="' in own
