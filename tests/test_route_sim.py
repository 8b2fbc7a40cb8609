"""The routing simulator (benchmarks/route_sim.py): N replicas running fuserve's own scheduler and block
manager on virtual time, the same seeded workloads through each routing policy. A policy change is
judged here in seconds: the TTFT policy must stay ahead of Ray Serve's default (pow2) on TTFT p99
where length matters (heavy-tailed prompts, multi-turn chat) and never fall far behind anywhere."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # not a package
import route_bounds  # noqa: E402
import route_sim  # noqa: E402
from workloads import WORKLOADS, RequestSpec, make_named  # noqa: E402

CFG = route_sim.SimConfig(num_replicas=2, seed=0)


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, bool, str], dict[str, Any]]:
    """(workload, burst?, router) -> row: each workload at 80% of saturation and in a burst."""
    out = route_sim.run(list(WORKLOADS), ["length_aware", "pow2"], CFG, num=400, load=0.8, scale=1.0)
    return {(r["workload"], math.isinf(r["rate"]), r["router"]): r for r in out}


@pytest.mark.parametrize("workload", ["heavy_tail", "multi_turn"])
def test_length_aware_is_ahead_of_pow2_on_ttft_p99_at_80_percent_load(rows: dict, workload: str) -> None:
    mine, pow2 = rows[workload, False, "length_aware"], rows[workload, False, "pow2"]
    assert pow2["ttft_ms_p99"] >= 1.3 * mine["ttft_ms_p99"], (mine, pow2)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("burst", [False, True])
def test_length_aware_is_never_much_worse_than_pow2(rows: dict, workload: str, burst: bool) -> None:
    mine, pow2 = rows[workload, burst, "length_aware"], rows[workload, burst, "pow2"]
    assert mine["ttft_ms_p99"] <= pow2["ttft_ms_p99"] / 0.95, (mine, pow2)
    assert mine["output_tok_s"] >= 0.95 * pow2["output_tok_s"], (mine, pow2)
    if not burst:
        assert mine["ttft_pred_err_p50"] < 0.2, "at 80% load the view is fresh: predictions within 20%"


def test_a_replica_is_the_engines_scheduler_on_virtual_time() -> None:
    """One request on an idle replica: its first token after one step of its whole prompt. The same
    prompt again, later: the prefix cache serves all but its last partial block."""
    prompt = list(range(100, 300))
    specs = [RequestSpec("a", prompt, 4, 0.0), RequestSpec("b", prompt, 4, 1.0)]
    result = route_sim.simulate(specs, "round_robin", route_sim.SimConfig(num_replicas=1))
    cost = CFG.cost
    assert result.ttft_s[0] == pytest.approx(cost.step_s(200, 0))
    assert result.ttft_s[1] == pytest.approx(cost.step_s(200 - 192, 0)), "12 blocks cached, 8 tokens left"
    assert result.output_tokens == 8 and result.placement == {"r0": 2}


def test_workloads_are_seeded_and_shaped_as_described() -> None:
    turns = make_named("multi_turn", 32000, 200, 10.0, "poisson", 1, 16384, 1.0)
    assert turns == make_named("multi_turn", 32000, 200, 10.0, "poisson", 1, 16384, 1.0)
    follow_ups = [s for s in turns if s.kind == "turn"]
    assert follow_ups and all(
        any(
            len(p.prompt_ids) < len(s.prompt_ids) and s.prompt_ids[: len(p.prompt_ids)] == p.prompt_ids
            for p in turns
        )
        for s in follow_ups
    ), "each later turn extends an earlier one"
    tail = make_named("heavy_tail", 32000, 2000, math.inf, "poisson", 0, 16384, 1.0)
    longs = [s for s in tail if len(s.prompt_ids) == 8000]
    assert 10 <= len(longs) <= 30
    lengths = sorted(len(s.prompt_ids) for s in tail)
    assert 150 <= lengths[len(lengths) // 2] <= 250
    shared = make_named("heavy_tail", 32000, 50, math.inf, "poisson", 0, 16384, 1.0, system_tokens=64)
    assert len({tuple(s.prompt_ids[:64]) for s in shared}) == 1
    assert [s.prompt_ids[64:] for s in shared] == [s.prompt_ids for s in tail[:50]], (
        "the same prompts after it"
    )
    gens = make_named("generation", 32000, 400, math.inf, "poisson", 0, 16384, 1.0)
    assert {s.kind for s in gens} == {"generation"} and all(128 <= s.max_tokens <= 192 for s in gens)
    with pytest.raises(ValueError, match="generation"):
        make_named("steady", 32000, 1, math.inf, "poisson", 0, 16384, 1.0)


def test_no_router_beats_the_isolated_bound_and_the_oracle_knows_each_ttft() -> None:
    """route_bounds.py: every request's TTFT, under every router, is at least its own prefill alone with
    the best cache (so the bound's percentiles bound every router's); the perfect-information oracle's
    prediction is exact for a request nothing arrives after (its replica replayed forward)."""
    cfg = route_sim.SimConfig(num_replicas=2, seed=0)
    for name in ("multi_turn", "heavy_tail"):
        specs = make_named(name, 32000, 120, 40.0, "poisson", 0, 16384, 0.5)
        bound = route_bounds.isolated_ttft(specs, cfg)
        for policy in ("length_aware", "pow2", "prefix_affinity", route_bounds.OracleTtft):
            result = route_sim.simulate(specs, policy, cfg)
            assert all(t >= b - 1e-12 for t, b in zip(result.ttft_s, bound, strict=True)), (name, policy)
        last = max(range(len(specs)), key=lambda i: specs[i].arrival_s)
        assert result.predicted[last] == pytest.approx(result.ttft_s[last])
    assert any(t > b * 1.5 for t, b in zip(result.ttft_s, bound, strict=True)), "the bound is no simulation"


def test_transit_delays_the_engines_admission_and_the_routers_count_requests_in_transit() -> None:
    """Requests reach the engine after the router's call, the forward and the frontend (each serialized
    where it is in the serving path); the length-aware router keeps counting a send that a report taken
    while it was on its way does not include (count-based covering, router/unadmitted_sends.py)."""
    specs = [RequestSpec("chat", list(range(i % 50, i % 50 + 300)), 16, 0.004 * i) for i in range(80)]
    cfg = route_sim.SimConfig(router_call_s=0.001, transit_s=0.05, frontend_s=0.002, report_period_s=0.02)
    moving = route_sim.simulate(specs, "length_aware", cfg)
    floor = cfg.router_call_s + cfg.transit_s + cfg.frontend_s
    assert min(moving.ttft_s) >= floor, "no first token before the request reached the engine"
    assert abs(moving.placement["r0"] - moving.placement["r1"]) <= 16

    counted: list[int] = []

    class Watching(route_sim.LengthAware):
        def route(self, x: route_sim.RouteInput) -> str:
            rid = super().route(x)
            counted.append(sum(self.unadmitted.count(r, x.now) for r in self.replica_ids))
            return rid

    route_sim.simulate(specs, Watching, cfg)
    assert max(counted) >= 2, "sends in transit while reports were taken count by the admitted count"


def test_routers_on_one_send_board_see_each_others_sends_as_their_own() -> None:
    """Four routers: on the board (send_board.py), a request routed by one is in every other's view at
    once, so the same requests land as with one router; each alone knows only its own."""
    specs = make_named("heavy_tail", 256, 120, 40.0, "poisson", 0, 4096, 1.0)
    one = route_sim.simulate(specs, "length_aware", CFG)
    board = route_sim.simulate(specs, "length_aware_board", dataclasses.replace(CFG, num_routers=4))
    alone = route_sim.simulate(specs, "length_aware", dataclasses.replace(CFG, num_routers=4))
    assert board.placement == one.placement
    assert route_sim.percentile(board.ttft_s, 99) <= route_sim.percentile(alone.ttft_s, 99)


def test_the_path_tail_adds_a_draw_to_every_request() -> None:
    import route_replay

    base = [0.01 * i for i in range(1, 101)]
    same = route_replay.with_tail(base, [0.0])
    assert same["ttft_ms_p50"] == pytest.approx(1000 * route_sim.percentile(base, 50))
    shifted = route_replay.with_tail(base, [0.05])
    assert shifted["ttft_ms_p99"] == pytest.approx(same["ttft_ms_p99"] + 50)
