"""The replay of a recorded two-H100 routers run (benchmarks/route_replay.py, `route_sim.py --replay`):
the simulator regenerates each row's requests and re-predicts it from the figures the run measured,
so a simulator change is checked against the GPU in seconds (issue 16: within 20% on TTFT p50/p99)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))  # not a package
import route_replay  # noqa: E402
import route_sim  # noqa: E402

RUN = BENCH / "results" / "serve-routers-2026-11-26-h100x2-shared-prefix.json"
D = route_replay.ReplayDefaults()


def _row(router: str, workload: str, burst: bool) -> dict[str, Any]:
    rows = route_replay.router_rows(RUN)
    return next(
        r
        for r in rows
        if r["router"] == router and r["workload"] == workload and math.isinf(r["rate"]) == burst
    )


@pytest.mark.parametrize(("router", "workload"), [("pow2", "mix"), ("length_aware", "heavy_tail")])
def test_replay_as_recorded_reproduces_the_runs_own_prediction(router: str, workload: str) -> None:
    """Same requests, same step cost, same path: the replay gives back the sim_* figures bench_serve
    wrote in the GPU run, so the regenerated workload is the one the GPU served."""
    row = _row(router, workload, burst=False)
    got = route_replay.replay_row(row, D, route_replay.FACTORS[0][1])
    assert got["sim_ttft_ms_p50"] == pytest.approx(row["sim_ttft_ms_p50"], rel=1e-9)
    assert got["sim_ttft_ms_p99"] == pytest.approx(row["sim_ttft_ms_p99"], rel=1e-9)
    assert got["ttft_ms_p99"] == row["ttft_ms_p99"]


def test_the_routing_calls_spread_a_burst_over_time() -> None:
    """The one router replica answers a burst's 300 routing calls in turn (the row's measured mean
    cost each): requests reach the engine later, and the simulated burst p50 rises toward the GPU's."""
    row = _row("pow2", "mix", burst=True)
    before = route_replay.replay_row(row, D, route_replay.FACTORS[0][1])
    after = route_replay.replay_row(row, D, route_replay.FACTORS[1][1])
    assert after["sim_ttft_ms_p50"] > 1.5 * before["sim_ttft_ms_p50"], (before, after)
    assert abs(after["ratio_ttft_ms_p50"] - 1) < abs(before["ratio_ttft_ms_p50"] - 1)


def test_an_eager_floor_makes_steps_with_prefill_no_shorter_than_it() -> None:
    specs = [route_sim.RequestSpec("chat", list(range(100, 140)), 4, 0.0)]
    cfg = route_sim.SimConfig(num_replicas=2, async_scheduling=True)
    plain = route_sim.simulate(specs, "round_robin", cfg)
    floored = route_sim.simulate(specs, "round_robin", replace(cfg, mixed_step_s=0.05))
    assert plain.ttft_s[0] == pytest.approx(cfg.cost.step_s(40, 0))
    assert floored.ttft_s[0] == pytest.approx(0.05)
    # decode-only steps keep the fitted line: the gaps between tokens are unchanged
    assert floored.itl_s == pytest.approx(plain.itl_s)


def test_replay_cli_writes_the_table(tmp_path: Path) -> None:
    rows = [_row("pow2", "mix", burst=False), _row("prefix_affinity", "multi_turn", burst=False)]
    src, out = tmp_path / "run.json", tmp_path / "replay.json"
    src.write_text(json.dumps(rows))
    assert route_sim.main(["--replay", str(src), "--mixed-step-ms", "14", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [(r["router"], r["workload"]) for r in got] == [("pow2", "mix"), ("prefix_affinity", "multi_turn")]
    for r in got:
        assert r["sim_ttft_ms_p50"] > 0 and r["ratio_ttft_ms_p99"] > 0


def test_prefix_affinity_with_an_imbalance_threshold_does_not_pile_conversations() -> None:
    """Two H200s, 2026-11-28: prefix-affinity at its default (infinite) threshold sent all 1,000 multi-
    turn requests to one replica, which fell behind; the replay of that row does the same, and with a
    threshold of 16 requests it keeps both replicas busy and its p99 near length-aware's."""
    run = BENCH / "results" / "serve-routers-2026-11-28-h200x2-1000-loaded-spread-c339d51.json"
    rows = [
        r
        for r in route_replay.router_rows(run)
        if r["workload"] == "multi_turn" and not math.isinf(r["rate"])
    ]
    pa = next(r for r in rows if r["router"] == "prefix_affinity")
    got = {
        name: route_replay.simulate_row({**pa, "router": name}, D, route_replay.Parts())
        for name in ("prefix_affinity", "prefix_affinity@16", "length_aware")
    }
    p99 = {name: route_sim.summarize(res)["ttft_ms_p99"] for name, res in got.items()}
    assert max(got["prefix_affinity"].placement.values()) > 0.9 * pa["num_requests"]
    assert max(got["prefix_affinity@16"].placement.values()) < 0.6 * pa["num_requests"]
    assert p99["prefix_affinity"] > 5 * p99["length_aware"]
    assert p99["prefix_affinity@16"] < 1.5 * p99["length_aware"]


def test_the_run_is_replayed_with_one_step_cost_the_median_of_its_rows() -> None:
    rows = [
        dict(r, step_cost=c)
        for r, c in zip(
            route_replay.router_rows(RUN)[:3],
            ([0.004, 1e-5, 2e-5], [0.005, 3e-5, 6e-5], [0.006, 2e-5, 1e-5]),
            strict=True,
        )
    ]
    assert route_replay.pooled_step_cost(rows) == [0.005, 2e-5, 2e-5]
    pooled = route_replay.replay(rows, D, route_replay.Parts(path_transit=False, mixed_step=False))
    own = route_replay.replay(rows, D, route_replay.FACTORS[0][1])
    middle = dict(rows[0], step_cost=[0.005, 2e-5, 2e-5])
    alone = route_replay.replay_row(middle, D, route_replay.Parts(path_transit=False, mixed_step=False))
    assert pooled[0]["sim_ttft_ms_p50"] == pytest.approx(alone["sim_ttft_ms_p50"], rel=1e-9)
    assert own[0]["sim_ttft_ms_p50"] != pytest.approx(alone["sim_ttft_ms_p50"], rel=1e-3)
