"""The router's decision trace: off unless asked for; each line says what the router knew and chose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuserve.router.routing_trace import TRACE_ENV, RoutingTrace
from fuserve.router.ttft_model import QueuedSeq, ReplicaView, RequestShape, StepCost, rank_by_ttft


def test_no_trace_unless_the_variable_names_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACE_ENV, raising=False)
    assert RoutingTrace.from_env() is None


def test_a_line_per_decision_with_each_replicas_view_and_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    trace = RoutingTrace.from_env()
    assert trace is not None
    cost = StepCost(0.01, 0.0001, 0.0001)
    # "busy" has a 2,000-token prefill running and one of this router's sends not yet in its report
    busy = ReplicaView(
        "busy", cost, running_prefill=2000, num_running=1, waiting=[QueuedSeq(0.0, 300, 50, reported=False)]
    )
    idle = ReplicaView("idle", cost)
    shape = RequestShape(100, 20)
    ranked = rank_by_ttft([busy, idle], shape)
    trace.record(12.5, shape, [busy, idle], ranked, peers=1.0)
    trace.record(12.6, shape, [busy, idle], ranked, peers=1.0)
    trace.close()
    (path,) = (tmp_path / "trace").iterdir()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert (first["t"], first["prompt"], first["max_tokens"], first["chosen"]) == (12.5, 100, 20, "idle")
    b, i = first["replicas"]["busy"], first["replicas"]["idle"]
    assert (b["running_prefill"], b["waiting"], b["unreported"], b["unreported_prefill"]) == (2000, 0, 1, 300)
    assert b["ttft_ms"] > i["ttft_ms"] > 0 and b["score_ms"] > i["score_ms"]
