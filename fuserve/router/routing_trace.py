"""The length-aware router's decisions, written down for a benchmark to explain its placements.

A burst's placement can come out uneven (two H200s, 2026-11-28: 177 / 123 requests of a heavy-tailed
burst, where the simulator placed 143 / 157 on the same requests and a repeat placed evenly), and a run
alone cannot say whether the reports were stale, the router's own sends were counted wrongly, or the
ranking itself chose so. (What the first trace showed: reports 350-400 ms old at 80% load, so the view is
mostly the router's own sends since, replayed on the cost model.)
With `FUSERVE_ROUTER_TRACE=<folder>` every router process appends one JSON line per ranked request to
`<folder>/router-<pid>.jsonl`: what it knew of each replica, what it predicted there, and where it sent
the request. Unset (the default), nothing is written and nothing is computed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from fuserve.router.ttft_model import Prediction, ReplicaView, RequestShape

TRACE_ENV = "FUSERVE_ROUTER_TRACE"


def view_fields(view: ReplicaView) -> dict[str, float | int]:
    """A replica as the router saw it: the report's figures and the sends it did not cover yet."""
    unreported = [q for q in view.waiting if not q.reported]
    return {
        "age_ms": round(view.age_s * 1e3, 2),
        "running": view.num_running,
        "decoding": view.num_decoding,
        "running_prefill": view.running_prefill,
        "waiting": len(view.waiting) - len(unreported),
        "waiting_prefill": sum(q.prefill for q in view.waiting if q.reported),
        "unreported": len(unreported),
        "unreported_prefill": sum(q.prefill for q in unreported),
        "unreported_output": sum(q.output for q in unreported),
    }


def prediction_fields(p: Prediction) -> dict[str, float | int]:
    return {
        "ttft_ms": round(p.ttft_s * 1e3, 3),
        "score_ms": round(p.score_s * 1e3, 3),
        "behind": p.behind,
        "ahead": p.prefill_ahead,
        "batch": p.decode_batch,
        "cached": p.cached_tokens,
    }


class RoutingTrace:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._out: TextIO = open(folder / f"router-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115

    @classmethod
    def from_env(cls) -> RoutingTrace | None:
        folder = os.environ.get(TRACE_ENV)
        return cls(Path(folder)) if folder else None

    def record(
        self,
        now: float,
        shape: RequestShape,
        views: Sequence[ReplicaView],
        ranked: Sequence[tuple[str, Prediction]],
        peers: float,
    ) -> None:
        preds = dict(ranked)
        line = {
            "t": round(now, 6),
            "prompt": shape.prompt_tokens,
            "max_tokens": shape.max_tokens,
            "chosen": ranked[0][0],
            "peers": round(peers, 3),
            "replicas": {
                v.replica_id: {**view_fields(v), **prediction_fields(preds[v.replica_id])} for v in views
            },
        }
        self._out.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._out.close()
