"""Serving benchmark: a load generator, the router comparison, and the serving path's own cost.

    python benchmarks/bench_serve.py                    # both comparisons, default model, CPU
    python benchmarks/bench_serve.py --compare overhead --concurrency 2,4 --num-requests 8 --scale 0.25
    fuserve bench serve --config configs/x.yaml --num-requests 200 --rate 8
    fuserve bench serve --url http://host:8000 --compare none   # load an already running server
    fuserve bench serve --url http://host:8000 --concurrency 16,64 --num-requests 256

Issue 15's acceptance run (one GPU, Llama-3-8B shape, random weights; estimated at 5-7 minutes):
    python benchmarks/bench_serve.py --config configs/llama3-8b-dummy.yaml --compare overhead \
        --concurrency 16,64,128,256 --requests-per-client 16 --scale 1 --check-bounds

Workload: requests are drawn from a mix of three kinds: short chat turns (sharing a system prompt),
long documents (long prompt, short answer) and long generations (short prompt, long answer).
Prompts are token ids of exact lengths and outputs ignore EOS, so every run does the same work.
Load comes in two shapes:
- open loop (`--rate`, `--overhead-rate`): requests arrive by a Poisson process (or at a fixed
  rate, or all at once) whatever the server does; rows carry `rate`.
- closed loop (`--concurrency 16,64`): N clients, each sending its next request when its last one
  ends, for `--num-requests` requests per level (or `--requests-per-client` x N, or `--duration`
  seconds); rows carry `concurrency`. This is how a fixed number of users loads a server, and the
  shape in which issue 15 states its bounds.

Comparisons, each on the same seeded workload:
- `routers`: 2 engine replicas behind the length-aware router vs Ray Serve's default (power of
  two choices on request counts): p99 time to first token and throughput (open loop, `--rate`).
- `overhead`: the same requests through HTTP (SSE) and straight into an in-process AsyncEngine with
  the same threads: TTFT, ITL and output tok/s side by side at `--overhead-rate` or at each
  `--concurrency` level, checked against issue 15's bounds: ITL p90 <= 1.1 x engine + 1 ms, TTFT
  p50 <= engine + 5 ms, output tok/s >= 0.95 x engine. Both sides need the device memory, so the
  served app runs every level first, is deleted, then the in-process engine runs every level.
  Each level also records the engine's mean step time (from the replica's /metrics under HTTP
  load, from `AsyncEngine.stats` without it) and the replica frontend's CPU ms per output token.

Reports req/s, output tok/s, TTFT and ITL p50/p90/p99 and the price per million output tokens at
`--device-hour-usd` per device-hour; writes flat JSON rows (DESIGN.md's schema) and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from fuserve.gc_tuning import GcPauses, quiet_gc, take_gc_pauses

HERE = Path(__file__).resolve().parent
# `fuserve bench serve` loads this file by path, so its folder is not on sys.path there; the sibling
# bench_decode and this module's spawned client processes (which import it by name) need it.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from host_speed import host_cpu  # noqa: E402
from workloads import KINDS, WORKLOADS, RequestSpec, make_named, make_workload  # noqa: E402, F401

RESULTS = HERE / "results"
STEADY = ("chat", "generation")  # the overhead comparison's mix: no long prefills stalling decode
STREAMS_PER_CLIENT_PROC = 64  # --client-procs auto: one client process per this many closed-loop clients

# Issue 15's bounds on the serving path against the in-process engine, on the same workload.
ITL_P90_FACTOR, ITL_P90_SLACK_MS = 1.1, 1.0
TTFT_P50_SLACK_MS = 5.0
TOK_S_FLOOR = 0.95

# Counters a replica's GET /metrics exports (the frontend's CPU, the engine core's steps), and
# the AsyncEngine.stats fields that hold the same for the in-process engine.
SERVER_COUNTERS = {
    "frontend_cpu_s": "fuserve_frontend_cpu_seconds_total",
    "engine_steps": "fuserve_engine_steps_total",
    "engine_step_s": "fuserve_engine_step_seconds_total",
    "engine_wait_s": "fuserve_engine_device_wait_seconds_total",
    "engine_busy_s": "fuserve_engine_device_busy_seconds_total",
    "engine_prefill_busy_s": "fuserve_engine_prefill_device_busy_seconds_total",
    "engine_prefill_steps": "fuserve_engine_prefill_steps_total",
    "engine_prefill_step_s": "fuserve_engine_prefill_step_seconds_total",
    "engine_core_cpu_s": "fuserve_engine_core_cpu_seconds_total",  # optional: NaN where not exported
    "engine_gc_s": "fuserve_engine_core_gc_seconds_total",  # Python's collector in each process
    "frontend_gc_s": "fuserve_frontend_gc_seconds_total",
    # where time to first token goes inside the replica (histograms' sums and counts)
    "admit_s": "fuserve_frontend_admit_seconds_sum",
    "admit_n": "fuserve_frontend_admit_seconds_count",
    "core_first_s": "fuserve_engine_core_first_token_seconds_sum",
    "core_first_n": "fuserve_engine_core_first_token_seconds_count",
    "emit_s": "fuserve_frontend_emit_seconds_sum",
    "emit_n": "fuserve_frontend_emit_seconds_count",
}
# Per frontend process (a `process` label each): its CPU and finished requests, as "<key>:<pid>" entries
PROCESS_COUNTERS = {
    "fuserve_frontend_process_cpu_seconds_total": "proc_cpu_s:",
    "fuserve_frontend_process_requests_total": "proc_requests:",
}
# mean ms of each part of TTFT inside the replica: (row key, sum counter, count counter)
TTFT_PARTS = [
    ("frontend_admit_ms", "admit_s", "admit_n"),
    ("core_first_token_ms", "core_first_s", "core_first_n"),
    ("frontend_emit_ms", "emit_s", "emit_n"),
]
ENGINE_STATS_FIELDS = {
    "engine_steps": "num_steps",
    "engine_step_s": "step_seconds_total",
    "engine_wait_s": "device_wait_seconds_total",
    "engine_busy_s": "device_busy_seconds_total",
    "engine_prefill_busy_s": "prefill_device_busy_seconds_total",
    "engine_prefill_steps": "prefill_steps",
    "engine_prefill_step_s": "prefill_step_seconds_total",
    "engine_gc_s": "gc_seconds_total",  # the whole benchmark process's, its clients' included
}


@dataclass
class RequestResult:
    kind: str
    ok: bool
    ttft_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    e2e_s: float = math.nan
    replica: str = ""
    error: str = ""
    transit_ms: float = math.nan  # the HAProxy router's decision to the replica's receipt (its header)
    # its TTFT inside the replica (x-fuserve-ttft-parts-ms): admission, engine core, arrival to response
    ttft_parts_ms: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    index: int = -1  # its number in the level (a closed loop's first `concurrency` start together)


@dataclass
class Level:
    """One load level: open loop (each request sent at its `arrival_s`) when `concurrency` is None,
    else closed loop: `concurrency` clients send `num_requests` requests (or keep sending for
    `duration_s` seconds, cycling through `specs`), each client its next when its last one ends."""

    specs: list[RequestSpec]
    rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None

    def tags(self) -> dict[str, Any]:
        """What a row says about its load: `rate` for open loop, `concurrency` for closed loop."""
        if self.concurrency is None:
            return {"rate": self.rate}
        tags: dict[str, Any] = {"concurrency": self.concurrency}
        if self.duration_s is not None:
            tags["duration_s"] = self.duration_s
        return tags

    def tickets(self, counter: Any = None) -> Tickets:
        """A closed loop's request numbers; the duration counts from this call."""
        deadline = time.perf_counter() + self.duration_s if self.duration_s is not None else None
        limit = self.num_requests if self.num_requests is not None else len(self.specs)
        return Tickets(None if self.duration_s is not None else limit, deadline, counter)


def closed_loop_levels(
    concurrencies: list[int],
    make: Callable[[int, int], list[RequestSpec]],
    seed: int,
    num_requests: int,
    requests_per_client: int | None = None,
    duration_s: float | None = None,
) -> list[Level]:
    """One closed-loop level per concurrency. `make(num, seed)` draws the workload; each level gets
    its own seed, so a level does not find the previous level's prompts in the prefix cache, and the
    same level gets the same requests on every side of a comparison. A timed level draws enough
    requests (32 per client) that cycling through them rarely repeats a prompt."""
    levels = []
    for n in concurrencies:
        count = requests_per_client * n if requests_per_client else num_requests
        if duration_s is not None:
            count = max(num_requests, 32 * n)
        elif count < n:
            print(f"  note: {count} requests at concurrency {n}: only {count} clients will ever be busy")
        levels.append(Level(make(count, seed * 100_003 + n), concurrency=n, duration_s=duration_s))
    return levels


# ---- closed-loop scheduling -------------------------------------------------------------------------
class Tickets:
    """Hands closed-loop clients their request numbers 0, 1, 2, ... until `limit` are out or
    `deadline_s` (a perf_counter time) has passed. With a multiprocessing Value as `counter`, client
    processes draw from one sequence, so the requests sent do not depend on how clients are spread
    over processes."""

    def __init__(self, limit: int | None, deadline_s: float | None = None, counter: Any = None) -> None:
        self.limit, self.deadline_s, self.counter = limit, deadline_s, counter
        self._next = 0

    def take(self) -> int | None:
        if self.deadline_s is not None and time.perf_counter() >= self.deadline_s:
            return None
        if self.counter is None:
            i, self._next = self._next, self._next + 1
        else:
            with self.counter.get_lock():
                i = self.counter.value
                self.counter.value = i + 1
        return i if self.limit is None or i < self.limit else None


async def closed_loop(
    send: Callable[[int, RequestSpec], Awaitable[RequestResult]],
    specs: list[RequestSpec],
    concurrency: int,
    tickets: Tickets,
) -> list[RequestResult]:
    """`concurrency` clients; each sends request number i (`specs[i % len(specs)]`) and takes the
    next number only when that request has ended, so exactly `concurrency` requests are in flight
    until the tickets run out. Results come in the order requests ended."""
    results: list[RequestResult] = []

    async def client() -> None:
        while (i := tickets.take()) is not None:
            result = await send(i, specs[i % len(specs)])
            result.index = i
            results.append(result)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def split_clients(concurrency: int, procs: int) -> list[int]:
    """Closed-loop clients per client process, as even as can be, no process without a client."""
    procs = max(1, min(procs, concurrency))
    return [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]


def auto_client_procs(concurrency: int, cpus: int | None = None) -> int:
    """One client process per 64 streams, at most a quarter of the CPUs: one Python process parses
    about 30k SSE events/s with aiohttp on a fast core, and 256 streams send up to ~20k/s, so a single
    client would add its own queueing to the ITL it measures. The rest of the CPUs stay with the
    server (proxy, frontend, engine core)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(math.ceil(concurrency / STREAMS_PER_CLIENT_PROC), cpus // 4))


def open_loop_procs(rate: float, specs: list[RequestSpec], args: argparse.Namespace) -> int:
    """A burst sends every request at once: from one process, its 400 connections and ~30k SSE events
    a second through two replicas are the client's limit (two H200s, 2026-11-28: TTFT p50 158 ms of
    288 outside the replicas), so it is spread like a closed loop of that many clients. Rows at a
    finite rate keep one process, as every recorded router comparison had."""
    if not math.isinf(rate):
        return 1
    return args.client_procs or auto_client_procs(len(specs))


# ---- HTTP clients -----------------------------------------------------------------------------------
def _session(connections: int) -> aiohttp.ClientSession:
    """aiohttp, not httpx: at one SSE event per engine step per stream the client parses thousands of
    events a second, and httpx costs ~3x aiohttp's CPU per event (measured ~100 vs ~30 us on a
    2-core box), which shows up as inter-token latency that the server did not cause."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=connections + 8))


async def _model_name(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/v1/models") as r:
        return (await r.json())["data"][0]["id"]


async def _http_one(session: aiohttp.ClientSession, url: str, model: str, spec: RequestSpec) -> RequestResult:
    body = {
        "model": model,
        "prompt": spec.prompt_ids,
        "max_tokens": spec.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = RequestResult(spec.kind, ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                res.error = f"{r.status}: {(await r.read())[:200]!r}"
                return res
            res.replica = r.headers.get("x-fuserve-replica", "")
            res.transit_ms = float(r.headers.get("x-fuserve-transit-ms", "nan"))
            parts = r.headers.get("x-fuserve-ttft-parts-ms", "").split(",")
            if len(parts) == 3:
                res.ttft_parts_ms = (float(parts[0]), float(parts[1]), float(parts[2]))
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if event.get("choices"):  # one event per engine step (the usage event has none)
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                if event.get("usage"):
                    res.output_tokens = event["usage"]["completion_tokens"]
        res.e2e_s = time.perf_counter() - start
        res.ok = res.output_tokens == spec.max_tokens
    except Exception as err:  # a benchmark reports failures, it does not stop at the first
        res.error = f"{type(err).__name__}: {err}"
    return res


async def run_http(url: str, level: Level) -> tuple[list[RequestResult], float]:
    """One level from this process's event loop: open loop (each request at its arrival time) or
    closed loop."""
    clients = level.concurrency or len(level.specs)
    async with _session(clients) as session:
        model = await _model_name(session, url)
        send = lambda i, spec: _http_one(session, url, model, spec)
        t0 = time.perf_counter()
        if level.concurrency is not None:
            results = await closed_loop(send, level.specs, level.concurrency, level.tickets())
        else:
            results = await open_loop(send, level.specs, range(len(level.specs)), t0)
        return results, time.perf_counter() - t0


async def open_loop(
    send: Callable[[int, RequestSpec], Awaitable[RequestResult]],
    specs: list[RequestSpec],
    indices: Iterable[int],
    t0: float,
) -> list[RequestResult]:
    """Request i of `indices` sent at `t0 + specs[i].arrival_s`; results in the order of `indices`."""

    async def at_arrival(i: int) -> RequestResult:
        await asyncio.sleep(max(0.0, t0 + specs[i].arrival_s - time.perf_counter()))
        result = await send(i, specs[i])
        result.index = i
        return result

    return list(await asyncio.gather(*(at_arrival(i) for i in indices)))


def _client_process(
    url: str,
    spec_dicts: list[dict],
    clients: int,
    level_kw: dict[str, Any],
    counter: Any,
    ready: Any,
    out: Any,
    indices: list[int] | None = None,
) -> None:
    """One client process of a level (spawned): waits at `ready` with its session open, then runs
    its share of a closed loop's clients drawing from the shared `counter`, or sends the open loop's
    requests `indices` at their arrival times; puts back its results as plain dicts (a spawned
    script's classes live in `__mp_main__`, which the parent cannot unpickle) with its start/end times
    and CPU seconds."""
    specs = [RequestSpec(**d) for d in spec_dicts]

    async def go() -> tuple[list[RequestResult], float, float, float]:
        async with _session(clients) as session:
            model = await _model_name(session, url)
            ready.wait(timeout=600)  # the parent's wait; the timeout only frees an orphan
            send = lambda i, spec: _http_one(session, url, model, spec)
            c0, t0 = time.process_time(), time.perf_counter()
            if indices is not None:
                results = await open_loop(send, specs, indices, t0)
            else:
                tickets = Level(specs, concurrency=clients, **level_kw).tickets(counter)
                results = await closed_loop(send, specs, clients, tickets)
            return results, t0, time.perf_counter(), time.process_time() - c0

    try:
        results, t0, t1, cpu = asyncio.run(go())
        out.put(([asdict(r) for r in results], t0, t1, cpu))
    except BaseException as err:
        out.put(f"{type(err).__name__}: {err}")
        ready.abort()  # the parent stops waiting for this process now, not at its timeout
        raise


def http_level(url: str, level: Level, procs: int = 1) -> tuple[list[RequestResult], float, float]:
    """Runs one level; returns (results, wall seconds, the busiest client process's CPU share).
    With `procs` > 1 the level runs in spawned processes: a closed loop's clients share one ticket
    counter, an open loop's requests are dealt round-robin (results come back in the level's order);
    perf_counter is the system's monotonic clock, so their start and end times compare."""
    procs = min(procs, len(level.specs))
    if procs <= 1:
        c0 = time.process_time()
        results, wall = asyncio.run(run_http(url, level))
        return results, wall, (time.process_time() - c0) / wall if wall > 0 else math.nan
    ctx = mp.get_context("spawn")  # never fork a process that runs Ray's threads
    specs = [asdict(s) for s in level.specs]
    counter, out = ctx.Value("q", 0), ctx.Queue()
    if level.concurrency is None:
        deals = [list(range(p, len(specs), procs)) for p in range(procs)]
        jobs = [(len(d), {}, d) for d in deals]
    else:
        kw = {"num_requests": level.num_requests or len(level.specs), "duration_s": level.duration_s}
        jobs = [(n, kw, None) for n in split_clients(level.concurrency, procs)]
    ready = ctx.Barrier(len(jobs) + 1)
    workers = [
        ctx.Process(target=_client_process, args=(url, specs, n, kw, counter, ready, out, d), daemon=True)
        for n, kw, d in jobs
    ]
    for w in workers:
        w.start()
    got: list[Any] = []
    try:
        try:
            ready.wait(timeout=120)
        except threading.BrokenBarrierError:
            try:
                why = out.get(timeout=5)
            except queue.Empty:
                why = "no word from it"
            raise RuntimeError(f"a client process failed to start: {why}") from None
        while len(got) < len(workers):
            try:
                got.append(out.get(timeout=1.0))
            except queue.Empty:
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead and out.empty():
                    raise RuntimeError(f"a client process died (exit codes {dead})") from None
        failed = [g for g in got if isinstance(g, str)]
        if failed:
            raise RuntimeError(f"a client process failed: {failed[0]}")
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
    results = [RequestResult(**d) for dicts, *_ in got for d in dicts]
    if level.concurrency is None:
        results.sort(key=lambda r: r.index)
    wall = max(g[2] for g in got) - min(g[1] for g in got)
    return results, wall, max(g[3] for g in got) / wall if wall > 0 else math.nan


# ---- the in-process engine --------------------------------------------------------------------------
async def run_engine(engine: Any, level: Level, tag: str = "bench") -> tuple[list[RequestResult], float]:
    """The same requests straight into an AsyncEngine in this process: the floor for HTTP."""
    from fuserve.sampling_params import SamplingParams

    async def one(i: int, spec: RequestSpec) -> RequestResult:
        params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
        res = RequestResult(spec.kind, ok=False)
        start, last = time.perf_counter(), None
        try:
            async for out in engine.generate(spec.prompt_ids, params, f"{tag}-{i}"):
                now = time.perf_counter()
                if out.delta_token_ids:  # one per engine step, as the SSE stream has
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                res.output_tokens = len(out.token_ids)
            res.e2e_s = time.perf_counter() - start
            res.ok = res.output_tokens == spec.max_tokens
        except Exception as err:  # as over HTTP: count it, go on
            res.error = f"{type(err).__name__}: {err}"
        return res

    t0 = time.perf_counter()
    if level.concurrency is not None:
        results = await closed_loop(one, level.specs, level.concurrency, level.tickets())
    else:

        async def at_arrival(i: int, spec: RequestSpec) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.perf_counter()))
            return await one(i, spec)

        results = list(await asyncio.gather(*(at_arrival(i, s) for i, s in enumerate(level.specs))))
    return results, time.perf_counter() - t0


# ---- server-side figures: frontend CPU and engine step time -----------------------------------------
def parse_counters(text: str) -> dict[str, float]:
    """SERVER_COUNTERS' values in a Prometheus text exposition, each summed over its label sets (a
    `replica` label per replica). A counter the server does not export, or text that does not parse,
    gives NaN: the benchmark runs against servers that predate these counters."""
    from prometheus_client.parser import text_string_to_metric_families

    by_sample = {name: key for key, name in SERVER_COUNTERS.items()}
    sums = dict.fromkeys(SERVER_COUNTERS, math.nan)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = by_sample.get(sample.name)
                if key is not None:
                    sums[key] = (0.0 if math.isnan(sums[key]) else sums[key]) + float(sample.value)
                elif sample.name in PROCESS_COUNTERS:  # one series per frontend process, kept apart
                    sums[f"{PROCESS_COUNTERS[sample.name]}{sample.labels.get('process', '?')}"] = float(
                        sample.value
                    )
    except Exception:  # a malformed page says nothing reliable about any counter
        return dict.fromkeys(SERVER_COUNTERS, math.nan)
    return sums


def process_shares(
    before: dict[str, float], after: dict[str, float], wall_s: float
) -> dict[str, list[float]]:
    """How a level's requests and frontend CPU fell on the replica's frontend processes: each
    process's share of the requests finished in the level and its share of a core, busiest first.
    One process with most of the requests is HAProxy's connections gathered in it."""

    def per_process(prefix: str) -> dict[str, float]:
        return {k[len(prefix) :]: v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix)}

    done = per_process(PROCESS_COUNTERS["fuserve_frontend_process_requests_total"])
    cpu = per_process(PROCESS_COUNTERS["fuserve_frontend_process_cpu_seconds_total"])
    total = sum(done.values())
    if len(done) < 2 or total <= 0 or wall_s <= 0:
        return {}
    order = sorted(done, key=lambda pid: -done[pid])
    return {
        "frontend_process_request_shares": [round(done[p] / total, 3) for p in order],
        "frontend_process_cpu_utils": [round(cpu.get(p, math.nan) / wall_s, 3) for p in order],
    }


def scrape_counters(url: str) -> dict[str, float]:
    """The served app's counters from GET {url}/metrics. With several replicas behind one URL the
    answer comes from whichever replica the proxy picks, so these figures mean something for one
    replica (as the overhead comparison serves)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            return parse_counters(r.read().decode())
    except Exception:
        return dict.fromkeys(SERVER_COUNTERS, math.nan)


def engine_counters(stats: Any) -> dict[str, float]:
    """The in-process engine's step counters from `AsyncEngine.stats`; the engine has no frontend
    process, and a stats object without the step fields (an older engine) gives NaN."""
    values = dict.fromkeys(SERVER_COUNTERS, math.nan)
    for key, name in ENGINE_STATS_FIELDS.items():
        values[key] = float(getattr(stats, name, math.nan))
    return values


def level_figures(
    before: dict[str, float], after: dict[str, float], output_tokens: int, wall_s: float
) -> dict[str, float]:
    """What one level cost the server: the frontend's CPU ms per output token and its share of a
    core (near 1.0, the frontend's one GIL is the ceiling), the engine's mean step time, and the
    engine core process's share of a core."""
    delta = {k: after.get(k, math.nan) - before.get(k, math.nan) for k in SERVER_COUNTERS}
    ms_each = lambda x, n: x * 1e3 / n if n > 0 else math.nan  # noqa: E731
    parts = {key: ms_each(delta[total], delta[count]) for key, total, count in TTFT_PARTS}
    cpu_s, core_s = delta["frontend_cpu_s"], delta["engine_core_cpu_s"]
    steps, step_s = delta["engine_steps"], delta["engine_step_s"]
    # a step's wall time = the engine's own host work + its wait for the device; a slow host shows in
    # the first, a slow device (or steps with nothing to overlap) in the second
    split = {
        "engine_host_ms_per_step": ms_each(step_s - delta["engine_wait_s"], steps),
        "engine_wait_ms_per_step": ms_each(delta["engine_wait_s"], steps),
        "engine_prefill_step_share": delta["engine_prefill_steps"] / steps if steps > 0 else math.nan,
        "engine_prefill_step_ms": ms_each(delta["engine_prefill_step_s"], delta["engine_prefill_steps"]),
        "engine_decode_step_ms": ms_each(
            step_s - delta["engine_prefill_step_s"], steps - delta["engine_prefill_steps"]
        ),
        # the device's own time a decode-only step (CUDA events), against the step's wall time above,
        # and the loop's period (wall / steps): what a stream's inter-token latency is made of
        "engine_decode_busy_ms": ms_each(
            delta["engine_busy_s"] - delta["engine_prefill_busy_s"], steps - delta["engine_prefill_steps"]
        ),
        "engine_prefill_busy_ms": ms_each(delta["engine_prefill_busy_s"], delta["engine_prefill_steps"]),
        "engine_loop_ms_per_step": ms_each(wall_s, steps),
        "engine_gc_ms_per_step": ms_each(delta["engine_gc_s"], steps),
        "frontend_gc_util": delta["frontend_gc_s"] / wall_s if wall_s > 0 else math.nan,
    }
    return {
        **process_shares(before, after, wall_s),
        "frontend_cpu_ms_per_token": cpu_s * 1e3 / output_tokens if output_tokens > 0 else math.nan,
        "frontend_cpu_util": cpu_s / wall_s if wall_s > 0 else math.nan,
        "engine_steps": steps,
        "engine_step_ms": ms_each(step_s, steps),
        "engine_core_cpu_util": core_s / wall_s if wall_s > 0 else math.nan,
        **split,
        **parts,
    }


# ---- figures ----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def steady_figures(ok: list[RequestResult], first_wave: int) -> dict[str, float]:
    """TTFT and ITL of a closed loop's requests after its first wave. The first `first_wave`
    requests (one per client) are sent in the same instant, a burst whose TTFTs depend on the order
    in which hundreds of simultaneous arrivals meet the engine's steps; the requests after it arrive
    as earlier ones end, which is the steady load that a concurrency level stands for."""
    steady = [r for r in ok if r.index >= first_wave]
    ttft = [r.ttft_s * 1e3 for r in steady if not math.isnan(r.ttft_s)]
    itl = [g * 1e3 for r in steady for g in r.itl_s]
    wave = [r.ttft_s * 1e3 for r in ok if 0 <= r.index < first_wave and not math.isnan(r.ttft_s)]
    return {
        "steady_requests": len(steady),
        "ttft_ms_p50_steady": percentile(ttft, 50),
        "ttft_ms_p99_steady": percentile(ttft, 99),
        "itl_ms_p90_steady": percentile(itl, 90),
        "first_wave_ttft_ms_p50": percentile(wave, 50),
    }


def summarize(
    results: list[RequestResult],
    wall_s: float,
    devices: int,
    device_hour_usd: float,
    first_wave: int | None = None,
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in ok if not math.isnan(r.ttft_s)]
    itl = [g * 1e3 for r in ok for g in r.itl_s]
    out_tokens = sum(r.output_tokens for r in ok)
    tok_s = out_tokens / wall_s if wall_s > 0 else 0.0
    row: dict[str, Any] = {
        "num_requests": len(results),
        "num_failed": len(results) - len(ok),
        "wall_s": wall_s,
        "req_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tok_s": tok_s,
        "usd_per_m_output_tokens": device_hour_usd * devices / 3600 / tok_s * 1e6 if tok_s else math.nan,
    }
    for q in (50, 90, 99):
        row[f"ttft_ms_p{q}"] = percentile(ttft, q)
        row[f"itl_ms_p{q}"] = percentile(itl, q)
    if first_wave:
        row.update(steady_figures(ok, first_wave))
    transit = [r.transit_ms for r in ok if not math.isnan(r.transit_ms)]
    if transit:
        row["transit_ms_p50"], row["transit_ms_p99"] = percentile(transit, 50), percentile(transit, 99)
    parted = [r for r in ok if not math.isnan(r.ttft_parts_ms[2]) and not math.isnan(r.ttft_s)]
    if parted:  # medians per request; "outside": the client's TTFT less the replica's and the transit
        for i, name in enumerate(("admit", "core_first", "replica")):
            row[f"{name}_ms_p50"] = percentile([r.ttft_parts_ms[i] for r in parted], 50)
        outside = [
            1e3 * r.ttft_s - r.ttft_parts_ms[2] - (0.0 if math.isnan(r.transit_ms) else r.transit_ms)
            for r in parted
        ]
        row["outside_ms_p50"], row["outside_ms_p99"] = percentile(outside, 50), percentile(outside, 99)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        row["errors"] = errors[:5]
    return row


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def check_bounds(http: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """Issue 15's bounds for one level, HTTP against the in-process engine on the same requests, as
    flat fields for the HTTP row: each limit, whether it held, and HTTP/engine ratios. A NaN figure
    fails its bound, and so does a failed request on either side (the figures then cover different
    work)."""
    out: dict[str, Any] = {
        "itl_ms_p90_limit": ITL_P90_FACTOR * engine["itl_ms_p90"] + ITL_P90_SLACK_MS,
        "ttft_ms_p50_limit": engine["ttft_ms_p50"] + TTFT_P50_SLACK_MS,
        "output_tok_s_limit": TOK_S_FLOOR * engine["output_tok_s"],
    }
    out["itl_p90_ok"] = bool(http["itl_ms_p90"] <= out["itl_ms_p90_limit"])
    out["ttft_p50_ok"] = bool(http["ttft_ms_p50"] <= out["ttft_ms_p50_limit"])
    out["output_tok_s_ok"] = bool(http["output_tok_s"] >= out["output_tok_s_limit"])
    keys = ("itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "ttft_ms_p50", "ttft_ms_p99", "output_tok_s")
    for k in (*keys, "engine_step_ms"):
        out[f"{k}_vs_engine"] = _ratio(http.get(k, math.nan), engine.get(k, math.nan))
    no_failures = http.get("num_failed", 0) == 0 and engine.get("num_failed", 0) == 0
    out["bounds_ok"] = out["itl_p90_ok"] and out["ttft_p50_ok"] and out["output_tok_s_ok"] and no_failures
    if "ttft_ms_p50_steady" in http and "ttft_ms_p50_steady" in engine:  # closed loop: after the first wave
        out["ttft_p50_steady_ok"] = bool(
            http["ttft_ms_p50_steady"] <= engine["ttft_ms_p50_steady"] + TTFT_P50_SLACK_MS
        )
        out["itl_p90_steady_ok"] = bool(
            http["itl_ms_p90_steady"] <= ITL_P90_FACTOR * engine["itl_ms_p90_steady"] + ITL_P90_SLACK_MS
        )
        out["bounds_ok_steady"] = (
            out["ttft_p50_steady_ok"] and out["itl_p90_steady_ok"] and out["output_tok_s_ok"] and no_failures
        )
    return out


def _load_key(row: dict[str, Any]) -> tuple[str, Any]:
    """Which load a row measured: ("concurrency", N) or ("rate", r)."""
    if row.get("concurrency") is not None:
        return ("concurrency", float(row["concurrency"]))
    return ("rate", row.get("rate"))


def overhead_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(HTTP row, engine row) of the overhead comparison at each load both sides ran."""
    engine = {_load_key(r): r for r in rows if r.get("comparison") == "overhead" and r["path"] == "engine"}
    return [
        (r, engine[_load_key(r)])
        for r in rows
        if r.get("comparison") == "overhead" and r["path"] == "http" and _load_key(r) in engine
    ]


# ---- the comparisons --------------------------------------------------------------------------------
def _serve_app(config: Any, name: str, port: int) -> str:
    from ray import serve

    from fuserve.cluster import build_app

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}"


def scrape_step_cost(url: str) -> Any:
    """The step cost a replica's engine fitted from its own steps (router/ttft_model.StepCost), from
    GET {url}/metrics (whichever replica answers: they run on the same kind of device); None when the
    server does not export it."""
    from prometheus_client.parser import text_string_to_metric_families

    from fuserve.router.ttft_model import StepCost

    names = {
        "fuserve_engine_step_base_seconds": "base_s",
        "fuserve_engine_step_per_decode_seconds": "per_seq_s",
        "fuserve_engine_step_per_prefill_token_seconds": "per_token_s",
    }
    found: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            for family in text_string_to_metric_families(r.read().decode()):
                for sample in family.samples:
                    if sample.name in names:
                        found.setdefault(names[sample.name], float(sample.value))
    except Exception:
        return None
    return StepCost(**found) if len(found) == 3 and found["base_s"] > 0 else None


def simulated(
    specs: list[RequestSpec],
    router: str,
    cost: Any,
    config: Any,
    replicas: int,
    path: PathLatency | None = None,
    measured: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The simulator's prediction for one measured row: the same requests, the same router, replicas
    with the measured step cost, the served scheduler settings and, on a GPU, async scheduling
    (benchmarks/route_sim.py); `path`, the serving path's own part of a TTFT and the lone prefill
    step, from `path_latency`; `measured`, the row so far: its routing call's mean cost and transit
    p50 (route_replay.py reads the same fields back from the results file)."""
    import route_sim
    import torch

    if cost is None or route_sim.split_router(router)[0] not in route_sim.ROUTER_CLASSES:
        return {}
    path = path or PathLatency(0.0, 0.0)
    measured = measured or {}
    on_gpu = torch.cuda.is_available() and config.model.device != "cpu"
    async_on = config.scheduler.async_scheduling == "on" or (
        config.scheduler.async_scheduling == "auto" and on_gpu
    )
    transit_ms = measured.get("transit_ms_p50", 0.0)
    cfg = route_sim.SimConfig(
        num_replicas=replicas,
        cost=cost,
        scheduler=config.scheduler,
        async_scheduling=async_on,
        path_s=path.path_s,
        router_call_s=measured.get("router_request_mean_ms", 0.0) / 1e3,
        transit_s=transit_ms / 1e3 if math.isfinite(transit_ms) else 0.0,
        # no eager floor: the served configs graph steps with prefill up to 2,048 tokens (the lone
        # request's first-token time, recorded as lone_step_ms, overstated every loaded step)
        mixed_step_s=0.0,
    )
    sim = route_sim.summarize(route_sim.simulate(specs, router, cfg))
    return {
        "sim_ttft_ms_p50": sim["ttft_ms_p50"],
        "sim_ttft_ms_p90": sim["ttft_ms_p90"],
        "sim_ttft_ms_p99": sim["ttft_ms_p99"],
        "sim_itl_ms_p90": sim["itl_ms_p90"],
        "sim_output_tok_s": sim["output_tok_s"],
        "step_cost": [cost.base_s, cost.per_seq_s, cost.per_token_s],
        "sim_path_ms": path.path_s * 1e3,
        "sim_mixed_step_ms": 0.0,
        "lone_step_ms": path.lone_step_s * 1e3,
        "sim_async_scheduling": async_on,
        "sim_scheduler": config.scheduler.model_dump(),
    }


ROUTER_SUMS = {
    "fuserve_router_request_seconds": "router_request",
    "fuserve_router_choose_seconds": "router_choose",
    "fuserve_router_ranking_seconds": "router_ranking",
}


def router_seconds(app: str) -> dict[str, float]:
    """The HAProxy router replica's routing histograms (sum and count per kind) through a handle; {}
    behind the Python proxy or when the replica cannot be reached."""
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    from fuserve.cluster.ingress_routing import ROUTER_NAME

    try:
        text = serve.get_deployment_handle(ROUTER_NAME, app).routing_metrics.remote().result(timeout_s=10)
    except Exception:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            for metric, key in ROUTER_SUMS.items():
                if sample.name == f"{metric}_sum":
                    found[f"{key}_s"] = sample.value
                elif sample.name == f"{metric}_count":
                    found[f"{key}_n"] = sample.value
    return found


def router_cost_fields(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per row: the routing calls' total seconds and mean ms in the router replica (issue 16: is its
    cost what separates length-aware from pow2 in a burst?)."""
    fields = {}
    for key in ROUTER_SUMS.values():
        n = after.get(f"{key}_n", 0.0) - before.get(f"{key}_n", 0.0)
        if n > 0:
            total = after[f"{key}_s"] - before.get(f"{key}_s", 0.0)
            fields[f"{key}_total_s"] = total
            fields[f"{key}_mean_ms"] = total / n * 1e3
    return fields


@dataclass(frozen=True)
class PathLatency:
    """The serving path's own part of a TTFT, and the step that computes a lone request's prefill (the
    engine core's hand-off to first token on an idle replica; once the simulator's floor for a step with
    prefill, when such steps ran eagerly)."""

    path_s: float
    lone_step_s: float


def path_latency(url: str, specs: list[RequestSpec], cost: Any) -> PathLatency:
    """Lone requests on idle replicas: their median TTFT less the engine core's first-token time
    (`fuserve_engine_core_first_token_seconds`, hand-off to first token: one prefill step) is the path
    (HAProxy and its router, the frontend, SSE); that first-token time is the lone prefill step. A
    server without the histogram: TTFT less the fitted line's step, and no floor (as before)."""
    if cost is None or not specs:
        return PathLatency(0.0, 0.0)
    before = scrape_counters(url)
    results, _, _ = http_level(url, Level(specs, concurrency=1, num_requests=len(specs)))
    after = scrape_counters(url)
    n = after["core_first_n"] - before["core_first_n"]
    step_s = (after["core_first_s"] - before["core_first_s"]) / n if 0 < n <= len(specs) else math.nan
    if not 0 < step_s < 1.0:  # the two scrapes may reach different replicas: then no figure at all
        step_s = math.nan
    pairs = [(r, spec) for r, spec in zip(results, specs, strict=True) if r.ok]
    if not pairs:
        return PathLatency(0.0, 0.0)
    if math.isfinite(step_s):
        ttft = sorted(r.ttft_s for r, _ in pairs)
        return PathLatency(max(ttft[len(ttft) // 2] - step_s, 0.0), step_s)
    lone = sorted(r.ttft_s - cost.step_s(len(spec.prompt_ids), 0) for r, spec in pairs)
    return PathLatency(max(lone[len(lone) // 2], 0.0), 0.0)


def replay_fields(specs: list[RequestSpec], results: list[RequestResult], args: argparse.Namespace) -> dict:
    """What `route_sim.py --replay` needs to regenerate the row's requests, and each request's
    measured TTFT and transit in the workload's order (to pair with the simulated ones)."""
    replicas = sorted({r.replica for r in results})
    return {
        "seed": args.seed,
        "think_s": [float(x) for x in args.think_s.split(",")],
        "sim_vocab": getattr(args, "sim_vocab", None),
        "sim_max_model_len": getattr(args, "sim_max_model_len", None),
        "sim_first_workload": args.workloads.split(",")[0],
        "ttft_ms_each": [round(r.ttft_s * 1e3, 2) if r.ok else None for r in results],
        "transit_ms_each": [None if math.isnan(r.transit_ms) else round(r.transit_ms, 2) for r in results],
        # which replica (its index in `replicas_each`) and the TTFT's parts inside it (admission, engine
        # core, arrival to response): a slow request placed badly and one caught in a stall look alike
        "replicas_each": replicas,
        "replica_each": [replicas.index(r.replica) for r in results],
        "ttft_parts_ms_each": [
            None if math.isnan(r.ttft_parts_ms[0]) else [round(x, 1) for x in r.ttft_parts_ms]
            for r in results
        ],
    }


def client_gc_fields(pauses: GcPauses) -> dict[str, float]:
    return {
        "client_gc_ms_total": round(pauses.seconds * 1e3, 2),
        "client_gc_ms_max": round(pauses.longest_s * 1e3, 2),
        "client_gc_count": pauses.count,
    }


def compare_routers(
    config: Any,
    make: Callable[[str, float], list[RequestSpec]],
    names: list[str],
    rates: list[float],
    port: int,
    args: argparse.Namespace,
) -> list[dict]:
    """Each router serves every workload at every rate on 2 fresh replicas; with `--load`, the finite
    rate of each workload is that fraction of the requests/s the first router completed in the burst
    (run first), so every router gets the same requests. Each row carries the simulator's prediction."""
    import route_sim
    from ray import serve

    rows = []
    saturation: dict[str, float] = {}
    order = sorted(rates, key=lambda r: not math.isinf(r)) if args.load else rates
    # The open-loop clients run in this process, which holds Ray, Serve and every workload: a full
    # collection here (~75 ms on the CPU box) froze their event loop and put ~250 ms of client stall into
    # measured TTFTs (two H200s, 2026-11-28). So its start-up heap is frozen out of collections, and every
    # row says how long the client spent collecting.
    quiet_gc()
    for router in args.routers.split(","):
        cfg = config.model_copy(deep=True)
        cfg.serve.num_replicas = 2
        cfg.serve.router, cfg.serve.prefix_affinity_imbalance = route_sim.split_router(router)
        app = f"bench_{router.replace('@', '_at_')}"
        url = _serve_app(cfg, app, port)
        first = make(names[0], math.inf)
        http_level(url, Level(first[: min(4, len(first))], rate=math.inf))  # warm-up: first-call costs
        path = path_latency(url, first[:9], scrape_step_cost(url))
        for name in names:
            for rate in order:
                if args.load and not math.isinf(rate):
                    rate = args.load * saturation[name]
                specs = make(name, rate)
                before = router_seconds(app)
                take_gc_pauses()
                procs = open_loop_procs(rate, specs, args)
                results, wall, _ = http_level(url, Level(specs, rate=rate), procs)
                gc_figures = client_gc_fields(take_gc_pauses())
                row = {"comparison": "router", "router": router, "path": "http", "replicas": 2, "rate": rate}
                row["client_procs"] = procs
                row.update(router_cost_fields(before, router_seconds(app)), **gc_figures)
                row.update(workload=name, **summarize(results, wall, 2, args.device_hour_usd))
                if math.isinf(rate) and name not in saturation:
                    saturation[name] = sum(r.ok for r in results) / wall
                    row["saturation_rate"] = saturation[name]
                placed: dict[str, dict[str, int]] = {}
                for r in results:
                    placed.setdefault(r.replica, {}).setdefault(r.kind, 0)
                    placed[r.replica][r.kind] += 1
                row["placement"] = placed
                row.update(replay_fields(specs, results, args))
                row.update(simulated(specs, router, scrape_step_cost(url), cfg, 2, path, row))
                rows.append(row)
                print(
                    f"  router {router:15s} {name:10s} at {rate:.2f} req/s: {row['output_tok_s']:.1f} tok/s, "
                    f"TTFT p50/p99 {row['ttft_ms_p50']:.0f}/{row['ttft_ms_p99']:.0f} ms"
                    + (
                        f" (simulated {row['sim_ttft_ms_p50']:.0f}/{row['sim_ttft_ms_p99']:.0f})"
                        if "sim_ttft_ms_p99" in row
                        else ""
                    )
                    + (
                        f", routing calls {row['router_request_total_s'] * 1e3:.0f} ms in all"
                        if "router_request_total_s" in row
                        else ""
                    )
                    + (
                        f", transit p50/p99 {row['transit_ms_p50']:.1f}/{row['transit_ms_p99']:.1f} ms"
                        if "transit_ms_p50" in row
                        else ""
                    )
                    + f", client GC {row['client_gc_count']} x, longest {row['client_gc_ms_max']:.0f} ms"
                )
        serve.delete(app)
    gc.unfreeze()  # a frozen heap is never freed at exit, which nanobind's modules report as leaks
    if args.engine_baseline:
        rows += engine_baseline(config, {rate: make(names[0], rate) for rate in rates}, args)
    return rows


def engine_baseline(
    config: Any, workloads: dict[float, list[RequestSpec]], args: argparse.Namespace
) -> list[dict]:
    """The same workloads into one in-process engine (one device): what 2 replicas are measured
    against (issue 15: a burst on 2 replicas must deliver >= 1.8x one engine's throughput)."""
    from fuserve.workers.async_engine import AsyncEngine

    wait_for_device_memory()
    engine = AsyncEngine(config)
    quiet_gc()

    async def each() -> list[tuple[float, list[RequestResult], float]]:
        first = next(iter(workloads.values()))
        await run_engine(engine, Level(first[: min(4, len(first))], rate=math.inf), "warmup")
        done = []
        for rate, specs in workloads.items():
            results, wall = await run_engine(engine, Level(specs, rate=rate), f"rate{rate}")
            done.append((rate, results, wall))
        return done

    try:
        measured = asyncio.run(each())
    finally:
        engine.shutdown()
    rows = []
    for rate, results, wall in measured:
        row = {"comparison": "router", "router": "none", "path": "engine", "replicas": 1, "rate": rate}
        row.update(summarize(results, wall, 1, args.device_hour_usd))
        rows.append(row)
        print(f"  in-process engine at {rate} req/s: {row['output_tok_s']:.1f} tok/s")
    return rows


def _describe(row: dict[str, Any]) -> str:
    load = f"concurrency {row['concurrency']}" if "concurrency" in row else f"{row['rate']} req/s"
    return (
        f"  {row['path']:6s} at {load}: {row['output_tok_s']:.1f} tok/s, ITL p90 {row['itl_ms_p90']:.2f} ms, "
        f"TTFT p50 {row['ttft_ms_p50']:.1f} ms, step {row['engine_step_ms']:.2f} ms, "
        f"{row['num_failed']} failed"
    )


def http_levels(
    url: str, levels: list[Level], args: argparse.Namespace, base: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every level against one served URL, with the replica's counters read around each level."""
    rows = []
    for level in levels:
        procs = 1
        if level.concurrency is not None:
            procs = args.client_procs or auto_client_procs(level.concurrency)
        before = scrape_counters(url)
        results, wall, client_util = http_level(url, level, procs)
        after = scrape_counters(url)
        summary = summarize(results, wall, 1, args.device_hour_usd, level.concurrency)
        row = {**base, **level.tags(), **summary}
        row.update(level_figures(before, after, row["output_tokens"], wall))
        row.update(client_procs=procs, client_cpu_util=client_util)
        rows.append(row)
        print(_describe(row))
    return rows


def wait_for_device_memory(max_used_fraction: float = 0.05, timeout_s: float = 120.0) -> None:
    """serve.delete returns once Serve has let the replica go, which can be before its processes (the
    engine core) have exited and given the GPU memory back. The in-process engine sizes its KV cache
    from what other processes leave free, so a lingering replica would shrink it (or fail its start)
    and the comparison would no longer be like for like: wait until the device is nearly empty."""
    import torch

    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        free, total = torch.cuda.mem_get_info()
        if total - free <= max_used_fraction * total:
            return
        if time.monotonic() > deadline:
            print(
                f"  warning: {(total - free) / 2**30:.1f} GiB of the device still in use {timeout_s:.0f} s "
                "after the app was deleted; the in-process engine gets a smaller KV cache"
            )
            return
        time.sleep(1.0)


def compare_overhead(
    config: Any, levels: list[Level], warmup: Level, port: int, args: argparse.Namespace
) -> list[dict]:
    """Every level through HTTP on one fresh replica, then (after the app is deleted, freeing the
    device memory) every level into one in-process AsyncEngine: each side starts once."""
    import torch
    from ray import serve

    from fuserve.workers.async_engine import AsyncEngine

    cfg = config.model_copy(deep=True)
    cfg.serve.num_replicas = 1
    url = _serve_app(cfg, "bench_overhead", port)
    try:
        http_level(url, warmup, args.client_procs or 1)
        rows = http_levels(url, levels, args, {"comparison": "overhead", "path": "http", "replicas": 1})
    finally:
        serve.delete("bench_overhead")

    wait_for_device_memory()
    # The replica ran with one torch thread per CPU it was given; the in-process engine does too.
    torch.set_num_threads(max(1, int(cfg.serve.num_cpus_per_replica)))
    engine = AsyncEngine(cfg)
    quiet_gc()  # as the replica's engine core and frontend do: the comparison stays like for like

    async def all_levels() -> list[tuple[list[RequestResult], float, dict[str, float], dict[str, float]]]:
        await run_engine(engine, warmup, "warmup")
        done = []
        for i, level in enumerate(levels):
            before = engine_counters(engine.stats)
            results, wall = await run_engine(engine, level, f"level{i}")
            done.append((results, wall, before, engine_counters(engine.stats)))
            print(f"  engine level {i + 1}/{len(levels)} done")
        return done

    try:
        measured = asyncio.run(all_levels())
    finally:
        engine.shutdown()
    for level, (results, wall, before, after) in zip(levels, measured, strict=True):
        row = {"comparison": "overhead", "path": "engine", "replicas": 1, **level.tags()}
        row.update(summarize(results, wall, 1, args.device_hour_usd, level.concurrency))
        row.update(level_figures(before, after, row["output_tokens"], wall))
        rows.append(row)
        print(_describe(row))
    return rows


# ---- output -----------------------------------------------------------------------------------------
def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


TABLE_COLUMNS = [
    "comparison", "router", "path", "rate", "concurrency", "req_s", "output_tok_s",
    "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90", "itl_ms_p99",
    "engine_step_ms", "frontend_cpu_ms_per_token", "num_failed",
]  # fmt: skip


def _fmt(value: Any, width: int) -> str:
    return (
        f"{value:{width}.2f}" if isinstance(value, float) else f"{'' if value is None else value!s:>{width}s}"
    )


def bounds_line(http: dict[str, Any], engine: dict[str, Any]) -> str:
    """One level of the serving-path comparison in words, with issue 15's verdict."""
    b = check_bounds(http, engine)
    load = f"concurrency {http['concurrency']}" if "concurrency" in http else f"{http['rate']} req/s"
    ok = lambda flag: "ok" if flag else "OVER"
    itl = "/".join(f"{http[f'itl_ms_p{q}']:.2f}" for q in (50, 90, 99))
    itl_e = "/".join(f"{engine[f'itl_ms_p{q}']:.2f}" for q in (50, 90, 99))
    return (
        f"{load}: {'PASS' if b['bounds_ok'] else 'FAIL'}\n"
        f"    ITL p50/p90/p99 {itl} vs {itl_e} ms (p90 {b['itl_ms_p90_vs_engine']:.2f}x, "
        f"limit {b['itl_ms_p90_limit']:.2f}: {ok(b['itl_p90_ok'])})\n"
        f"    TTFT p50/p99 {http['ttft_ms_p50']:.1f}/{http['ttft_ms_p99']:.1f} vs "
        f"{engine['ttft_ms_p50']:.1f}/{engine['ttft_ms_p99']:.1f} ms "
        f"(p50 limit {b['ttft_ms_p50_limit']:.1f}: {ok(b['ttft_p50_ok'])})\n"
        f"    output {http['output_tok_s']:.1f} vs {engine['output_tok_s']:.1f} tok/s "
        f"({b['output_tok_s_vs_engine']:.2f}x, floor {TOK_S_FLOOR}x: {ok(b['output_tok_s_ok'])}); "
        f"failed {http['num_failed']} + {engine['num_failed']}\n"
        f"    engine step {http.get('engine_step_ms', math.nan):.2f} ms under HTTP vs "
        f"{engine.get('engine_step_ms', math.nan):.2f} ms in-process ({b['engine_step_ms_vs_engine']:.2f}x); "
        f"frontend CPU {http.get('frontend_cpu_ms_per_token', math.nan):.3f} ms/token "
        f"({http.get('frontend_cpu_util', math.nan):.2f} of a core); engine core "
        f"{http.get('engine_core_cpu_util', math.nan):.2f} of a core; busiest client process "
        f"{http.get('client_cpu_util', math.nan):.2f} of a core\n"
        f"    inside the replica, mean ms: admit {http.get('frontend_admit_ms', math.nan):.2f}, engine core "
        f"to first token {http.get('core_first_token_ms', math.nan):.1f}, step message to stream "
        f"{http.get('frontend_emit_ms', math.nan):.2f}\n"
        f"    TTFT p50 parts ms: transit {http.get('transit_ms_p50', math.nan):.1f}, admit "
        f"{http.get('admit_ms_p50', math.nan):.2f}, engine core "
        f"{http.get('core_first_ms_p50', math.nan):.1f}, "
        f"arrival to response {http.get('replica_ms_p50', math.nan):.1f}; outside the replica "
        f"{http.get('outside_ms_p50', math.nan):.1f} (p99 {http.get('outside_ms_p99', math.nan):.1f})\n"
        f"    engine step = host + device wait ms: {_split(http)} under HTTP, {_split(engine)} in-process"
        + _gc(http, engine)
        + _processes_line(http)
        + _steady_line(http, engine, b)
    )


def _processes_line(http: dict[str, Any]) -> str:
    """With several frontend processes: how the level's requests and CPU fell on them, busiest first."""
    shares = http.get("frontend_process_request_shares")
    if not shares:
        return ""
    utils = http.get("frontend_process_cpu_utils", [])
    return (
        "\n    frontend processes, busiest first: requests "
        + "/".join(f"{x:.0%}" for x in shares)
        + ", CPU "
        + "/".join(f"{x:.2f}" for x in utils)
        + " of a core"
    )


def _steady_line(http: dict[str, Any], engine: dict[str, Any], b: dict[str, Any]) -> str:
    """The same bounds over the requests after a closed loop's first wave (`steady_figures`)."""
    if "bounds_ok_steady" not in b:
        return ""
    ok = lambda flag: "ok" if flag else "OVER"
    return (
        f"\n    after the first wave ({http['steady_requests']} requests): "
        f"{'PASS' if b['bounds_ok_steady'] else 'FAIL'}; TTFT p50/p99 "
        f"{http['ttft_ms_p50_steady']:.1f}/{http['ttft_ms_p99_steady']:.1f} vs "
        f"{engine['ttft_ms_p50_steady']:.1f}/{engine['ttft_ms_p99_steady']:.1f} ms "
        f"({ok(b['ttft_p50_steady_ok'])}); ITL p90 {http['itl_ms_p90_steady']:.2f} vs "
        f"{engine['itl_ms_p90_steady']:.2f} ms ({ok(b['itl_p90_steady_ok'])}); first wave TTFT p50 "
        f"{http['first_wave_ttft_ms_p50']:.1f} vs {engine['first_wave_ttft_ms_p50']:.1f} ms"
    )


def _gc(http: dict[str, Any], engine: dict[str, Any]) -> str:
    """Python's garbage collector in each process (gc_tuning.py)."""
    return (
        f"; collector ms a step: engine core {http.get('engine_gc_ms_per_step', math.nan):.2f}, in-process "
        f"{engine.get('engine_gc_ms_per_step', math.nan):.2f}; frontend "
        f"{http.get('frontend_gc_util', math.nan):.3f} of a core"
    )


def _split(row: dict[str, Any]) -> str:
    g = lambda k: row.get(k, math.nan)  # noqa: E731
    return (
        f"{g('engine_host_ms_per_step'):.2f} + {g('engine_wait_ms_per_step'):.2f} "
        f"({100 * g('engine_prefill_step_share'):.0f}% of steps with prefill, "
        f"{g('engine_prefill_step_ms'):.1f} ms, device {g('engine_prefill_busy_ms'):.1f}; decode-only "
        f"{g('engine_decode_step_ms'):.1f} ms, device {g('engine_decode_busy_ms'):.2f}; a loop "
        f"{g('engine_loop_ms_per_step'):.2f} ms)"
    )


def _case(row: dict[str, Any]) -> tuple[str, float]:
    """A router row's workload and load: rows of one case compare routers on the same requests."""
    return row.get("workload", "mix"), row.get("rate", math.nan)


def _case_name(case: tuple[str, float]) -> str:
    workload, rate = case
    return f"{workload} {'burst' if math.isinf(rate) else f'at {rate:.3g} req/s'}"


def print_table(rows: list[dict]) -> None:
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    widths = [max(9, len(c)) for c in cols]
    print(" ".join(f"{c:>{w}s}" for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print(" ".join(_fmt(r.get(c), w) for c, w in zip(cols, widths, strict=True)))
    by = {(r["comparison"], r.get("router", r.get("path")), _case(r)): r for r in rows}
    for case in sorted({_case(r) for r in rows if r["comparison"] == "router"}):
        la, p2 = by.get(("router", "length_aware", case)), by.get(("router", "pow2", case))
        one = by.get(("router", "none", case))  # the in-process engine (--engine-baseline)
        if one is not None:
            for r in (la, p2):
                if r is not None:
                    print(
                        f"{r['router']} on {r['replicas']} replicas vs one in-process engine, "
                        f"{_case_name(case)}: "
                        f"{r['output_tok_s']:.1f} vs {one['output_tok_s']:.1f} tok/s "
                        f"({_ratio(r['output_tok_s'], one['output_tok_s']):.2f}x)"
                    )
        for other in ("pow2", "prefix_affinity"):
            base = by.get(("router", other, case))
            if la is None or base is None:
                continue
            ttft, tput = (la["ttft_ms_p99"], base["ttft_ms_p99"]), (la["output_tok_s"], base["output_tok_s"])
            print(
                f"length-aware vs {other}, {_case_name(case)}: TTFT p99 {ttft[0]:.0f} vs {ttft[1]:.0f} ms "
                f"({_ratio(ttft[1], ttft[0]):.2f}x), throughput {tput[0]:.1f} vs {tput[1]:.1f} tok/s "
                f"({_ratio(tput[0], tput[1]):.2f}x)"
            )
    pairs = overhead_pairs(rows)
    if pairs:
        print("serving path (HTTP) vs the in-process engine, issue 15's bounds:")
        for http, engine in pairs:
            print("  " + bounds_line(http, engine))


@dataclass
class Panel:
    """One subplot: grouped bars, one group per category (a rate, a concurrency, a figure's name),
    one bar per series; `limit` marks issue 15's bound for the HTTP bar of each category."""

    title: str
    categories: list[str]
    series: dict[str, list[float]]
    limit: list[float] | None = None


def _finite(values: list[float]) -> bool:
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def select_panels(rows: list[dict[str, Any]]) -> list[Panel]:
    """The panels that have data: router panels only with router rows, the open-loop overhead panel
    only with open-loop overhead rows, and the closed-loop panels (against concurrency) only for
    the figures some closed-loop row holds (engine step and frontend CPU need server counters).
    Series without a finite value are left out, and so is a panel left without series."""
    panels = []
    routers = [r for r in rows if r["comparison"] == "router"]
    if routers:
        cases = sorted({_case(r) for r in routers})
        several = len({w for w, _ in cases}) > 1
        labels = [_case_name(c) if several else f"{c[1]:g} req/s" for c in cases]
        for key, title in [
            ("ttft_ms_p99", "2 replicas: TTFT p99 (ms, lower is better)"),
            ("output_tok_s", "2 replicas: output tokens/s (higher is better)"),
        ]:
            series = {}
            for router in ("length_aware", "pow2", "prefix_affinity"):
                mine = {_case(r): r for r in routers if r["router"] == router}
                if mine:
                    series[router] = [mine[c][key] if c in mine else math.nan for c in cases]
            panels.append(Panel(title, labels, series))
    open_loop = [r for r in rows if r["comparison"] == "overhead" and r.get("concurrency") is None]
    if open_loop:
        keys = ["ttft_ms_p50", "ttft_ms_p90", "itl_ms_p50", "itl_ms_p90"]
        several = len({r.get("rate") for r in open_loop}) > 1
        series = {
            (f"{r['path']} {r.get('rate'):g} req/s" if several else r["path"]): [
                r.get(k, math.nan) for k in keys
            ]
            for r in open_loop
        }
        panels.append(
            Panel("serving path vs engine (ms)", ["TTFT p50", "TTFT p90", "ITL p50", "ITL p90"], series)
        )
    closed = [r for r in rows if r.get("concurrency") is not None]
    if closed:
        levels = sorted({int(r["concurrency"]) for r in closed})
        cats = [str(n) for n in levels]
        by = {(r["path"], int(r["concurrency"])): r for r in closed}
        engine = [by.get(("engine", n), {}) for n in levels]

        def line(path: str, key: str) -> list[float]:
            return [by.get((path, n), {}).get(key, math.nan) for n in levels]

        def limits(fn: Callable[[dict[str, Any]], float]) -> list[float] | None:
            values = [fn(e) if e else math.nan for e in engine]
            return values if _finite(values) else None

        specs: list[tuple[str, str, Callable[[dict[str, Any]], float] | None]] = [
            ("itl_ms_p90", "ITL p90 (ms) by concurrency",
             lambda e: ITL_P90_FACTOR * e["itl_ms_p90"] + ITL_P90_SLACK_MS),
            ("ttft_ms_p50", "TTFT p50 (ms) by concurrency", lambda e: e["ttft_ms_p50"] + TTFT_P50_SLACK_MS),
            ("output_tok_s", "output tokens/s by concurrency", lambda e: TOK_S_FLOOR * e["output_tok_s"]),
            ("itl_ms_p99", "ITL p99 (ms) by concurrency", None),
            ("ttft_ms_p99", "TTFT p99 (ms) by concurrency", None),
            ("engine_step_ms", "engine step (ms): under HTTP load vs in-process", None),
            ("frontend_cpu_ms_per_token", "frontend CPU ms per output token", None),
        ]  # fmt: skip
        for key, title, bound in specs:
            series = {p: line(p, key) for p in ("http", "engine")}
            series = {p: v for p, v in series.items() if _finite(v)}
            if series:
                panels.append(
                    Panel(title, cats, series, limits(bound) if bound and "http" in series else None)
                )
    return panels


def plot(rows: list[dict], path: Path) -> bool:
    """Draws select_panels(rows), three to a row; False when matplotlib is missing or nothing to draw."""
    panels = select_panels(rows)
    if not panels:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.8 * nrows), squeeze=False)
    colors = {"http": "tab:orange", "engine": "tab:green", "length_aware": "tab:blue", "pow2": "tab:gray"}
    for ax, panel in zip(axes.flat, panels, strict=False):
        width = 0.8 / len(panel.series)
        for i, (label, values) in enumerate(panel.series.items()):
            xs = [j + i * width for j in range(len(panel.categories))]
            ax.bar(xs, values, width, label=label, color=colors.get(label))
        centers = [j + 0.4 - width / 2 for j in range(len(panel.categories))]
        if panel.limit and "http" in panel.series:  # a line across each HTTP bar at its bound
            i = list(panel.series).index("http")
            xs = [j + i * width for j in range(len(panel.categories))]
            lo, hi = [x - width / 2 for x in xs], [x + width / 2 for x in xs]
            ax.hlines(panel.limit, lo, hi, colors="black", linewidth=2, label="bound for http", zorder=3)
        ax.set_xticks(centers, panel.categories)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # headroom: the legend sits above the bars
        ax.legend(fontsize=8, loc="upper left", ncol=3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    meta = rows[0]
    fig.suptitle(f"fuserve serving, {meta['model']} on {meta['device']}, {meta['date']} ({meta['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _concurrencies(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels are positive integers, e.g. 16,64,128,256")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fuserve bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="deployment YAML (default: the embedded SmolLM2 config)")
    p.add_argument("--url", default=None, help="load this running server instead of starting one")
    p.add_argument("--compare", choices=["all", "routers", "overhead", "none"], default="all")
    p.add_argument(
        "--num-requests",
        type=int,
        default=48,
        help="open loop: requests per rate; closed loop: requests per concurrency level",
    )
    p.add_argument(
        "--rate",
        default="1.5,inf",
        help="request rates to compare the routers at, comma-separated requests/s; inf sends all at once",
    )
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument(
        "--routers",
        default="length_aware,pow2",
        help="the routers `routers` compares: length_aware, pow2, prefix_affinity, prefix_affinity@N "
        "(serve.prefix_affinity_imbalance N)",
    )
    p.add_argument(
        "--think-s",
        default="2,6",
        help="multi_turn: seconds between a conversation's turns, LOW,HIGH. With 2-6 s a few hundred "
        "requests spread over ~30 s whatever the rate, so `--load 0.8` runs near 16%% of saturation",
    )
    p.add_argument(
        "--workloads",
        default="mix",
        help=f"routers: the workloads, comma-separated, of {', '.join(WORKLOADS)} (benchmarks/workloads.py)",
    )
    p.add_argument(
        "--load",
        type=float,
        default=None,
        help="routers: run each workload in a burst first, then at this fraction of the requests/s the "
        "first router completed in it (instead of the finite --rate values), e.g. 0.8",
    )
    p.add_argument(
        "--load-requests",
        type=int,
        default=None,
        help="routers: requests per workload at the --load rate (default: --num-requests); at 300 a "
        "row's TTFT p99 is its 3rd-4th slowest request, which one stall decides",
    )
    p.add_argument(
        "--engine-baseline",
        action="store_true",
        help="routers: also run each workload in one in-process engine (the 2-replica scaling baseline)",
    )
    p.add_argument("--scale", type=float, default=0.5, help="multiply all prompt/output lengths (CPU: 0.5)")
    p.add_argument(
        "--overhead-rate",
        type=float,
        default=1.0,
        help="requests/s for the open-loop HTTP-vs-engine comparison, which leaves out long documents "
        "so that inter-token gaps measure the serving path, not prefill stalls",
    )
    p.add_argument("--overhead-requests", type=int, default=None, help="default: half of --num-requests")
    p.add_argument(
        "--concurrency",
        type=_concurrencies,
        default=None,
        help="closed-loop levels, e.g. 16,64,128,256: N clients each send their next request when the "
        "last ends; replaces --overhead-rate in the overhead comparison and --rate with --url (routers "
        "keep --rate)",
    )
    p.add_argument(
        "--requests-per-client",
        type=int,
        default=None,
        help="closed loop: send this many x N requests at concurrency N (instead of --num-requests)",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="closed loop: run each level this many seconds instead"
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="closed loops and bursts: spread the HTTP clients over this many processes (0: one per 64 "
        "clients or burst requests, at most a quarter of the CPUs; open loops at a finite rate keep one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-hour-usd", type=float, default=2.0, help="price of one device (GPU) for an hour")
    p.add_argument(
        "--check-bounds",
        action="store_true",
        help="exit 3 when a level of the overhead comparison misses issue 15's bounds",
    )
    p.add_argument(
        "--out", default=None, help="results JSON (default: benchmarks/results/serve-DATE-DEVICE.json)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ray
    from bench_decode import commit
    from ray import serve

    from fuserve.configs import load_config
    from fuserve.workers.models.loader import load_tokenizer, resolve_source

    config = load_config(args.config)
    source = resolve_source(config.model)
    vocab = load_tokenizer(source).vocab_size if source.kind != "dummy" else source.hf_config["vocab_size"]
    max_len = config.model.max_model_len or int(source.hf_config.get("max_position_embeddings", 2048))
    rates = [float(r) for r in args.rate.split(",")]
    if args.load and math.inf not in rates:
        rates.append(math.inf)
    names = args.workloads.split(",")

    def make(name: str, rate: float) -> list[RequestSpec]:
        shape = {"think_s": tuple(float(x) for x in args.think_s.split(","))} if name == "multi_turn" else {}
        num = args.load_requests if args.load and args.load_requests and not math.isinf(rate) else None
        return make_named(
            name, vocab, num or args.num_requests, rate, args.arrival, args.seed, max_len, args.scale, **shape
        )

    workloads = {rate: make("mix", rate) for rate in rates}
    args.sim_vocab, args.sim_max_model_len = vocab, max_len  # recorded in router rows (route_replay.py)

    def steady(num: int, seed: int, rate: float = math.inf) -> list[RequestSpec]:
        return make_workload(vocab, num, rate, "fixed", seed, max_len, args.scale, STEADY)

    if args.concurrency:
        mix = STEADY if args.compare != "none" or not args.url else tuple(KINDS)
        closed = closed_loop_levels(
            args.concurrency,
            lambda num, seed: make_workload(vocab, num, math.inf, "fixed", seed, max_len, args.scale, mix),
            args.seed,
            args.num_requests,
            args.requests_per_client,
            args.duration,
        )
        top = max(args.concurrency)  # warm-up: each client once, so the largest batch has run before timing
        warmup = Level(steady(top, args.seed + 7919), concurrency=top)
        overhead_levels = closed
    else:
        num = args.overhead_requests or args.num_requests // 2
        overhead_levels = [Level(steady(num, args.seed, args.overhead_rate), rate=args.overhead_rate)]
        warmup = Level(steady(4, args.seed + 7919), rate=math.inf)
    meta = {
        "bench": "serve",
        "engine": "fuserve",
        "model": source.name,
        "device": device_name(),
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "arrival": args.arrival,
        "scale": args.scale,
        "mix": {k: v[0] for k, v in KINDS.items()},
        "client": f"aiohttp {aiohttp.__version__}",
        **host_cpu(),
    }
    load = f"concurrency {args.concurrency}" if args.concurrency else f"{rates} req/s ({args.arrival})"
    print(
        f"{args.num_requests} requests at {load}, {source.name} on {meta['device']}; host "
        f"{meta['host_cpu']}, {meta['host_python_ms']:.1f} ms for the reference Python loop"
    )

    rows: list[dict] = []
    if args.url:
        url = args.url.rstrip("/")
        if args.concurrency:
            rows += http_levels(url, closed, args, {"comparison": "none", "path": "http"})
        else:
            for rate, specs in workloads.items():
                results, wall, _ = http_level(url, Level(specs, rate=rate))
                row = {"comparison": "none", "path": "http", "rate": rate}
                rows.append({**row, **summarize(results, wall, 1, args.device_hour_usd)})
    elif args.compare != "none":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        port = 8000 + random.Random().randrange(1000, 2000)
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            if args.compare in ("all", "routers"):
                rows += compare_routers(config, make, names, rates, port, args)
            if args.compare in ("all", "overhead"):
                rows += compare_overhead(config, overhead_levels, warmup, port, args)
        finally:
            serve.shutdown()
            ray.shutdown()
    rows = [{**meta, **r} for r in rows]
    for http, engine in overhead_pairs(rows):
        http.update(check_bounds(http, engine))
    print_table(rows)
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"serve-{meta['date']}-{meta['device'].replace(' ', '_')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # a row a line: router rows carry per-request lists, which one number a line made ~1 MB a run
    out.write_text("[\n" + ",\n".join(json.dumps(row, default=str) for row in rows) + "\n]\n")
    drawn = plot(rows, out.with_suffix(".png"))
    print(
        f"wrote {out}"
        + (f" and {out.with_suffix('.png')}" if drawn else " (no plot: no rows to draw, or no matplotlib)")
    )
    if any(r["num_failed"] for r in rows):
        return 1
    if args.check_bounds and not all(h["bounds_ok"] for h, _ in overhead_pairs(rows)):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
