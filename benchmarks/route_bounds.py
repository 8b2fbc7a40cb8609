"""What no router can beat, in the routing simulator: bounds on TTFT for a workload at a given load.

    python benchmarks/route_bounds.py --workloads heavy_tail,multi_turn --seeds 0,1,2,3

A target such as "TTFT p99 1.3x better than prefix-affinity" means something only where prefix-affinity
is more than 1.3x above what any router could do. Three references, from loosest to tightest:

    isolated      a lower bound, for every request: its own prefill alone on an idle replica whose cache
                  holds every block of every prompt that arrived before it (ceil(prefill / token budget)
                  steps of `StepCost` with no decodes). A router cannot make any request's TTFT smaller,
                  so no router's p50/p99 can be below this vector's (order statistics are monotone).
    oracle_ttft   perfect information now: each request goes where its TTFT is lowest, found by running a
                  copy of every replica's true scheduler, block manager and in-flight step forward until
                  its first token (later arrivals unknown). What the TTFT policy would do with an exact
                  and fresh view.
    oracle_search the future seen: an offline search over assignments that minimizes TTFT p99 itself,
                  started from the best of the routers' own assignments; it moves the worst requests, and
                  those that arrived on their replica just before them, to the other replica and keeps a
                  move when p99 drops (`--search-evals` simulations). An achievable p99, so the true
                  optimum lies between `isolated` and it.

Writes flat JSON rows (`bench: route_bounds`) with each reference's and each router's TTFT p50/p99.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import route_sim  # noqa: E402
from route_sim import BLOCK_SIZE, RouteInput, SimConfig, SimReplica, SimRouter, percentile  # noqa: E402
from workloads import RequestSpec, make_named  # noqa: E402

from fuserve.sampling_params import SamplingParams  # noqa: E402
from fuserve.workers.routing_summary import prefill_tokens  # noqa: E402
from fuserve.workers.sequence import Sequence  # noqa: E402


# ---- the lower bound -------------------------------------------------------------------------------------
def _block_chain(ids: list[int], block_size: int) -> list[int]:
    chain, h = [], 0
    for i in range(len(ids) // block_size):
        h = hash((h, tuple(ids[i * block_size : (i + 1) * block_size])))
        chain.append(h)
    return chain


def isolated_ttft(specs: list[RequestSpec], cfg: SimConfig) -> list[float]:
    """Each request's TTFT alone on an idle replica with the best cache it could find there: every full
    block of every prompt that arrived no later than it (the engine never serves the last token from
    cache). Generated tokens are not counted as cached: the simulator's are not the workload's."""
    order = sorted(range(len(specs)), key=lambda i: specs[i].arrival_s)
    seen: set[int] = set()
    out = [0.0] * len(specs)
    budget = cfg.scheduler.max_num_batched_tokens
    for i in order:  # arrival order: every earlier prompt's blocks are in `seen`
        n = len(specs[i].prompt_ids)
        chain = _block_chain(specs[i].prompt_ids, BLOCK_SIZE)
        usable = chain[: (n - 1) // BLOCK_SIZE]
        cached = next((k for k, h in enumerate(usable) if h not in seen), len(usable))
        own = n - cached * BLOCK_SIZE
        out[i] = math.ceil(own / budget) * cfg.cost.base_s + own * cfg.cost.per_token_s
        seen.update(chain)
    return out


# ---- perfect information now -----------------------------------------------------------------------------
def exact_ttft(rep: SimReplica, spec: RequestSpec, now: float) -> float:
    """The request's TTFT on this replica if no other request arrived: a copy of its scheduler, block
    manager and running step, stepped forward on its own clock."""
    memo: dict[int, Any] = {}
    sched = copy.deepcopy(rep.scheduler, memo)
    inflight = copy.deepcopy(rep.inflight, memo)
    t = now
    sched.clock = lambda: t
    params = SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True)
    seq = Sequence("new", list(spec.prompt_ids), params, now, spec.max_tokens)
    sched.add(seq)
    cost = rep.cfg.cost
    for _ in range(100_000):
        if inflight is not None:
            t, out = inflight
            sched.update_from_output(out, [1 if s.samples else None for s in out.scheduled])
            if seq.num_output_tokens >= 1:
                return t - now
        out = sched.schedule()
        sched.on_launched(out)
        prefill = prefill_tokens(out)
        inflight = (t + cost.step_s(prefill, out.num_tokens - prefill), out)
    raise RuntimeError("the request never got its first token")


class OracleTtft(SimRouter):
    def choose(self, x: RouteInput) -> str:
        times = {rid: exact_ttft(rep, x.spec, x.now) for rid, rep in x.replicas.items()}
        self.predicted[x.index] = min(times.values())
        return min(times, key=lambda r: (times[r], x.ongoing[r], r))


# ---- the future seen: a search over assignments ----------------------------------------------------------
class Fixed(SimRouter):
    """Routes request i to assignment[i]."""

    def __init__(self, replica_ids: list[str], rng: random.Random, assignment: dict[int, str]) -> None:
        super().__init__(replica_ids, rng)
        self.assignment = assignment

    def choose(self, x: RouteInput) -> str:
        return self.assignment[x.index]


class Recording(SimRouter):
    """Wraps a policy and records its choices."""

    def __init__(self, inner: SimRouter, log: dict[int, str]) -> None:
        self.inner, self.log = inner, log
        self.predicted = inner.predicted

    def route(self, x: RouteInput) -> str:
        rid = self.inner.route(x)
        self.log[x.index] = rid
        return rid


def assignment_of(specs: list[RequestSpec], policy: Any, cfg: SimConfig) -> tuple[dict[int, str], Any]:
    log: dict[int, str] = {}
    factory = route_sim.router_factory(policy) if isinstance(policy, str) else policy
    result = route_sim.simulate(specs, lambda ids, rng: Recording(factory(ids, rng), log), cfg)
    return log, result


def p99(result: route_sim.SimResult) -> float:
    return percentile(result.ttft_s, 99)


def search(
    specs: list[RequestSpec], start: dict[int, str], cfg: SimConfig, evals: int
) -> tuple[dict[int, str], route_sim.SimResult, int]:
    """Hill climbing on TTFT p99 over assignments (see the module doc). Returns the best assignment, its
    result and the simulations run."""
    ids = [f"r{i}" for i in range(cfg.num_replicas)]
    best = dict(start)
    result = route_sim.simulate(specs, lambda i, r: Fixed(i, r, best), cfg)
    score, runs, tried = p99(result), 1, set()
    while runs < evals:
        worst = sorted(range(len(specs)), key=lambda i: -result.ttft_s[i])[:6]
        moves: list[int] = []
        for w in worst:  # the request itself, then those queued on its replica shortly before it
            moves.append(w)
            near = [
                j
                for j in range(len(specs))
                if j != w
                and best[j] == best[w]
                and specs[w].arrival_s - result.ttft_s[w] <= specs[j].arrival_s <= specs[w].arrival_s
            ]
            near.sort(key=lambda j: -len(specs[j].prompt_ids))
            moves.extend(near[:8])
        moves = [m for m in dict.fromkeys(moves) if (m, best[m]) not in tried]
        if not moves:
            break
        improved = False
        for m in moves:
            if runs >= evals:
                break
            tried.add((m, best[m]))
            for other in [r for r in ids if r != best[m]]:
                trial = {**best, m: other}
                r = route_sim.simulate(specs, lambda i, g, a=trial: Fixed(i, g, a), cfg)
                runs += 1
                if p99(r) < score - 1e-9:
                    best, result, score, improved = trial, r, p99(r), True
                    break
            if improved:
                break
        if not improved and all((m, best[m]) in tried for m in moves):
            break
    return best, result, runs


# ---- the table -------------------------------------------------------------------------------------------
ROUTERS = ("length_aware", "prefix_affinity", "prefix_affinity@16", "pow2")


def bounds_rows(
    name: str, seed: int, num: int, load: float, evals: int, **shape: Any
) -> list[dict[str, Any]]:
    cfg = SimConfig(num_replicas=2, seed=seed)
    probe = make_named(name, 32000, num, math.inf, "poisson", seed, 16384, 1.0, **shape)
    rate = load * route_sim.saturation_rate(probe, cfg)
    specs = make_named(name, 32000, num, rate, "poisson", seed, 16384, 1.0, **shape)
    span = max(s.arrival_s for s in specs) - min(s.arrival_s for s in specs)
    base = {
        "bench": "route_bounds",
        "workload": name,
        "seed": seed,
        "rate": rate,
        "load": load,
        "achieved_rate": len(specs) / span if span > 0 else math.inf,  # think times stretch multi_turn
        **shape,
    }
    rows = []

    def row(ref: str, ttft: list[float], **extra: Any) -> dict[str, Any]:
        r = {
            **base,
            "ref": ref,
            "ttft_ms_p50": 1000 * percentile(ttft, 50),
            "ttft_ms_p99": 1000 * percentile(ttft, 99),
            **extra,
        }
        rows.append(r)
        return r

    row("isolated", isolated_ttft(specs, cfg))
    starts = {}
    for policy in (*ROUTERS, "oracle_ttft"):
        t0 = time.perf_counter()
        assignment, result = assignment_of(specs, OracleTtft if policy == "oracle_ttft" else policy, cfg)
        starts[policy] = (p99(result), assignment)
        row(policy, result.ttft_s, sim_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    start_name = min(starts, key=lambda k: starts[k][0])
    _, result, runs = search(specs, starts[start_name][1], cfg, evals)
    row("oracle_search", result.ttft_s, start=start_name, sims=runs, sim_s=time.perf_counter() - t0)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    refs = ("isolated", "oracle_search", "oracle_ttft", *ROUTERS)
    head = " ".join(f"{r:>15s}" for r in refs)
    print(f"{'workload':11s} {'seed':>4s} {head}  PA/isolated PA/search PA@16/search")
    groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["seed"]), {})[r["ref"]] = r
    for (name, seed), g in groups.items():
        cells = " ".join(f"{g[k]['ttft_ms_p50']:6.1f}/{g[k]['ttft_ms_p99']:7.1f}" for k in refs)
        pa = g["prefix_affinity"]["ttft_ms_p99"]
        print(
            f"{name:11s} {seed:4d} {cells}  {pa / g['isolated']['ttft_ms_p99']:.2f}x"
            f"       {pa / g['oracle_search']['ttft_ms_p99']:.2f}x"
            f"       {g['prefix_affinity@16']['ttft_ms_p99'] / g['oracle_search']['ttft_ms_p99']:.2f}x"
            f"  ({g['isolated']['achieved_rate']:.1f} of {g['isolated']['rate']:.1f} req/s)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="heavy_tail,multi_turn")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--load", type=float, default=0.8)
    p.add_argument("--search-evals", type=int, default=150)
    p.add_argument("--think-s", default=None, help="multi_turn's think time range, e.g. 0.2,0.6")
    p.add_argument("--long-share", type=float, default=None, help="heavy_tail's share of 8k prompts")
    p.add_argument("--system-tokens", type=int, default=0, help="heavy_tail: a system prompt all share")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in args.workloads.split(","):
        shape: dict[str, Any] = {}
        if name == "multi_turn" and args.think_s:
            shape["think_s"] = tuple(float(x) for x in args.think_s.split(","))
        if name == "heavy_tail" and args.long_share is not None:
            shape["long_share"] = args.long_share
        if name == "heavy_tail" and args.system_tokens:
            shape["system_tokens"] = args.system_tokens
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += bounds_rows(name, seed, args.num_requests, args.load, args.search_evals, **shape)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
