"""The benchmark scripts still run: they are timed only on the GPU machine, where a broken script costs
device time. Tiny shapes on CPU; the numbers are not checked, the rows' shape is."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_bench_tp_smoke(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    _run([str(BENCHMARKS / "bench_tp.py"), "--smoke", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    decode = [r for r in rows if r["bench"] == "tp-decode"]
    assert {(r["engine"], r["batch"]) for r in decode} == {
        ("fuserve-tp1", 1), ("fuserve-tp1", 2), ("fuserve-tp2-gloo", 1), ("fuserve-tp2-gloo", 2)
    }  # fmt: skip
    assert {r["plan_transport"] for r in decode if r["tp"] == 2} == {"shm"}
    assert {r["bench"] for r in rows} >= {"allreduce", "plan-broadcast"}


def test_bench_mixed_step_smoke(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    _run([str(BENCHMARKS / "bench_mixed_step.py"), "--smoke", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["decodes"], r["prompt"], r["tokens"]) for r in rows] == [(4, 3, 7), (2, 16, 18)]
    assert all(r["eager"]["pipelined_ms"] > 0 and r["decode_only"]["sync_ms"] > 0 for r in rows)


def test_bench_plan_transport(tmp_path: Path) -> None:
    _run([str(BENCHMARKS / "bench_plan_transport.py"), "--reps", "10", "--out", str(tmp_path)], tmp_path)
    (result,) = tmp_path.glob("plan-transport-*-cpu.json")
    rows = json.loads(result.read_text())["rows"]
    # 6 plans (whole tables and diffs among them) x (gloo, the ring) x (worker spinning or not)
    assert len(rows) == 24 and {r["transport"] for r in rows} == {"gloo", "shm"}
    assert all(r["delivered_us"] > 0 and r["send_us"] > 0 for r in rows)


def test_bench_sampler(tmp_path: Path) -> None:
    out = tmp_path / "sampler.json"
    args = ["--vocab", "512", "--batches", "1,4", "--reps", "2", "--out", str(out)]
    _run([str(BENCHMARKS / "bench_sampler.py"), *args], tmp_path)
    rows = json.loads(out.read_text())
    assert len(rows) == 12 and all(r["fuserve_ms"] > 0 and r["hf_style_ms"] > 0 for r in rows)


# ---- bench_serve ------------------------------------------------------------------------------------
# Its pure parts (closed-loop scheduling, the /metrics parsing, issue 15's bound check, the plot's
# panels) and its HTTP client against a stand-in server run here without Ray or a model, in seconds;
# one slow smoke test runs the whole script on a tiny model (Ray, Serve, the in-process engine).


def _load_bench_serve() -> types.ModuleType:
    """Loaded by path under its own name, exactly as `fuserve bench serve` loads it (the benchmarks
    folder is not a package)."""
    if "bench_serve" in sys.modules:
        return sys.modules["bench_serve"]
    spec = importlib.util.spec_from_file_location("bench_serve", BENCHMARKS / "bench_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bs() -> types.ModuleType:
    return _load_bench_serve()


def _specs(bs: types.ModuleType, n: int, max_tokens: int = 4) -> list:
    return [bs.RequestSpec("chat", [100 + i, 101, 102], max_tokens, 0.0) for i in range(n)]


def test_closed_loop_keeps_exactly_n_requests_in_flight(bs: types.ModuleType) -> None:
    rng = random.Random(0)
    in_flight, peak, sent = 0, 0, []

    async def send(i: int, spec: object) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        sent.append(i)
        await asyncio.sleep(rng.uniform(0, 0.004))  # requests of uneven length end out of order
        in_flight -= 1
        return bs.RequestResult("chat", ok=True)

    specs = _specs(bs, 40)
    results = asyncio.run(bs.closed_loop(send, specs, 8, bs.Tickets(40)))
    assert len(results) == 40 and sorted(sent) == list(range(40)) and peak == 8
    assert sorted(r.index for r in results) == list(range(40))  # each result keeps its request number
    # fewer requests than clients: each request once, never more in flight than requests
    sent.clear()
    peak = 0
    asyncio.run(bs.closed_loop(send, specs, 8, bs.Tickets(3)))
    assert sorted(sent) == [0, 1, 2] and peak == 3


def test_closed_loop_sends_next_only_when_last_ends(bs: types.ModuleType) -> None:
    """One client is a strict sequence: request i+1 starts after request i ended."""
    events: list[tuple[str, int]] = []

    async def send(i: int, spec: object) -> object:
        events.append(("start", i))
        await asyncio.sleep(0)
        events.append(("end", i))
        return bs.RequestResult("chat", ok=True)

    asyncio.run(bs.closed_loop(send, _specs(bs, 3), 1, bs.Tickets(3)))
    assert events == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]


def test_timed_closed_loop_stops_sending_at_its_deadline_and_cycles_specs(bs: types.ModuleType) -> None:
    picked: list[int] = []

    async def send(i: int, spec: object) -> object:
        picked.append(int(spec.prompt_ids[0]) - 100)
        await asyncio.sleep(0.005)
        return bs.RequestResult("chat", ok=True)

    level = bs.Level(_specs(bs, 3), concurrency=2, duration_s=0.1)
    t0 = time.perf_counter()
    asyncio.run(bs.closed_loop(send, level.specs, 2, level.tickets()))
    assert time.perf_counter() - t0 < 0.5  # no request starts after the deadline
    assert len(picked) > 6 and set(picked) == {0, 1, 2}  # more requests than specs: it cycles


def test_client_processes_draw_from_one_ticket_sequence(bs: types.ModuleType) -> None:
    import multiprocessing as mp

    counter = mp.get_context("spawn").Value("q", 0)
    a, b = bs.Tickets(5, counter=counter), bs.Tickets(5, counter=counter)
    taken = [a.take(), b.take(), b.take(), a.take(), a.take(), b.take(), a.take()]
    assert taken == [0, 1, 2, 3, 4, None, None]
    assert bs.split_clients(256, 4) == [64] * 4 and bs.split_clients(10, 4) == [3, 3, 2, 2]
    assert bs.split_clients(2, 8) == [1, 1]
    assert bs.auto_client_procs(16, cpus=16) == 1 and bs.auto_client_procs(256, cpus=16) == 4
    assert bs.auto_client_procs(256, cpus=2) == 1


def test_closed_loop_levels_draw_one_seeded_workload_per_level(bs: types.ModuleType) -> None:
    make = lambda num, seed: bs.make_workload(1000, num, math.inf, "fixed", seed, 4096, 0.25, bs.STEADY)
    levels = bs.closed_loop_levels([2, 4], make, seed=0, num_requests=6)
    assert [(lv.concurrency, len(lv.specs)) for lv in levels] == [(2, 6), (4, 6)]
    assert levels[0].specs[0].prompt_ids != levels[1].specs[0].prompt_ids  # no prefix hits across levels
    again = bs.closed_loop_levels([4], make, seed=0, num_requests=6)
    assert again[0].specs == levels[1].specs  # each side of a comparison gets the same requests
    assert [len(lv.specs) for lv in bs.closed_loop_levels([2, 4], make, 0, 6, requests_per_client=3)] == [
        6,
        12,
    ]
    timed = bs.closed_loop_levels([2], make, 0, 6, duration_s=5.0)[0]
    assert timed.tags() == {"concurrency": 2, "duration_s": 5.0} and timed.tickets().limit is None
    assert bs.Level(levels[0].specs, rate=2.0).tags() == {"rate": 2.0}


METRICS_PAGE = """\
# HELP fuserve_frontend_cpu_seconds CPU seconds of the replica's frontend process
# TYPE fuserve_frontend_cpu_seconds counter
fuserve_frontend_cpu_seconds_total{replica="a"} 1.5
fuserve_frontend_cpu_seconds_total{replica="b"} 0.5
fuserve_frontend_cpu_seconds_created{replica="a"} 1.7e9
# TYPE fuserve_engine_steps_total counter
fuserve_engine_steps_total{replica="a"} 100
# TYPE fuserve_engine_step_seconds counter
fuserve_engine_step_seconds_total{replica="a"} 0.8
# TYPE fuserve_requests counter
fuserve_requests_total{endpoint="completions",status="200"} 7
"""


def test_parse_counters_sums_replicas_and_gives_nan_for_what_is_missing(bs: types.ModuleType) -> None:
    got = bs.parse_counters(METRICS_PAGE)
    assert got["frontend_cpu_s"] == 2.0 and got["engine_steps"] == 100 and got["engine_step_s"] == 0.8
    assert math.isnan(got["engine_core_cpu_s"])  # not exported
    assert all(math.isnan(v) for v in bs.parse_counters("fuserve_requests_total 3\n").values())
    assert all(math.isnan(v) for v in bs.parse_counters("not {a prometheus page\n").values())
    # what prometheus_client itself renders for a per-replica counter family (the server's way)
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily

    class One:
        def collect(self) -> list:
            c = CounterMetricFamily("fuserve_engine_steps", "steps", labels=["replica"])
            c.add_metric(["r1"], 42.0)
            return [c]

    registry = CollectorRegistry()
    registry.register(One())
    assert bs.parse_counters(generate_latest(registry).decode())["engine_steps"] == 42.0


def test_level_figures_share_requests_and_cpu_between_frontend_processes(bs: types.ModuleType) -> None:
    """Two frontend processes' labelled series: the level's requests and CPU per process, busiest
    first; one process alone (or none) gives no shares."""

    def page(a_req: float, a_cpu: float, b_req: float, b_cpu: float) -> str:
        return (
            f'fuserve_frontend_process_requests_total{{process="11"}} {a_req}\n'
            f'fuserve_frontend_process_cpu_seconds_total{{process="11"}} {a_cpu}\n'
            f'fuserve_frontend_process_requests_total{{process="22"}} {b_req}\n'
            f'fuserve_frontend_process_cpu_seconds_total{{process="22"}} {b_cpu}\n'
        )

    before = bs.parse_counters(page(10, 1.0, 5, 2.0))
    after = bs.parse_counters(page(40, 2.5, 95, 4.0))
    fig = bs.level_figures(before, after, output_tokens=1000, wall_s=2.0)
    assert fig["frontend_process_request_shares"] == [0.75, 0.25]  # 90 of 120, then 30
    assert fig["frontend_process_cpu_utils"] == [1.0, 0.75]
    one = bs.parse_counters('fuserve_frontend_process_requests_total{process="11"} 4\n')
    assert "frontend_process_request_shares" not in bs.level_figures(one, one, 10, 1.0)


def test_level_figures_from_counters_and_engine_stats(bs: types.ModuleType) -> None:
    before = {"frontend_cpu_s": 1.0, "engine_steps": 10, "engine_step_s": 0.1, "engine_core_cpu_s": 2.0}
    after = {"frontend_cpu_s": 1.5, "engine_steps": 110, "engine_step_s": 0.7, "engine_core_cpu_s": 3.0}
    fig = bs.level_figures(before, after, output_tokens=1000, wall_s=2.0)
    assert fig["frontend_cpu_ms_per_token"] == pytest.approx(0.5)
    assert fig["frontend_cpu_util"] == pytest.approx(0.25) and fig["engine_core_cpu_util"] == pytest.approx(
        0.5
    )
    assert fig["engine_steps"] == 100 and fig["engine_step_ms"] == pytest.approx(6.0)
    assert math.isnan(fig["frontend_admit_ms"])  # a server without the TTFT histograms
    parts = dict(admit_s=0.5, admit_n=100, core_first_s=2.0, core_first_n=100, emit_s=0.1, emit_n=400)
    fig = bs.level_figures({**before, **dict.fromkeys(parts, 0.0)}, {**after, **parts}, 1000, 2.0)
    assert fig["frontend_admit_ms"] == pytest.approx(5.0)
    assert fig["core_first_token_ms"] == pytest.approx(20.0)
    assert fig["frontend_emit_ms"] == pytest.approx(0.25)
    # stats without the step fields (an older engine) and an engine that ran no step: NaN, not a crash
    old = bs.engine_counters(types.SimpleNamespace(num_running=0))
    assert all(math.isnan(v) for v in bs.level_figures(old, old, 0, 0.0).values())
    new = bs.engine_counters(types.SimpleNamespace(num_steps=5, step_seconds_total=0.05))
    assert new["engine_steps"] == 5 and math.isnan(new["frontend_cpu_s"])
    assert math.isnan(bs.level_figures(new, new, 10, 1.0)["engine_step_ms"])


def test_level_figures_split_a_step_into_host_work_and_device_wait(bs: types.ModuleType) -> None:
    before = bs.engine_counters(types.SimpleNamespace(num_steps=0, step_seconds_total=0.0))
    before.update(engine_wait_s=0.0, engine_prefill_steps=0, engine_prefill_step_s=0.0)
    before.update(engine_busy_s=0.0, engine_prefill_busy_s=0.0)
    after = bs.engine_counters(
        types.SimpleNamespace(
            num_steps=100,
            step_seconds_total=1.0,
            device_wait_seconds_total=0.6,
            prefill_steps=20,
            prefill_step_seconds_total=0.4,
            device_busy_seconds_total=0.5,
            prefill_device_busy_seconds_total=0.3,
        )
    )
    fig = bs.level_figures(before, after, 1000, 2.0)
    assert fig["engine_step_ms"] == pytest.approx(10.0)
    assert fig["engine_host_ms_per_step"] == pytest.approx(4.0)
    assert fig["engine_wait_ms_per_step"] == pytest.approx(6.0)
    assert fig["engine_prefill_step_share"] == pytest.approx(0.2)
    assert fig["engine_prefill_step_ms"] == pytest.approx(20.0)
    assert fig["engine_decode_step_ms"] == pytest.approx(7.5)
    assert fig["engine_decode_busy_ms"] == pytest.approx(2.5)
    assert fig["engine_prefill_busy_ms"] == pytest.approx(15.0)
    assert fig["engine_loop_ms_per_step"] == pytest.approx(20.0)
    assert (
        "4.00 + 6.00 (20% of steps with prefill, 20.0 ms, device 15.0; decode-only 7.5 ms, device 2.50; "
        "a loop 20.00 ms)" in bs._split(fig)
    )


def _row(path: str, **figures: float) -> dict:
    row = {"comparison": "overhead", "path": path, "concurrency": 16, "num_failed": 0}
    row.update(itl_ms_p50=9.0, itl_ms_p90=10.0, itl_ms_p99=12.0)
    row.update(ttft_ms_p50=20.0, ttft_ms_p90=30.0, ttft_ms_p99=40.0)
    row.update(output_tok_s=1000.0, engine_step_ms=8.0)
    return {**row, **figures}


def test_check_bounds_is_issue_15s(bs: types.ModuleType) -> None:
    engine = _row("engine")
    at_limits = bs.check_bounds(_row("http", itl_ms_p90=12.0, ttft_ms_p50=25.0, output_tok_s=950.0), engine)
    assert at_limits["bounds_ok"] and at_limits["itl_ms_p90_limit"] == pytest.approx(12.0)
    assert at_limits["output_tok_s_vs_engine"] == pytest.approx(0.95)
    for over in ({"itl_ms_p90": 12.01}, {"ttft_ms_p50": 25.01}, {"output_tok_s": 949.0}):
        assert not bs.check_bounds(_row("http", **over), engine)["bounds_ok"], over
    assert not bs.check_bounds(_row("http", itl_ms_p90=math.nan), engine)["itl_p90_ok"]
    assert not bs.check_bounds(_row("http", num_failed=1), engine)["bounds_ok"]
    ratios = bs.check_bounds(_row("http", engine_step_ms=8.8), _row("engine", engine_step_ms=math.nan))
    assert math.isnan(ratios["engine_step_ms_vs_engine"])
    pairs = bs.overhead_pairs([_row("http"), engine, _row("http", concurrency=64)])
    assert len(pairs) == 1 and pairs[0][1] is engine  # a level only one side ran has no pair


def test_steady_figures_leave_out_the_first_wave(bs: types.ModuleType) -> None:
    """The first `concurrency` requests start together; the steady figures are those of the rest, and
    the bounds are judged on them too (beside, not instead of, the figures over every request)."""

    def result(i: int, ttft_ms: float, itl_ms: float) -> object:
        return bs.RequestResult("chat", ok=True, ttft_s=ttft_ms / 1e3, itl_s=[itl_ms / 1e3] * 3, index=i)

    ok = [result(i, 300.0, 50.0) for i in range(4)] + [result(i, 20.0, 10.0) for i in range(4, 12)]
    row = bs.summarize(ok, 1.0, 1, 0.0, first_wave=4)
    assert row["steady_requests"] == 8 and row["ttft_ms_p50_steady"] == pytest.approx(20.0)
    assert row["first_wave_ttft_ms_p50"] == pytest.approx(300.0)
    assert row["itl_ms_p90_steady"] == pytest.approx(10.0) and row["itl_ms_p90"] == pytest.approx(50.0)
    assert "steady_requests" not in bs.summarize(ok, 1.0, 1, 0.0)  # open loop: no first wave
    steady = {
        "ttft_ms_p50_steady": 20.0,
        "ttft_ms_p99_steady": 30.0,
        "itl_ms_p90_steady": 10.0,
        "steady_requests": 8,
    }
    engine = _row("engine", **steady, first_wave_ttft_ms_p50=1.0)
    http = _row(
        "http", ttft_ms_p50=99.0, **{**steady, "ttft_ms_p50_steady": 25.0}, first_wave_ttft_ms_p50=1.0
    )
    b = bs.check_bounds(http, engine)
    assert not b["bounds_ok"] and b["bounds_ok_steady"]
    assert not bs.check_bounds({**http, "ttft_ms_p50_steady": 25.01}, engine)["bounds_ok_steady"]
    assert "after the first wave (8 requests): PASS" in bs.bounds_line(http, engine)


def test_plot_draws_only_panels_with_data(bs: types.ModuleType) -> None:
    titles = lambda rows: [p.title for p in bs.select_panels(rows)]
    open_loop = [{**_row(p), "rate": 1.0} for p in ("http", "engine")]
    for r in open_loop:
        del r["concurrency"]
    assert titles(open_loop) == ["serving path vs engine (ms)"]  # not two empty router panels
    router = {"comparison": "router", "router": "length_aware", "rate": 1.5, "ttft_ms_p99": 1.0}
    router.update(output_tok_s=2.0)
    assert len(titles([router, *open_loop])) == 3
    closed = [_row(p, concurrency=n) for p in ("http", "engine") for n in (16, 64)]
    nan = dict(engine_step_ms=math.nan, frontend_cpu_ms_per_token=math.nan)
    no_counters = bs.select_panels([{**r, **nan} for r in closed])
    assert [p.title.split(" (")[0] for p in no_counters] == [
        "ITL p90", "TTFT p50", "output tokens/s by concurrency", "ITL p99", "TTFT p99"
    ]  # fmt: skip
    itl = no_counters[0]
    assert itl.categories == ["16", "64"] and set(itl.series) == {"http", "engine"}
    assert itl.limit == [pytest.approx(12.0)] * 2
    with_counters = bs.select_panels([{**r, "frontend_cpu_ms_per_token": 0.1} for r in closed])
    assert len(with_counters) == 7
    cpu = with_counters[-1]
    assert cpu.title.startswith("frontend CPU") and list(cpu.series) == ["http", "engine"]
    # --url --concurrency: HTTP rows alone, no bound to draw
    alone = bs.select_panels([{**r, "comparison": "none"} for r in closed if r["path"] == "http"])
    assert alone and all(set(p.series) == {"http"} and p.limit is None for p in alone)
    assert bs.select_panels([]) == []


def test_plot_writes_a_png(bs: types.ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    meta = {"model": "m", "device": "cpu", "date": "2026-11-26", "commit": "x"}
    rows = [{**meta, **_row(p, concurrency=n)} for p in ("http", "engine") for n in (2, 4)]
    assert bs.plot(rows, tmp_path / "serve.png") and (tmp_path / "serve.png").stat().st_size > 0


class StandInServer:
    """An OpenAI-shaped SSE server on 127.0.0.1 (aiohttp, in a thread): `max_tokens` events a few ms
    apart, /v1/models, and a /metrics page whose counters grow with the tokens sent. It records the
    most requests it had in flight at once."""

    def __init__(self) -> None:
        self.in_flight = self.peak = self.tokens = 0
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _run(self) -> None:
        from aiohttp import web

        async def models(request: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "stand-in"}]})

        async def metrics(request: web.Request) -> web.Response:
            lines = [
                f'fuserve_frontend_cpu_seconds_total{{replica="x"}} {self.tokens * 1e-4}',
                f'fuserve_engine_steps_total{{replica="x"}} {self.tokens}',
                f'fuserve_engine_step_seconds_total{{replica="x"}} {self.tokens * 2e-3}',
            ]
            return web.Response(text="\n".join(lines) + "\n")

        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.002)
                self.tokens += 1
                event = {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
            await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.in_flight -= 1
            return resp

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.runner = runner
        self.started.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandInServer]:
    server = StandInServer()
    yield server
    server.close()


@pytest.mark.parametrize("procs", [1, 2])
def test_http_closed_loop_against_a_stand_in_server(
    bs: types.ModuleType, stand_in: StandInServer, procs: int
) -> None:
    """procs 2 spawns client processes that share one ticket counter, as at 256 streams on a GPU box."""
    stand_in.peak = 0
    level = bs.Level(_specs(bs, 12, max_tokens=5), concurrency=4)
    args = argparse.Namespace(client_procs=procs, device_hour_usd=2.0)
    (row,) = bs.http_levels(stand_in.url, [level], args, {"comparison": "none", "path": "http"})
    assert row["num_requests"] == 12 and row["num_failed"] == 0 and row["output_tokens"] == 60
    assert row["concurrency"] == 4 and row["client_procs"] == procs and stand_in.peak == 4
    assert row["itl_ms_p50"] > 1.0 and row["ttft_ms_p50"] > 1.0 and row["client_cpu_util"] > 0
    # the stand-in's counters: 0.1 ms of frontend CPU and one 2 ms step per token sent
    assert row["frontend_cpu_ms_per_token"] == pytest.approx(0.1)
    assert row["engine_steps"] == 60 and row["engine_step_ms"] == pytest.approx(2.0)
    assert math.isnan(row["engine_core_cpu_util"])


def test_http_open_loop_and_a_server_without_counters(bs: types.ModuleType, stand_in: StandInServer) -> None:
    results, wall, _ = bs.http_level(stand_in.url, bs.Level(_specs(bs, 3), rate=math.inf))
    assert len(results) == 3 and all(r.ok and len(r.itl_s) == 3 for r in results) and wall > 0
    assert all(math.isnan(v) for v in bs.scrape_counters(stand_in.url + "/nowhere").values())


def test_a_burst_spread_over_client_processes_comes_back_in_the_level_order(
    bs: types.ModuleType, stand_in: StandInServer
) -> None:
    """A burst's requests are dealt to spawned clients round-robin; its results must still line up with
    the level's requests (the router rows pair them with the replay and the replicas)."""
    stand_in.peak = 0
    specs = [bs.RequestSpec("chat", [7, i], 30 + i % 4, 0.0) for i in range(7)]
    results, wall, util = bs.http_level(stand_in.url, bs.Level(specs, rate=math.inf), procs=3)
    assert [r.index for r in results] == list(range(7)) and wall > 0 and util > 0
    assert [r.output_tokens for r in results] == [s.max_tokens for s in specs]
    assert all(r.ok for r in results) and stand_in.peak == 7
    args = argparse.Namespace(client_procs=0)
    assert bs.open_loop_procs(math.inf, [specs[0]] * 400, args) == bs.auto_client_procs(400)
    assert bs.open_loop_procs(20.0, [specs[0]] * 400, args) == 1


def test_fuserve_bench_serve_loads_the_script(tmp_path: Path) -> None:
    """`fuserve bench serve` loads the file by path (no benchmarks folder on sys.path)."""
    env = {**os.environ}
    done = subprocess.run(
        [sys.executable, "-m", "fuserve.cli", "bench", "serve", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "--concurrency" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_bench_serve_overhead_closed_loop_smoke(tmp_path: Path) -> None:
    """The whole script on a tiny model: served app (HTTP, SSE) then the in-process engine, two
    closed-loop levels, one row per side and level, the bound check on the HTTP rows."""
    from checkpoints import make_checkpoint  # imports transformers: only here, not for the fast tests

    folder = make_checkpoint(tmp_path / "tiny", "llama3", max_position_embeddings=512, vocab_size=260)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"model: {{path: {folder}, name: tiny, max_model_len: 512}}\ncache: {{num_blocks: 256}}\n"
        "serve: {num_replicas: 1, num_cpus_per_replica: 1.0}\n"
    )
    out = tmp_path / "serve.json"
    args = ["--config", str(config), "--compare", "overhead", "--concurrency", "1,2", "--num-requests", "4"]
    _run([str(BENCHMARKS / "bench_serve.py"), *args, "--scale", "0.25", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    assert [(r["path"], r["concurrency"]) for r in rows] == [
        ("http", 1),
        ("http", 2),
        ("engine", 1),
        ("engine", 2),
    ]
    assert all(r["num_failed"] == 0 and r["num_requests"] == 4 and "rate" not in r for r in rows)
    assert all(isinstance(r["bounds_ok"], bool) and "itl_ms_p90_limit" in r for r in rows[:2])
    assert all("frontend_cpu_ms_per_token" in r and "engine_step_ms" in r for r in rows)
    # the TTFT parts from the replica's header, and the host's speed (bounds pass or fail by machine)
    assert all(r["replica_ms_p50"] >= r["core_first_ms_p50"] > 0 for r in rows[:2])
    assert all(r["host_python_ms"] > 0 and r["host_cpu"] for r in rows)


def test_bench_spec_smoke(tmp_path: Path) -> None:
    """Free drafts and a draft server's, at synthetic acceptance 0.7: the rule holds at every batch (the
    random target never agrees with a repeated token, so a rule the engine ignored reads 0 at batch 2),
    and the served draft's rows carry its channel time."""
    out = tmp_path / "spec.json"
    args = ["--smoke", "--proposer", "repeat,server=tiny,inproc=tiny", "--out", str(out)]
    _run([str(BENCHMARKS / "bench_spec.py"), *args], tmp_path)
    rows = json.loads(out.read_text())
    assert {(r["batch"], r["k"], r["proposer"]) for r in rows} == {(b, 0, "none") for b in (1, 2)} | {
        (b, k, p)
        for b in (1, 2)
        for k in (2, 3, "adaptive")
        for p in ("repeat", "server=tiny", "inproc=tiny")
    }
    spec = [r for r in rows if r["k"] != 0]
    assert all(r["synthetic_acceptance"] == 0.7 for r in spec)
    # plain decoding before and after each batch's speculative rows; speedups are over the mean of the two
    plain = {(r["batch"], r["plain_run"]): r["tok_s"] for r in rows if r["k"] == 0}
    assert set(plain) == {(b, run) for b in (1, 2) for run in ("before", "after")}
    for r in spec:
        baseline = (plain[r["batch"], "before"] + plain[r["batch"], "after"]) / 2
        assert r["speedup"] == pytest.approx(r["tok_s"] / baseline)
        assert r["speedup_first_plain"] == pytest.approx(r["tok_s"] / plain[r["batch"], "before"])
    assert all(r["drafts"] > 0 and r["acceptance_at"] for r in spec if r["k"] != "adaptive")
    fixed = [r for r in spec if r["batch"] == 2 and r["k"] != "adaptive"]
    assert 0.5 < sum(r["accepted"] for r in fixed) / sum(r["drafts"] for r in fixed) < 0.95
    served = [r for r in spec if r["proposer"] == "server=tiny"]
    assert all(r["placement"] == "cpu" for r in served)
    assert all(r["channel_ms_per_round"] > 0 for r in served if r["k"] != "adaptive")  # it may not draft
    inproc = [r for r in spec if r["proposer"] == "inproc=tiny"]
    assert all(r["placement"] == "in-process" and r["channel_ms_per_round"] == 0 for r in inproc)
    assert {r["device"] for r in rows} == {"cpu"} and all(r["commit"] for r in rows)


def test_bench_spec_steady_keeps_the_batch_in_flight(tmp_path: Path) -> None:
    """--steady 3: each batch size's rows generate batch x 3 requests, a new one as each ends."""
    out = tmp_path / "steady.json"
    _run(
        [
            str(BENCHMARKS / "bench_spec.py"),
            "--smoke",
            "--steady",
            "3",
            "--proposer",
            "repeat",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    rows = json.loads(out.read_text())
    assert {r["batch"] for r in rows} == {1, 2} and all(r["steady"] == 3 for r in rows)
    assert all(r["output_tokens"] == r["batch"] * 3 * 12 for r in rows)  # --smoke: 12 tokens a request
    assert all(r["drafts"] > 0 for r in rows if r["k"] not in (0, "adaptive"))


def test_profile_draft_round_smoke(tmp_path: Path) -> None:
    """The draft-round profile still runs (tiny draft, CPU): a row per batch and k, rounds timed."""
    out = tmp_path / "draft-round.json"
    _run([str(BENCHMARKS / "profile_draft_round.py"), "--smoke", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    assert {(r["batch"], r["k"]) for r in rows} == {(b, k) for b in (1, 8) for k in (1, 2, 4)}
    assert all(r["ms_p50"] >= r["ms_min"] > 0 and r["device"] == "cpu" for r in rows)


def test_bench_decode_splits_smoke(tmp_path: Path) -> None:
    """The split-K against one-split comparison still runs (tiny shape, CPU): a row per mode and context."""
    out = tmp_path / "splits.json"
    _run([str(BENCHMARKS / "bench_decode_splits.py"), "--smoke", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["context"]) for r in rows] == [("as served", 32), ("one split", 32)]
    assert all(r["round_ms"] > 0 and r["replay_ms"] is None for r in rows)


def test_phase_times_keep_the_draft_s_waits_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase that waits for the draft's reply (`collect_pending` inside it) is charged its own host time;
    the wait goes to `<phase>_draft`, not to the phase and not to the wait itself's caller twice."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from phase_times import DRAFT_WAIT, PhaseTimes

    class Draft:
        def collect_pending(self) -> None:
            time.sleep(0.05)

    draft = Draft()

    class Engine:
        def propose(self) -> None:
            time.sleep(0.01)
            draft.collect_pending()

    engine = Engine()
    phases = PhaseTimes(engine)  # type: ignore[arg-type]
    phases._wrap(draft, "collect_pending", DRAFT_WAIT)
    phases._wrap(engine, "propose", "propose")
    engine.propose()
    s = phases.seconds
    assert s["propose_draft"] == s[DRAFT_WAIT] >= 0.045
    assert 0.009 <= s["propose"] < s["propose_draft"]  # its own sleep, not the draft's
    assert DRAFT_WAIT + "_draft" not in s
    phases._undo()
    assert "propose" not in vars(engine) and "collect_pending" not in vars(draft)


@pytest.mark.parametrize("tied", [False, True])
def test_the_decode_floor_counts_what_a_step_reads(monkeypatch: pytest.MonkeyPatch, tied: bool) -> None:
    """bench_decode's floor: every parameter of the model but the embedding table (a step reads one row a
    token), the head once even where it is the embedding's (tied)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from bench_decode import TINY, weight_bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(TINY, tie_word_embeddings=tied)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    read = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if tied:  # the head is the embedding table, read whole by the head
        read += cfg["vocab_size"] * cfg["hidden_size"]
    assert weight_bytes(cfg) == 2 * read
