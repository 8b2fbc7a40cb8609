"""The routing policy, without Ray: pure ranking, prefix keys, and the Serve adapter's accounting.

The adapter tests drive `LengthAwareRouter.choose_replicas` / `on_request_routed` /
`on_request_completed` directly with stand-in replicas, the way Serve calls them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserve.router.engine_messages import EngineRequest
from fuserve.router.routing_policy import (
    Candidate,
    RecentPrefixes,
    TieBreak,
    prefix_depth,
    prefix_keys,
    rank_replicas,
)
from fuserve.sampling_params import SamplingParams

TIE = TieBreak(tokens=100, fraction=0.1)


# ---- prefix keys ----------------------------------------------------------------------------------
def test_prefix_keys_are_chained_per_full_block() -> None:
    a = prefix_keys(list(range(40)), block_size=16)
    assert len(a) == 2, "two full blocks; the partial third block has no key"
    b = prefix_keys(list(range(32)) + [99] * 8, block_size=16)
    assert a == b, "keys depend on full blocks only"
    c = prefix_keys([7] + list(range(1, 40)), block_size=16)
    assert c[0] != a[0] and c[1] != a[1], "a change in block 0 changes every later key (chained)"
    assert prefix_keys(list(range(500)), block_size=16, max_blocks=4) == prefix_keys(list(range(64)), 16)
    assert prefix_keys([1, 2, 3], block_size=16) == []


def test_prefix_keys_agree_across_processes() -> None:
    """Ingress replicas and engine replicas are separate processes with their own hash seeds."""
    import fuserve.router.routing_policy as policy

    # Load the module file alone (stdlib only), not the fuserve package, which imports torch.
    code = (
        "import importlib.util as u, sys; s = u.spec_from_file_location('p', sys.argv[1]); "
        "m = sys.modules['p'] = u.module_from_spec(s); s.loader.exec_module(m); "
        "print(m.prefix_keys(list(range(64)), 16))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code, policy.__file__],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{prefix_keys(list(range(64)), 16)}\n"}


def test_prefix_depth_stops_at_the_first_miss() -> None:
    keys = [1, 2, 3]
    assert prefix_depth(keys, {1, 2, 3}) == 3
    assert prefix_depth(keys, {1, 3}) == 1
    assert prefix_depth(keys, {2, 3}) == 0


def test_recent_prefixes_is_a_bounded_lru() -> None:
    lru = RecentPrefixes(capacity=3)
    lru.add([1, 2, 3])
    lru.add([1])  # refresh 1
    lru.add([4])  # evicts 2, the least recently used
    assert 2 not in lru and {1, 3, 4} <= set(lru.snapshot()) and len(lru) == 3


# ---- ranking ----------------------------------------------------------------------------------------
def test_least_outstanding_tokens_first() -> None:
    cands = [Candidate("a", 900), Candidate("b", 100), Candidate("c", 500)]
    assert rank_replicas(cands, [], TIE) == ["b", "c", "a"]
    assert rank_replicas([], [5], TIE) == []


def test_a_cached_prefix_counts_as_the_prefill_it_saves() -> None:
    keys = [11, 12, 13]  # three 16-token blocks
    holder = Candidate("a", 150, {11, 12})  # 150 outstanding - 32 cached = 118
    other = Candidate("b", 100)
    assert rank_replicas([holder, other], keys, TIE)[0] == "a", "118 vs 100: within the margin"
    far = Candidate("a", 400, {11, 12, 13})  # 400 - 48 = 352
    assert rank_replicas([far, other], keys, TIE)[0] == "b", "352 vs 100: load wins"
    deeper = Candidate("c", 100, {11, 12, 13})  # 100 - 48 = 52
    assert rank_replicas([holder, other, deeper], keys, TIE)[0] == "c", "the longest cached prefix wins"
    # Affinity alone cannot pile work up: 64 tokens of cache buy at most 64 + margin of imbalance.
    small = Candidate("a", 300, {11, 12, 13, 14})
    assert rank_replicas([small, other], [11, 12, 13, 14], TIE, block_size=16)[0] == "b"


def test_margin_grows_with_load() -> None:
    assert TIE.margin(0) == 100 and TIE.margin(10_000) == 1000
    busy = [Candidate("a", 10_800, {1}), Candidate("b", 10_000)]
    assert rank_replicas(busy, [1], TIE)[0] == "a", "784 apart at 10k load is within 10%"


def test_new_prefixes_spread_over_replicas_and_stick() -> None:
    """Idle replicas, unseen prefixes: a hash of the prefix picks the replica, so the same prompt
    start lands on the same replica every time and different ones spread out."""
    idle = [Candidate(r, 0) for r in "abcd"]
    firsts = [rank_replicas(idle, prefix_keys([i] * 16, 16), TIE)[0] for i in range(400)]
    counts = {r: firsts.count(r) for r in "abcd"}
    assert all(60 <= n <= 140 for n in counts.values()), counts
    assert firsts == [rank_replicas(idle, prefix_keys([i] * 16, 16), TIE)[0] for i in range(400)]


@settings(max_examples=60, deadline=None)
@given(
    works=st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=60),
    replicas=st.integers(2, 5),
)
def test_greedy_assignment_keeps_loads_within_one_request_and_the_margin(
    works: list[int], replicas: int
) -> None:
    loads = {f"r{i}": 0 for i in range(replicas)}
    for i, work in enumerate(works):
        cands = [Candidate(r, load) for r, load in loads.items()]
        loads[rank_replicas(cands, prefix_keys([i] * 16, 16), TIE)[0]] += work
    spread = max(loads.values()) - min(loads.values())
    assert spread <= max(works) + TIE.margin(max(loads.values()))


# ---- the Serve adapter --------------------------------------------------------------------------------
@dataclass
class FakeReplicaID:
    unique_id: str


@dataclass
class FakeReplica:
    """What LengthAwareRouter reads from Serve's RunningReplica."""

    name: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self) -> FakeReplicaID:
        return FakeReplicaID(self.name)


def make_router(send_board: str | None = None):  # noqa: ANN201 - the Ray type is imported lazily
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from fuserve.router.length_aware_router import LengthAwareRouter

    router = LengthAwareRouter(
        deployment_id=DeploymentID("Engine", "app"), handle_source=DeploymentHandleSource.UNKNOWN
    )
    router.initialize_state(tie_tokens=100, tie_fraction=0.1, send_board=send_board)
    return router


def pending(work: int, internal_id: str, keys: list[int] | None = None, prompt: int = 0):  # noqa: ANN201
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    req = EngineRequest(
        f"r{prompt}-{work}", [prompt] * 4, SamplingParams(max_tokens=4), work, keys or [prompt]
    )
    return PendingRequest(args=[req], kwargs={}, metadata=RequestMetadata("rid", internal_id))


def test_a_burst_is_spread_before_any_request_is_confirmed() -> None:
    router, replicas = make_router(), [FakeReplica("a"), FakeReplica("b")]

    async def main() -> list[str]:
        chosen = []
        for i, work in enumerate([1000, 300, 300, 300]):
            ranks = await router.choose_replicas(replicas, pending(work, f"req{i}", prompt=i))
            chosen.append(ranks[0][0].name)
        return chosen

    chosen = asyncio.run(main())
    long_on = chosen[0]
    assert chosen[1:] == [r for r in "ab" if r != long_on] * 3, "the 300s all go beside the 1000"


def test_reported_load_is_not_double_counted() -> None:
    router = make_router()
    a, b = FakeReplica("a"), FakeReplica("b")

    async def main() -> None:
        first = pending(500, "x", prompt=1)
        ranks = await router.choose_replicas([a, b], first)
        target = ranks[0][0]
        router.on_request_routed(first, target.replica_id, None)
        other = b if target is a else a
        # The replica then reports it, already including `first`: 500, not 1000.
        target.routing_stats = {"outstanding_tokens": 500, "timestamp": 10**10}
        assert router._load(target) == 500
        # A stale report (taken before `first` was routed) does not yet include it.
        target.routing_stats = {"outstanding_tokens": 200, "timestamp": 1.0}
        assert router._load(target) == 700
        assert router._load(other) == 0
        router.on_request_completed(target.replica_id, "x")
        assert router._load(target) == 200

    asyncio.run(main())


def test_calls_sharing_an_internal_request_id_are_accounted_separately() -> None:
    """Serve gives every handle call made for one HTTP request that request's internal id."""
    router = make_router()
    a, b = FakeReplica("a"), FakeReplica("b")

    async def main() -> None:
        p1, p2 = pending(800, "same", prompt=1), pending(100, "same", prompt=2)
        r1 = (await router.choose_replicas([a, b], p1))[0][0]
        r2 = (await router.choose_replicas([a, b], p2))[0][0]
        assert r1 is not r2
        router.on_request_routed(p1, r1.replica_id, None)
        router.on_request_routed(p2, r2.replica_id, None)
        router.on_request_completed(r2.replica_id, "same")
        assert (router._load(r1), router._load(r2)) == (800, 0)

    asyncio.run(main())


def test_prefixes_sent_are_remembered() -> None:
    router = make_router()
    a, b = FakeReplica("a"), FakeReplica("b")

    async def main() -> None:
        keys = [101, 102]
        first = pending(50, "p1", keys=keys)
        target = (await router.choose_replicas([a, b], first))[0][0]
        router.on_request_routed(first, target.replica_id, None)
        router.on_request_completed(target.replica_id, "p1")
        # The other replica is now slightly less loaded, but within the margin: the cache wins.
        target.routing_stats = {"outstanding_tokens": 60, "timestamp": 10**10}
        again = (await router.choose_replicas([a, b], pending(50, "p2", keys=keys)))[0][0]
        assert again is target

    asyncio.run(main())


@pytest.mark.parametrize("reported", [True, False])
def test_prefixes_reported_by_a_replica_attract_requests(reported: bool) -> None:
    router = make_router()
    keys = prefix_keys(list(range(48)), 16)
    # Whichever replica the hash would pick for these keys, make the *other* one hold them.
    idle = [Candidate("a", 0), Candidate("b", 0)]
    by_hash = rank_replicas(idle, keys, TIE)[0]
    holder_name = "b" if by_hash == "a" else "a"
    stats = {"outstanding_tokens": 0, "timestamp": 1.0, "prefix_keys": keys if reported else []}
    replicas = [FakeReplica(n, dict(stats) if n == holder_name else {}) for n in "ab"]

    async def main() -> str:
        return (await router.choose_replicas(replicas, pending(100, "q", keys=keys)))[0][0].name

    assert asyncio.run(main()) == (holder_name if reported else by_hash)


# ---- without an EngineRequest: Serve's Python proxy, and the HAProxy ingress router's hints --------
def blind(internal_id: str, args: list | None = None):  # noqa: ANN201
    """A request as Serve's Python proxy hands it over: its only argument is the pickled ASGI request,
    so the router sees no prompt and no prefix."""
    import pickle

    from ray.serve._private.common import RequestMetadata, StreamingHTTPRequest
    from ray.serve.request_router import PendingRequest

    if args is None:
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        args = [pickle.dumps(StreamingHTTPRequest(asgi_scope=scope, proxy_actor_name="proxy"))]
    return PendingRequest(args=args, kwargs={}, metadata=RequestMetadata("rid", internal_id))


def hinted(work: int, keys: list[int], internal_id: str):  # noqa: ANN201
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from fuserve.router.routing_policy import RoutingHint

    return PendingRequest(
        args=[RoutingHint(work, keys)], kwargs={}, metadata=RequestMetadata("h", internal_id)
    )


@pytest.mark.parametrize("args", [None, [], [None], [b"not a pickle"], [{"prompt": "hi"}]])
def test_behind_the_python_proxy_replicas_are_ranked_by_their_stats(args: list | None) -> None:
    """Whatever the first argument is (the proxy's ASGI bytes, nothing, junk), every replica is ranked:
    least outstanding tokens first, the rest as fallbacks when the first is full."""
    router = make_router()
    replicas = [
        FakeReplica("a", {"outstanding_tokens": 900, "timestamp": 10**10}),
        FakeReplica("b", {"outstanding_tokens": 100, "timestamp": 10**10}),
        FakeReplica("c", {"outstanding_tokens": 500, "timestamp": 10**10}),
    ]

    async def main() -> list[list[str]]:
        ranked = [await router.choose_replicas(replicas, blind("x", args))]
        ranked.append(await router.choose_replicas(replicas, None))  # no pending request at all
        return [[rs[0].name for rs in ranks] for ranks in ranked]

    assert asyncio.run(main()) == [["b", "c", "a"], ["b", "c", "a"]]


def test_equal_token_loads_go_to_the_shorter_queue() -> None:
    router = make_router()
    busy = FakeReplica("a", {"outstanding_tokens": 0, "num_waiting": 3, "timestamp": 10**10})
    idle = FakeReplica("b", {"outstanding_tokens": 0, "timestamp": 10**10})

    async def main() -> str:
        return (await router.choose_replicas([busy, idle], blind("q")))[0][0].name

    assert asyncio.run(main()) == "b"


def test_a_blind_burst_is_spread_and_released_when_done() -> None:
    """Before any replica reports, simultaneous blind requests alternate (each counts `blind_tokens`);
    completed requests stop counting."""
    router = make_router()
    a, b = FakeReplica("a"), FakeReplica("b")

    async def main() -> None:
        burst = [blind(f"req{i}") for i in range(6)]
        chosen = []
        for p in burst:
            target = (await router.choose_replicas([a, b], p))[0][0]
            router.on_request_routed(p, target.replica_id, None)
            chosen.append(target.name)
        assert sorted(chosen) == ["a"] * 3 + ["b"] * 3
        assert router._load(a) == router._load(b) == 3 * router.blind_tokens
        for i, name in enumerate(chosen):
            router.on_request_completed(FakeReplicaID(name), f"req{i}")
        assert router._load(a) == router._load(b) == 0 and not router._assignments

    asyncio.run(main())


def test_a_routing_hint_gets_the_full_policy_and_counts_until_the_replica_reports_it() -> None:
    """The HAProxy ingress router's picks: prefix affinity applies; nothing confirms or completes a
    pick, so it counts as load until a report taken after it, and is then dropped."""
    router = make_router()
    keys = prefix_keys(list(range(48)), 16)
    by_hash = rank_replicas([Candidate("a", 0), Candidate("b", 0)], keys, TIE)[0]
    holder_name = "b" if by_hash == "a" else "a"
    replicas = {n: FakeReplica(n, {"timestamp": 1.0}) for n in "ab"}
    replicas[holder_name].routing_stats["prefix_keys"] = keys

    async def main() -> None:
        pick = await router.choose_replicas(list(replicas.values()), hinted(700, keys, "h1"))
        holder = pick[0][0]
        assert holder.name == holder_name and [r[0].name for r in pick][1:] == [by_hash]
        assert router._load(holder) == 700, "counted at once: a burst must not pile onto one replica"
        # A second request without a prefix goes beside it.
        other = (await router.choose_replicas(list(replicas.values()), hinted(100, [], "h2")))[0][0]
        assert other is not holder
        # The holder reports, after the pick: its figures now include the request (it admitted one).
        holder.routing_stats = {
            "outstanding_tokens": 700,
            "timestamp": 10**10,
            "prefix_keys": keys,
            "num_admitted": 1,
        }
        await router.choose_replicas(list(replicas.values()), hinted(1, [], "h3"))
        assert router._load(holder) == 700
        assert all(a.replica_id != holder.name for a in router._assignments.values()), "the pick is dropped"

    asyncio.run(main())


def test_blind_picks_that_serve_never_confirms_are_dropped_once_reported() -> None:
    """HAProxy's router without a body: `choose_replica()` with no arguments, never dispatched here."""
    router = make_router()
    a, b = FakeReplica("a", {"timestamp": 1.0}), FakeReplica("b", {"timestamp": 1.0})

    async def main() -> None:
        picks = [(await router.choose_replicas([a, b], blind(f"p{i}", args=[])))[0][0] for i in range(4)]
        assert sorted(p.name for p in picks) == ["a", "a", "b", "b"]
        for r in (a, b):
            r.routing_stats = {"outstanding_tokens": 512, "num_running": 2, "timestamp": 10**10}
        await router.choose_replicas([a, b], blind("next", args=[]))
        assert len(router._assignments) == 1, "only the newest pick is left"

    asyncio.run(main())


# ---- replicas that report a step cost: the TTFT policy ----------------------------------------------
def ttft_stats(taken_at: float, **queue: object) -> dict:
    """A replica's report as `EngineIngress.record_routing_stats` builds it (replica_view.routing_report)."""
    return {
        "step_cost": [0.007, 0.0001, 0.00005],
        "token_budget": 2048,
        "max_num_seqs": 128,
        "timestamp": taken_at,
        "stats_at": taken_at,
        **queue,
    }


def long_hint(internal_id: str, prompt: int = 3000):  # noqa: ANN201
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from fuserve.router.routing_policy import RoutingHint

    hint = RoutingHint(prompt + 4, [], 16, prompt_tokens=prompt, max_tokens=4)
    return PendingRequest(args=[hint], kwargs={}, metadata=RequestMetadata("h", internal_id))


def test_reported_step_costs_turn_on_the_ttft_policy_and_sends_count_until_a_report_covers_them() -> None:
    import time

    router = make_router()
    now = time.time()
    a, b = FakeReplica("a", ttft_stats(now - 0.01)), FakeReplica("b", ttft_stats(now - 0.01))

    async def pick(internal_id: str) -> str:
        return (await router.choose_replicas([a, b], long_hint(internal_id)))[0][0].name

    async def main() -> None:
        first = await pick("h1")
        second = await pick("h2")
        assert first != second, "3000 tokens sent to the first are ahead of the next one there"
        held = a if first == "a" else b
        assert [x.prefill for x in router._assignments.values() if x.replica_id == held.name] == [3000]
        # A report taken after the pick that has not admitted it: the pick is on its way, still counted.
        held.routing_stats = ttft_stats(time.time() + 1, core_admitted=0)
        await pick("h3")
        assert [x.internal_id for x in router._assignments.values() if x.replica_id == held.name][0] == "h1"
        # Now it is in the replica's queue, not in this router's.
        held.routing_stats = ttft_stats(time.time() + 2, running_prefill=3000, num_running=1, core_admitted=1)
        await pick("h4")
        assert "h1" not in [x.internal_id for x in router._assignments.values()]

    asyncio.run(main())


def test_the_routing_calls_time_is_on_the_router_endpoints_metrics() -> None:
    """The length-aware call and its ranking are timed into the process's histograms, which the HAProxy
    router's endpoint serves at GET /metrics (a plain ASGI call, as Serve makes it)."""
    import time

    from fuserve.cluster.ingress_routing import RouteEndpoint
    from fuserve.router.routing_timing import CHOOSE_SECONDS

    router = make_router()
    now = time.time()
    a, b = FakeReplica("a", ttft_stats(now)), FakeReplica("b", ttft_stats(now))
    before = CHOOSE_SECONDS._sum.get()

    async def main() -> bytes:
        await router.choose_replicas([a, b], long_hint("t1"))
        assert router.timer.last_call_s > 0 and router.timer.last_ranking_s > 0
        assert router.timer.last_ranking_s <= router.timer.last_call_s
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(message: dict) -> None:
            sent.append(message)

        endpoint = RouteEndpoint(lambda body, truncated: None)  # type: ignore[arg-type,return-value]
        await endpoint({"type": "http", "method": "GET", "path": "/metrics"}, receive, send)
        assert sent[0]["status"] == 200
        return sent[1]["body"]

    text = asyncio.run(main()).decode()
    assert "fuserve_router_choose_seconds_count" in text and "fuserve_router_ranking_seconds_bucket" in text
    assert CHOOSE_SECONDS._sum.get() > before
