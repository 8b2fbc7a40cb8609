"""The length-aware routing call's cost on the simulator's views: one call per request of a workload.

    python benchmarks/route_call_cost.py                          # mix burst, 300 requests, 2 replicas
    python benchmarks/route_call_cost.py --workloads mix,heavy_tail,multi_turn --rate 0.8

Each call is what `LengthAwareRouter.choose_replicas` does with a hint: fold in the reports, the sends
still unreported, build each replica's view (`view_from_report`) and rank them (`rank_by_ttft`, the
scheduler replay). Behind HAProxy one router replica answers every call of its node in turn, so in a
burst of 300 the last request waits for all 300 calls. Writes JSON rows (`bench: route_call_cost`) with
the call and the ranking's p50/p90/p99/max in ms to --out (default $OUT/route-call-cost-DATE.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import route_sim  # noqa: E402
from route_sim import LengthAware, RouteInput, SimConfig, percentile, saturation_rate, simulate  # noqa: E402
from workloads import make_named  # noqa: E402


class TimedLengthAware(LengthAware):
    """The simulator's length-aware router, each call and its ranking timed on the wall clock."""

    calls: list[float] = []
    rankings: list[float] = []
    queued: list[int] = []  # sequences in the views of each call (waiting + unreported sends)

    def route(self, x: RouteInput) -> str:
        t0 = time.perf_counter()
        rid = super().route(x)
        TimedLengthAware.calls.append(time.perf_counter() - t0)
        return rid


def _timed_rank(real: Any) -> Any:
    def rank(views: list, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = real(views, *args, **kwargs)
        TimedLengthAware.rankings.append(time.perf_counter() - t0)
        TimedLengthAware.queued.append(sum(len(v.waiting) for v in views))
        return out

    return rank


def measure(workload: str, load: float, num: int, cfg: SimConfig) -> dict[str, Any]:
    specs = make_named(workload, 32000, num, math.inf, "poisson", cfg.seed, 16384, 1.0)
    rate = math.inf if load <= 0 else load * saturation_rate(specs, cfg)
    specs = make_named(workload, 32000, num, rate, "poisson", cfg.seed, 16384, 1.0)
    TimedLengthAware.calls, TimedLengthAware.rankings, TimedLengthAware.queued = [], [], []
    real = route_sim.rank_by_ttft
    route_sim.rank_by_ttft = _timed_rank(real)
    try:
        simulate(specs, TimedLengthAware, cfg)
    finally:
        route_sim.rank_by_ttft = real
    ms = lambda xs, q: 1000 * percentile(xs, q)  # noqa: E731
    return {
        "bench": "route_call_cost",
        "workload": workload,
        "rate": rate,
        "num_requests": num,
        "replicas": cfg.num_replicas,
        **{f"call_ms_p{q}": ms(TimedLengthAware.calls, q) for q in (50, 90, 99)},
        "call_ms_max": 1000 * max(TimedLengthAware.calls),
        "call_ms_total": 1000 * sum(TimedLengthAware.calls),
        **{f"ranking_ms_p{q}": ms(TimedLengthAware.rankings, q) for q in (50, 90, 99)},
        "queued_in_views_p50": percentile([float(q) for q in TimedLengthAware.queued], 50),
        "queued_in_views_max": max(TimedLengthAware.queued),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mix")
    p.add_argument("--rate", type=float, default=0.0, help="fraction of saturation; 0: a burst")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = SimConfig(num_replicas=args.replicas, async_scheduling=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    meta = {
        "device": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip(),
    }
    rows = [{**meta, **measure(w, args.rate, args.num_requests, cfg)} for w in args.workloads.split(",")]
    for r in rows:
        print(
            f"{r['workload']:11s} call p50/p90/p99/max {r['call_ms_p50']:.3f}/{r['call_ms_p90']:.3f}/"
            f"{r['call_ms_p99']:.3f}/{r['call_ms_max']:.3f} ms (total {r['call_ms_total']:.0f} ms), ranking "
            f"p50/p99 {r['ranking_ms_p50']:.3f}/{r['ranking_ms_p99']:.3f} ms, queued in views p50/max "
            f"{r['queued_in_views_p50']:.0f}/{r['queued_in_views_max']}"
        )
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"route-call-cost-{meta['date']}.json")
    Path(out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
