"""The served app under attack and load, over real HTTP and gRPC on one local Ray cluster.

- Fuzz: hypothesis bodies for /v1/completions and /v1/chat/completions (wrong types, extreme and
  non-finite numbers, lone surrogates, deep nesting, bytes that are not UTF-8): never a 5xx, every
  response carries x-request-id, the server is healthy after, and no KV block is left taken.
- Soak: two replicas, a few hundred mixed requests (chat and completions, streamed or not, n=1..2)
  with about a third cancelled at random: every other request completes in full, and every replica's
  free blocks come back to its total.
- Overload: a burst past the admission bound gets 429s with Retry-After while the admitted requests
  finish within their deadline; a request past its own `timeout` is stopped and its blocks freed.
- Auth: 401 without the API key, 200 with it, over HTTP and gRPC.

Two applications: "sturdy" (two open replicas) and "guarded" (one replica with an API key and tight
admission limits). CI time: about 60 s on a 2-core box, most of it starting Ray and three replicas.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from checkpoints import make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuserve.configs import config_from_dict
from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.proto import fuserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServeCluster

MAX_MODEL_LEN = 512  # short, so that whatever a fuzzed request asks for ends soon
NUM_BLOCKS = 256
API_KEY = "test-key-4f1c"
TIMEOUT = httpx.Timeout(60.0)


def _config(folder: Path, **serve: Any) -> Any:
    return config_from_dict(
        {
            "model": {"path": str(folder), "name": "tiny", "max_model_len": MAX_MODEL_LEN},
            "cache": {"num_blocks": NUM_BLOCKS},
            "serve": {"num_cpus_per_replica": 0.5, **serve},
        }
    )


@pytest.fixture(scope="module")
def apps(serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeCluster]:
    from ray import serve

    from fuserve.cluster import build_app

    folder = make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny",
        "llama3",
        max_position_embeddings=MAX_MODEL_LEN,
        vocab_size=260,
    )
    sturdy = _config(folder, num_replicas=2, max_request_bytes=65536, request_timeout_s=20)
    guarded = _config(
        folder,
        api_keys=[API_KEY],
        max_ongoing_requests=3,
        max_queued_requests=3,
        max_queued_prefill_tokens=1000,
        request_timeout_s=30,
    )
    serve.run(build_app(sturdy), name="sturdy", route_prefix="/sturdy")
    serve.run(build_app(guarded), name="guarded", route_prefix="/guarded")
    try:
        yield serve_cluster
    finally:
        serve.delete("sturdy")
        serve.delete("guarded")


@pytest.fixture(scope="module")
def sturdy(apps: ServeCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{apps.url}/sturdy", timeout=TIMEOUT) as client:
        yield client


def _metric(text: str, name: str) -> dict[str, float]:
    """{replica id: value} of one per-replica gauge in a /metrics page."""
    return {m[0]: float(m[1]) for m in re.findall(rf'^{name}\{{replica="([^"]+)"\}} (\S+)$', text, re.M)}


def assert_blocks_all_free(
    client: httpx.Client, replicas: int, within_s: float = 20.0, **headers: str
) -> None:
    """Asks /metrics (each answer describes the replica that answers) until every replica has been
    seen idle with all its KV blocks free."""
    idle: set[str] = set()
    seen: dict[str, tuple[float, float]] = {}
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and len(idle) < replicas:
        text = client.get("/metrics", headers=headers).text
        free = _metric(text, "fuserve_engine_kv_cache_free_blocks")
        running = _metric(text, "fuserve_engine_num_requests_running")
        for rid, value in free.items():
            seen[rid] = (value, running[rid])
            if value == NUM_BLOCKS and running[rid] == 0:
                idle.add(rid)
        time.sleep(0.05)
    assert len(idle) == replicas, f"free blocks, running per replica: {seen}"


# ---- fuzz -------------------------------------------------------------------------------------------
# Requests the API accepts, with values at the edges of their ranges (tiny temperatures, int64 seeds,
# surrogates in text), then 0-2 fields swapped for anything at all; and raw bodies.
_text = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["\udc80", "a\ud800b", "\x00", "\ufffd", "<|im_end|>", "\U0001f600", "x" * 3000]),
)
_number = st.one_of(
    st.integers(min_value=-3, max_value=24),
    st.sampled_from([10**20, -(10**20), 2**31, 2**63, 2**64, 1e308, 1e-300, 1e-40, 1e-6, 2.0000001, -0.0]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)
_json = st.recursive(
    st.none() | st.booleans() | _number | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_value = st.one_of(_number, _text, _json)
_token_ids = st.lists(st.integers(0, 259), min_size=1, max_size=6)
_edge_float = st.sampled_from([0.0, 1e-300, 1e-40, 1e-5, 1e-3, 0.5, 1.0, 2.0])
_valid = {
    "n": st.integers(1, 3),
    "temperature": _edge_float,
    "top_p": st.sampled_from([1e-300, 1e-6, 0.5, 1.0]),
    "top_k": st.sampled_from([0, 1, 5, 2**31 - 1]),
    "min_p": st.sampled_from([0.0, 0.5, 1.0]),
    "seed": st.sampled_from([0, -1, 2**63 - 1, -(2**63)]),
    "stop": st.one_of(_text.filter(bool), st.lists(_text.filter(bool), max_size=3)),
    "stream": st.booleans(),
    "presence_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "frequency_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "repetition_penalty": st.sampled_from([1e-3, 0.5, 1.0, 1e3]),
    "stop_token_ids": st.lists(st.integers(0, 2**31 - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "timeout": st.sampled_from([1e-9, 0.05, 30.0]),
    "user": _text,
}
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer"]),
        "content": st.one_of(_text, st.just([{"type": "text", "text": "part \udc80"}])),
    }
)
_completion = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            _text.filter(bool), _token_ids, st.lists(_text.filter(bool), min_size=1, max_size=3)
        ),
        "max_tokens": st.integers(1, 12),
    },
    optional={**_valid, "logprobs": st.integers(0, 5), "echo": st.just(False)},
)
_chat = st.fixed_dictionaries(
    {"messages": st.lists(_message, min_size=1, max_size=3), "max_tokens": st.integers(1, 12)},
    optional={**_valid, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)},
)


@st.composite
def _mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict]) -> bytes:
    body = draw(valid)
    names = sorted({*body, "prompt", "messages", "max_tokens", "n", "temperature", "seed", "stop", "tools"})
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        body[name] = draw(_value)
    if body.get("max_tokens") is None:  # null means "up to max_model_len": slow, and no test of anything
        body["max_tokens"] = 4
    return json.dumps(body).encode()


_raw = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"\xff\xfe\x00",
            b'{"prompt": "\xc3\x28"}',
            b"[" * 5000,
            b'{"prompt": NaN}',
            b'{"prompt": "hi", "n": 1e999}',
        ]
    ),
)
_request = st.one_of(
    st.tuples(st.just("/v1/completions"), _mutated(_completion)),
    st.tuples(st.just("/v1/chat/completions"), _mutated(_chat)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), _raw),
)


def _check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert re.fullmatch(r"[\w-]+", r.headers.get("x-request-id", "")), dict(r.headers)  # one id
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        for e in events[:-1]:
            body = json.loads(e)  # strict JSON: no NaN, no Infinity
            assert body.get("error", {}).get("type") not in ("internal_error",), body
    else:
        json.loads(r.text)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(request=_request)
def test_fuzzed_bodies_never_get_a_5xx(sturdy: httpx.Client, request: tuple[str, bytes]) -> None:
    path, body = request
    _check_answer(sturdy.post(path, content=body, headers={"content-type": "application/json"}))


def test_after_the_fuzz_the_server_is_healthy_and_holds_no_blocks(sturdy: httpx.Client) -> None:
    assert sturdy.get("/health").status_code == 200
    r = sturdy.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert_blocks_all_free(sturdy, replicas=2)


def test_oversized_bodies_get_413_with_a_request_id(sturdy: httpx.Client) -> None:
    r = sturdy.post("/v1/completions", json={"prompt": "x" * 70_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert re.fullmatch(r"[\w-]+", r.headers["x-request-id"])


# ---- soak -------------------------------------------------------------------------------------------
async def _soak_one(client: httpx.AsyncClient, i: int, rng: random.Random) -> str:
    chat, stream, n = rng.random() < 0.5, rng.random() < 0.5, rng.choice([1, 1, 2])
    max_tokens, cancel = rng.randint(1, 24), rng.random() < 0.33
    body: dict[str, Any] = {"max_tokens": max_tokens, "n": n, "ignore_eos": True, "seed": i}
    body["temperature"] = rng.choice([0.0, 0.8])
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"soak {i}"}]
    else:
        path, body["prompt"] = "/v1/completions", f"soak request {i} " * rng.randint(1, 16)
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
        cut = rng.randint(1, 6)
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if cancel and len(events) >= cut:
                        return "cancelled"  # leaving the block closes the connection mid-stream
        assert events[-1] == "[DONE]", events[-2:]
        usage = json.loads(events[-2])["usage"]
    else:
        send = client.post(path, json=body)
        if cancel:
            try:
                r = await asyncio.wait_for(send, timeout=rng.uniform(0.005, 0.15))
            except asyncio.TimeoutError:
                return "cancelled"
        else:
            r = await send
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
    assert usage["completion_tokens"] == n * max_tokens, (body, usage)
    return "completed"


def test_soak_with_random_cancels_leaks_no_blocks(apps: ServeCluster, sturdy: httpx.Client) -> None:
    rng = random.Random(20)

    async def main() -> list[str]:
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=f"{apps.url}/sturdy", timeout=TIMEOUT) as client:

            async def limited(i: int) -> str:
                async with gate:
                    return await _soak_one(client, i, rng)

            return await asyncio.gather(*(limited(i) for i in range(240)))

    started = time.monotonic()
    outcomes = asyncio.run(main())
    print(f"soak: {outcomes.count('completed')} completed, {outcomes.count('cancelled')} cancelled "
          f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    assert outcomes.count("completed") >= 120 and outcomes.count("cancelled") >= 40, outcomes
    assert_blocks_all_free(sturdy, replicas=2)


# ---- deadlines and overload -------------------------------------------------------------------------
def test_a_request_past_its_timeout_is_stopped_and_frees_its_blocks(sturdy: httpx.Client) -> None:
    long = {"max_tokens": MAX_MODEL_LEN - 32, "ignore_eos": True, "timeout": 0.2}
    started = time.monotonic()
    r = sturdy.post("/v1/completions", json={**long, "prompt": "go on"})
    assert r.status_code == 408 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    print(f"deadline 0.2 s: 408 after {time.monotonic() - started:.2f} s")
    assert time.monotonic() - started < 5
    chat = {**long, "stream": True, "messages": [{"role": "user", "content": "go on"}]}
    with sturdy.stream("POST", "/v1/chat/completions", json=chat) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    assert_blocks_all_free(sturdy, replicas=2)


def test_a_burst_past_the_bound_gets_429_while_admitted_requests_finish(apps: ServeCluster) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}

    async def burst() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=f"{apps.url}/guarded", timeout=TIMEOUT, headers=headers) as c:

            async def one(i: int) -> tuple[httpx.Response, float]:
                body = {"prompt": f"burst {i} " * 36, "max_tokens": 64, "ignore_eos": True}
                t0 = time.monotonic()
                r = await c.post("/v1/completions", json=body)
                return r, time.monotonic() - t0

            return await asyncio.gather(*(one(i) for i in range(24)))

    results = asyncio.run(burst())
    statuses = [r.status_code for r, _ in results]
    slowest = max(took for r, took in results if r.status_code == 200)
    print(f"burst: {statuses.count(200)} admitted (slowest {slowest:.2f} s), {statuses.count(429)} refused")
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 6 and statuses.count(200) >= 3, statuses
    for r, took in results:
        assert r.headers["x-request-id"]
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 64 and took < 30  # its deadline
    with httpx.Client(base_url=f"{apps.url}/guarded", timeout=TIMEOUT) as client:
        assert_blocks_all_free(client, replicas=1, **headers)


# ---- API keys ---------------------------------------------------------------------------------------
def test_http_needs_the_api_key(apps: ServeCluster) -> None:
    body = {"prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=f"{apps.url}/guarded", timeout=TIMEOUT) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
            r = client.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
            assert r.json()["error"]["type"] == "authentication_error" and API_KEY not in r.text
            assert client.get("/v1/models", headers=headers).status_code == 401
            assert client.get("/metrics", headers=headers).status_code == 401
        assert client.get("/health").status_code == 200  # probes need no key
        good = {"authorization": f"Bearer {API_KEY}"}
        assert client.post("/v1/completions", json=body, headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).json()["data"][0]["id"] == "tiny"


def test_grpc_needs_the_api_key(apps: ServeCluster) -> None:
    request = pb.GenerateRequest(prompt="hi", max_tokens=3, temperature=0.0)
    with grpc.insecure_channel(f"127.0.0.1:{apps.grpc_port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, metadata=(("application", "guarded"), *metadata), timeout=60)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
                assert API_KEY not in (info.value.details() or "")
        good = (("application", "guarded"), ("authorization", f"Bearer {API_KEY}"))
        reply = stub.Generate(request, metadata=good, timeout=60)
        assert len(reply.choices[0].token_ids) == 3
        streamed = list(stub.GenerateStream(request, metadata=good, timeout=60))
        assert sum(len(m.choices[0].token_ids) for m in streamed if m.choices) == 3


# ---- faults (last: it kills one of sturdy's engine cores) ------------------------------------------
def test_a_dead_engine_core_drops_out_of_metrics_and_routing_within_seconds(sturdy: httpx.Client) -> None:
    """With two replicas, the one whose engine core died reports itself unhealthy at once, the
    length-aware router stops sending it requests (/metrics included) within a report period, and
    requests keep succeeding on the other, long before Serve's health checks replace it."""
    import os
    import signal

    health = sturdy.get("/health").json()
    dead, pid = health["replica"], health["engine_core_pid"]
    os.kill(pid, signal.SIGKILL)
    killed_at, clean_in_a_row = time.monotonic(), 0
    while clean_in_a_row < 10:
        assert time.monotonic() - killed_at < 5, "the dead replica is still routed to after 5 s"
        r = sturdy.get("/metrics")
        healthy = _metric(r.text, "fuserve_engine_healthy")
        clean_in_a_row = clean_in_a_row + 1 if dead not in healthy and list(healthy.values()) == [1.0] else 0
        time.sleep(0.05)
    gone_s = time.monotonic() - killed_at
    for _ in range(5):
        r = sturdy.post("/v1/completions", json={"prompt": "on the other one", "max_tokens": 3})
        assert r.status_code == 200 and dead not in r.headers["x-fuserve-replica"], r.text
    print(f"dead replica out of /metrics and routing {gone_s:.2f} s after the kill")
