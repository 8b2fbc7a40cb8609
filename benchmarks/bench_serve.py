"""Serving benchmark: a load generator, the router comparison, and the serving path's own cost.

    python benchmarks/bench_serve.py                    # both comparisons, default model, CPU
    fuserve bench serve --config configs/x.yaml --num-requests 200 --rate 8
    fuserve bench serve --url http://host:8000 --compare none   # load an already running server

Workload: requests arrive by a Poisson process (or at a fixed rate, or all at once) and are drawn
from a mix of three kinds: short chat turns (sharing a system prompt), long documents (long
prompt, short answer) and long generations (short prompt, long answer). Prompts are token ids of
exact lengths and outputs ignore EOS, so every run does the same work.

Comparisons, each on the same seeded workload:
- `routers`: 2 engine replicas behind the length-aware router vs Ray Serve's default (power of
  two choices on request counts): p99 time to first token and throughput.
- `overhead`: the same requests through HTTP (proxy -> ingress -> engine replica, SSE) and
  straight into an in-process AsyncEngine with the same threads: TTFT and inter-token latency
  p50/p90 side by side. The serving layer must not hold tokens back: ITL p90 through HTTP within
  10% + 1 ms of the engine's.

Reports req/s, output tok/s, TTFT and ITL p50/p90/p99 and the price per million output tokens at
`--device-hour-usd` per device-hour; writes flat JSON rows (DESIGN.md's schema) and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_decode import commit

RESULTS = Path(__file__).parent / "results"
KINDS = {  # kind: (share of requests, prompt tokens range, output tokens range)
    "chat": (0.6, (24, 80), (16, 48)),
    "document": (0.2, (400, 800), (16, 32)),
    "generation": (0.2, (24, 64), (128, 192)),
}
SYSTEM_PROMPT_TOKENS = 32  # chat requests start with this shared prefix, as a chat template's system prompt


@dataclass
class RequestSpec:
    kind: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float  # offset from the start of the run


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


# ---- workload ---------------------------------------------------------------------------------------
def make_workload(
    vocab: int,
    num: int,
    rate: float,
    arrival: str,
    seed: int,
    max_model_len: int,
    scale: float,
    kinds: tuple[str, ...] = tuple(KINDS),
) -> list[RequestSpec]:
    """`scale` shrinks every length (for slow devices); `rate` inf sends everything at t=0."""
    rng = random.Random(seed)
    lo_id, hi_id = min(100, vocab - 1), vocab - 1
    system = [rng.randrange(lo_id, hi_id) for _ in range(SYSTEM_PROMPT_TOKENS)]
    weights = [KINDS[k][0] for k in kinds]
    specs, t = [], 0.0
    for _ in range(num):
        kind = rng.choices(kinds, weights)[0]
        _, (p_lo, p_hi), (o_lo, o_hi) = KINDS[kind]
        n_prompt = max(4, int(rng.randint(p_lo, p_hi) * scale))
        n_out = max(2, int(rng.randint(o_lo, o_hi) * scale))
        body = [rng.randrange(lo_id, hi_id) for _ in range(n_prompt)]
        prompt = (system + body if kind == "chat" else body)[: max_model_len - n_out - 1]
        specs.append(RequestSpec(kind, prompt, n_out, t))
        if math.isfinite(rate):
            t += rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate
    return specs


# ---- clients ----------------------------------------------------------------------------------------
async def _http_one(client: httpx.AsyncClient, model: str, spec: RequestSpec, t0: float) -> RequestResult:
    await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.perf_counter()))
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
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"{r.status_code}: {(await r.aread())[:200]!r}"
                return res
            res.replica = r.headers.get("x-fuserve-replica", "")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
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


async def run_http(url: str, specs: list[RequestSpec]) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=len(specs) + 8, max_keepalive_connections=len(specs) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_http_one(client, model, s, t0) for s in specs))
        return list(results), time.perf_counter() - t0


async def run_engine(engine: Any, specs: list[RequestSpec]) -> tuple[list[RequestResult], float]:
    """The same requests straight into an AsyncEngine in this process: the floor for HTTP."""
    from fuserve.sampling_params import SamplingParams

    async def one(i: int, spec: RequestSpec, t0: float) -> RequestResult:
        await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.perf_counter()))
        params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
        res = RequestResult(spec.kind, ok=False)
        start, last = time.perf_counter(), None
        async for out in engine.generate(spec.prompt_ids, params, f"bench-{i}"):
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
        return res

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i, s, t0) for i, s in enumerate(specs)))
    return list(results), time.perf_counter() - t0


# ---- figures ----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(
    results: list[RequestResult], wall_s: float, devices: int, device_hour_usd: float
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
        "output_tok_s": tok_s,
        "usd_per_m_output_tokens": device_hour_usd * devices / 3600 / tok_s * 1e6 if tok_s else math.nan,
    }
    for q in (50, 90, 99):
        row[f"ttft_ms_p{q}"] = percentile(ttft, q)
        row[f"itl_ms_p{q}"] = percentile(itl, q)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        row["errors"] = errors[:5]
    return row


# ---- the comparisons --------------------------------------------------------------------------------
def _serve_app(config: Any, name: str, port: int) -> str:
    from ray import serve

    from fuserve.cluster import build_app

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}"


def compare_routers(
    config: Any, workloads: dict[float, list[RequestSpec]], port: int, args: argparse.Namespace
) -> list[dict]:
    """Each router serves every workload (one per arrival rate) on 2 fresh replicas."""
    from ray import serve

    rows = []
    for router in ("length_aware", "pow2"):
        cfg = config.model_copy(deep=True)
        cfg.serve.num_replicas, cfg.serve.router = 2, router
        url = _serve_app(cfg, f"bench_{router}", port)
        first = next(iter(workloads.values()))
        asyncio.run(run_http(url, first[: min(4, len(first))]))  # warm-up: first-call costs
        for rate, specs in workloads.items():
            results, wall = asyncio.run(run_http(url, specs))
            row = {"comparison": "router", "router": router, "path": "http", "replicas": 2, "rate": rate}
            row.update(summarize(results, wall, 2, args.device_hour_usd))
            placed: dict[str, dict[str, int]] = {}
            for r in results:
                placed.setdefault(r.replica, {}).setdefault(r.kind, 0)
                placed[r.replica][r.kind] += 1
            row["placement"] = placed
            rows.append(row)
            print(
                f"  router {router:12s} at {rate} req/s: {row['output_tok_s']:.1f} tok/s, "
                f"TTFT p99 {row['ttft_ms_p99']:.0f} ms"
            )
        serve.delete(f"bench_{router}")
    return rows


def compare_overhead(
    config: Any, specs: list[RequestSpec], port: int, args: argparse.Namespace
) -> list[dict]:
    import torch
    from ray import serve

    from fuserve.workers.async_engine import AsyncEngine

    cfg = config.model_copy(deep=True)
    cfg.serve.num_replicas = 1
    url = _serve_app(cfg, "bench_overhead", port)
    asyncio.run(run_http(url, specs[: min(4, len(specs))]))
    http_results, http_wall = asyncio.run(run_http(url, specs))
    serve.delete("bench_overhead")
    rows = [{"comparison": "overhead", "path": "http", "replicas": 1, "rate": args.overhead_rate}]
    rows[0].update(summarize(http_results, http_wall, 1, args.device_hour_usd))
    print(f"  http done: ITL p90 {rows[0]['itl_ms_p90']:.2f} ms")

    # The replica ran with one torch thread per CPU it was given; the in-process engine does too.
    torch.set_num_threads(max(1, int(cfg.serve.num_cpus_per_replica)))
    engine = AsyncEngine(cfg)

    async def both() -> tuple[list[RequestResult], float]:
        await run_engine(engine, specs[: min(4, len(specs))])
        return await run_engine(engine, specs)

    try:
        eng_results, eng_wall = asyncio.run(both())
    finally:
        engine.shutdown()
    row = {"comparison": "overhead", "path": "engine", "replicas": 1, "rate": args.overhead_rate}
    row.update(summarize(eng_results, eng_wall, 1, args.device_hour_usd))
    rows.append(row)
    print(f"  engine done: ITL p90 {row['itl_ms_p90']:.2f} ms")
    return rows


# ---- output -----------------------------------------------------------------------------------------
def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def print_table(rows: list[dict]) -> None:
    cols = [
        "comparison",
        "router",
        "path",
        "rate",
        "req_s",
        "output_tok_s",
        "ttft_ms_p50",
        "ttft_ms_p90",
        "ttft_ms_p99",
    ]
    cols += ["itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "num_failed"]
    print(" ".join(f"{c:>13s}" for c in cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print(" ".join(f"{c:13.2f}" if isinstance(c, float) else f"{c!s:>13s}" for c in cells))
    by = {(r["comparison"], r.get("router", r.get("path")), r.get("rate")): r for r in rows}
    for rate in sorted({r["rate"] for r in rows if r["comparison"] == "router"}):
        la, p2 = by[("router", "length_aware", rate)], by[("router", "pow2", rate)]
        ttft, tput = (la["ttft_ms_p99"], p2["ttft_ms_p99"]), (la["output_tok_s"], p2["output_tok_s"])
        print(
            f"length-aware vs pow2 at {rate} req/s: TTFT p99 {ttft[0]:.0f} vs {ttft[1]:.0f} ms "
            f"({ttft[1] / ttft[0]:.2f}x), throughput {tput[0]:.1f} vs {tput[1]:.1f} tok/s "
            f"({tput[0] / tput[1]:.2f}x)"
        )
    by = {(r["comparison"], r.get("router", r.get("path"))): r for r in rows}
    http, eng = by.get(("overhead", "http")), by.get(("overhead", "engine"))
    if http and eng:
        bound = eng["itl_ms_p90"] * 1.1 + 1.0
        verdict = "within" if http["itl_ms_p90"] <= bound else "OVER"
        print(
            f"serving path: ITL p90 {http['itl_ms_p90']:.2f} ms through HTTP vs "
            f"{eng['itl_ms_p90']:.2f} ms in the engine ({verdict} the 10% + 1 ms bound of {bound:.2f} ms); "
            f"TTFT p50 {http['ttft_ms_p50']:.1f} vs {eng['ttft_ms_p50']:.1f} ms"
        )


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    routers = [r for r in rows if r["comparison"] == "router"]
    overhead = [r for r in rows if r["comparison"] == "overhead"]
    if routers:
        rates = sorted({r["rate"] for r in routers})
        for i, (router, color) in enumerate([("length_aware", "tab:blue"), ("pow2", "tab:gray")]):
            mine = {r["rate"]: r for r in routers if r["router"] == router}
            xs = [j + i * 0.4 for j in range(len(rates))]
            axes[0].bar(xs, [mine[q]["ttft_ms_p99"] for q in rates], 0.4, label=router, color=color)
            axes[1].bar(xs, [mine[q]["output_tok_s"] for q in rates], 0.4, label=router, color=color)
        titles = ["TTFT p99 (ms, lower is better)", "output tokens/s (higher is better)"]
        for ax, title in zip(axes[:2], titles, strict=True):
            ax.set_xticks([j + 0.2 for j in range(len(rates))], [f"{q:g} req/s" for q in rates])
            ax.set_title(f"2 replicas: {title}")
            ax.legend()
    if overhead:
        labels = ["TTFT p50", "TTFT p90", "ITL p50", "ITL p90"]
        keys = ["ttft_ms_p50", "ttft_ms_p90", "itl_ms_p50", "itl_ms_p90"]
        width = 0.8 / len(overhead)
        for i, r in enumerate(overhead):
            xs = [j + i * width for j in range(len(keys))]
            axes[2].bar(xs, [r[k] for k in keys], width, label=r["path"])
        axes[2].set_xticks([j + width / 2 for j in range(len(keys))], labels)
        axes[2].set_title("serving path vs engine (ms)")
        axes[2].legend()
    meta = rows[0]
    fig.suptitle(f"fuserve serving, {meta['model']} on {meta['device']}, {meta['date']} ({meta['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fuserve bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="deployment YAML (default: the embedded SmolLM2 config)")
    p.add_argument("--url", default=None, help="load this running server instead of starting one")
    p.add_argument("--compare", choices=["all", "routers", "overhead", "none"], default="all")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument(
        "--rate",
        default="1.5,inf",
        help="request rates to compare the routers at, comma-separated requests/s; inf sends all at once",
    )
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--scale", type=float, default=0.5, help="multiply all prompt/output lengths (CPU: 0.5)")
    p.add_argument(
        "--overhead-rate",
        type=float,
        default=1.0,
        help="requests/s for the HTTP-vs-engine comparison, which leaves out long documents so that "
        "inter-token gaps measure the serving path, not prefill stalls",
    )
    p.add_argument("--overhead-requests", type=int, default=None, help="default: half of --num-requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-hour-usd", type=float, default=2.0, help="price of one device (GPU) for an hour")
    p.add_argument(
        "--out", default=None, help="results JSON (default: benchmarks/results/serve-DATE-DEVICE.json)"
    )
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from fuserve.configs import load_config
    from fuserve.workers.models.loader import load_tokenizer, resolve_source

    config = load_config(args.config)
    source = resolve_source(config.model)
    vocab = load_tokenizer(source).vocab_size if source.kind != "dummy" else source.hf_config["vocab_size"]
    max_len = config.model.max_model_len or int(source.hf_config.get("max_position_embeddings", 2048))
    rates = [float(r) for r in args.rate.split(",")]
    workloads = {
        rate: make_workload(vocab, args.num_requests, rate, args.arrival, args.seed, max_len, args.scale)
        for rate in rates
    }
    steady = ("chat", "generation")
    overhead_specs = make_workload(
        vocab,
        args.overhead_requests or args.num_requests // 2,
        args.overhead_rate,
        "fixed",
        args.seed,
        max_len,
        args.scale,
        steady,
    )
    meta = {
        "bench": "serve",
        "engine": "fuserve",
        "model": source.name,
        "device": device_name(),
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "arrival": args.arrival,
        "scale": args.scale,
        "workload": {k: v[0] for k, v in KINDS.items()},
    }
    print(
        f"{args.num_requests} requests at {rates} req/s ({args.arrival}), {source.name} on {meta['device']}"
    )

    rows: list[dict] = []
    if args.url:
        for rate, specs in workloads.items():
            results, wall = asyncio.run(run_http(args.url, specs))
            row = {"comparison": "none", "path": "http", "rate": rate}
            rows.append({**row, **summarize(results, wall, 1, args.device_hour_usd)})
    elif args.compare != "none":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        port = 8000 + random.Random().randrange(1000, 2000)
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            if args.compare in ("all", "routers"):
                rows += compare_routers(config, workloads, port, args)
            if args.compare in ("all", "overhead"):
                rows += compare_overhead(config, overhead_specs, port, args)
        finally:
            serve.shutdown()
            ray.shutdown()
    rows = [{**meta, **r} for r in rows]
    print_table(rows)
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"serve-{meta['date']}-{meta['device'].replace(' ', '_')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, default=str))
    drawn = plot(rows, out.with_suffix(".png"))
    print(
        f"wrote {out}"
        + (f" and {out.with_suffix('.png')}" if drawn else " (no plot: pip install matplotlib)")
    )
    return 0 if all(r["num_failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
