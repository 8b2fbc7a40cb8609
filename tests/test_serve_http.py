"""The OpenAI HTTP API on a real local Ray Serve cluster, over real HTTP (httpx and `openai`).

Applications share one cluster: `one` (1 engine replica of a tiny Llama), `two` (2 replicas,
length-aware router) and, for one test each, `smol` (the default SmolLM2 model), `tight` (tiny queue
limits) and `gen` (the tiny Llama with a generation_config.json). Every HTTP call has a
timeout, so a broken server fails the test instead of hanging CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
from checkpoints import make_checkpoint

from fuserve.configs import FuserveConfig, config_from_dict

if TYPE_CHECKING:
    from conftest import ServeCluster

TIMEOUT = httpx.Timeout(60.0)
MAX_MODEL_LEN = 2048


def tiny_config(folder: Path, replicas: int, **serve_opts: object) -> FuserveConfig:
    return config_from_dict(
        {
            "model": {"path": str(folder), "name": "tiny", "max_model_len": MAX_MODEL_LEN},
            "cache": {"num_blocks": 512},
            "serve": {"num_replicas": replicas, "num_cpus_per_replica": 1.0, **serve_opts},
        }
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # vocab 260 = the byte tokenizer's 259 tokens: every sampled token has text
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    return make_checkpoint(ckpt, "llama3", max_position_embeddings=MAX_MODEL_LEN, vocab_size=260)


@pytest.fixture(scope="module")
def cluster(serve_cluster: ServeCluster, folder: Path) -> ServeCluster:
    from ray import serve

    from fuserve.cluster import build_app

    serve.run(build_app(tiny_config(folder, 1)), name="one", route_prefix="/one")
    serve.run(build_app(tiny_config(folder, 2)), name="two", route_prefix="/two")
    return serve_cluster


@pytest.fixture(scope="module")
def one(cluster: ServeCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{cluster.url}/one", timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def two(cluster: ServeCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{cluster.url}/two", timeout=TIMEOUT) as client:
        yield client


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: ") :]))
    return events


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over the series that match `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


# ---- the API ----------------------------------------------------------------------------------------
def test_completion_and_chat_shapes(one: httpx.Client) -> None:
    r = one.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": body["usage"]["prompt_tokens_details"]["cached_tokens"]},
    }
    r = one.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 4
    models = one.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert one.get("/health").json()["status"] == "ok"


def test_streaming_is_incremental_and_matches_non_stream(one: httpx.Client) -> None:
    req = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = one.post("/v1/completions", json=req).json()["choices"][0]["text"]
    arrivals: list[float] = []
    texts: list[str] = []
    stream_req = {**req, "stream": True, "stream_options": {"include_usage": True}}
    with one.stream("POST", "/v1/completions", json=stream_req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        # the replica's share of this request's time to first token, for benchmarks: each part is a
        # duration, and admission plus the engine core fit inside arrival-to-response
        admit, core, replica = map(float, r.headers["x-fuserve-ttft-parts-ms"].split(","))
        assert 0 <= admit and 0 < core and admit + core <= replica
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                arrivals.append(time.perf_counter())
                if event["choices"]:
                    texts.append(event["choices"][0]["text"])
                else:
                    usage = event["usage"]
    assert "".join(texts) == whole
    assert len(texts) >= 12, "tokens must arrive as separate events, not in one batch"
    assert arrivals[-1] - arrivals[0] > 0, "events all arrived at once"
    assert usage["completion_tokens"] == 24

    # Chat: a role chunk first, then content deltas; the concatenation equals the whole answer.
    chat = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 16, "temperature": 0}
    whole_chat = one.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    with one.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == whole_chat
    assert events[-1]["usage"]["completion_tokens"] == 16, (
        "without include_usage the last chunk carries usage"
    )


def test_n_seed_stop_and_logprobs(one: httpx.Client) -> None:
    r = one.post(
        "/v1/completions", json={"prompt": "abc", "n": 3, "max_tokens": 6, "seed": 7, "ignore_eos": True}
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 18
    again = one.post(
        "/v1/completions", json={"prompt": "abc", "n": 3, "max_tokens": 6, "seed": 7, "ignore_eos": True}
    )
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in body["choices"]], "seeded"

    greedy = {"prompt": "stop here", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    text = one.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stopped = one.post("/v1/completions", json={**greedy, "stop": [stop]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[: text.index(stop)]

    lp = one.post("/v1/completions", json={**greedy, "max_tokens": 5, "logprobs": 2}).json()
    logprobs = lp["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == 5
    assert all(v <= 0 for v in logprobs["token_logprobs"])
    assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])


def test_several_prompts_in_one_request(two: httpx.Client) -> None:
    """One HTTP request, three engine requests (possibly on both replicas), n=2 each: 6 choices."""
    body = {"prompt": ["first", "second prompt", "third"], "n": 2, "max_tokens": 3, "ignore_eos": True}
    r = two.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert r.json()["usage"]["completion_tokens"] == 18
    with two.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = sse_events(s)
    finished = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"])
    assert finished == list(range(6))


def test_openai_client_works_unchanged(cluster: ServeCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/one/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert chat.usage.completion_tokens == 6
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 6
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hello", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model="tiny", prompt="x" * (MAX_MODEL_LEN + 10), max_tokens=3)


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        (b'{"prompt": "hi", ', 400, None, "not valid JSON"),
        (b'["not", "an", "object"]', 400, None, "JSON object"),
        (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), 400, "max_tokens", "integer"),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt", "prompt"),
        (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400, "max_tokens", "greater than or equal"),
        (json.dumps({"prompt": "hi", "top_p": 1.5}).encode(), 400, "top_p", "less than or equal"),
        (json.dumps({"prompt": "hi", "model": "nope"}).encode(), 404, "model", "does not exist"),
        (json.dumps({"prompt": "x" * (MAX_MODEL_LEN + 5)}).encode(), 400, "prompt", "max_model_len"),
        (
            json.dumps({"prompt": "hi", "max_tokens": MAX_MODEL_LEN}).encode(),
            400,
            "max_tokens",
            "max_model_len",
        ),
        (json.dumps({"prompt": "hi", "logit_bias": {"1": 200}}).encode(), 400, "logit_bias", "[-100, 100]"),
    ],
)
def test_bad_requests_get_openai_errors(
    one: httpx.Client, body: bytes, status: int, param: str, fragment: str
) -> None:
    r = one.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and fragment in error["message"]
    assert one.post("/v1/completions", json={"prompt": "still ok", "max_tokens": 2}).status_code == 200


def test_chat_wrong_types(one: httpx.Client) -> None:
    r = one.post("/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = one.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["param"]


def test_hundred_concurrent_requests_all_complete(cluster: ServeCluster) -> None:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"{cluster.url}/one", timeout=TIMEOUT) as client:
            calls = [
                client.post(
                    "/v1/completions", json={"prompt": f"request {i}", "max_tokens": 8, "ignore_eos": True}
                )
                for i in range(100)
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 100
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)


def test_disconnect_mid_stream_frees_blocks(one: httpx.Client) -> None:
    def engine() -> tuple[float, float, float]:
        text = one.get("/metrics").text
        return (
            metric(text, "fuserve_engine_num_requests_running"),
            metric(text, "fuserve_engine_kv_cache_free_blocks"),
            metric(text, "fuserve_requests_total", status="cancelled"),
        )

    _, all_free, cancelled = engine()
    req = {"prompt": "a long story", "max_tokens": MAX_MODEL_LEN - 20, "ignore_eos": True, "stream": True}
    with one.stream("POST", "/v1/completions", json=req) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        started = time.perf_counter()
        running, free, _ = engine()
        assert running == 1 and free < all_free, "the request should hold blocks while it runs"
    # The client is gone: within a short time the engine must have aborted the request.
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:
        running, free, now_cancelled = engine()
        if running == 0 and free == all_free:
            break
        time.sleep(0.1)
    assert running == 0 and free == all_free, "the aborted request kept its KV blocks"
    assert now_cancelled == cancelled + 1
    assert time.perf_counter() - started < 10


def test_metrics_report_requests_tokens_and_latency(one: httpx.Client) -> None:
    one.post("/v1/completions", json={"prompt": "metrics", "max_tokens": 4, "ignore_eos": True})
    text = one.get("/metrics").text
    assert metric(text, "fuserve_requests_total", endpoint="completions", status="200") >= 1
    assert metric(text, "fuserve_generation_tokens_total") >= 4
    assert metric(text, "fuserve_prompt_tokens_total") > 0
    assert metric(text, "fuserve_time_to_first_token_seconds_count") >= 1
    assert metric(text, "fuserve_inter_token_latency_seconds_count") >= 3
    # where the first token's time went inside the replica: every request, every part
    admitted = metric(text, "fuserve_frontend_admit_seconds_count")
    assert admitted >= 1 and metric(text, "fuserve_engine_core_first_token_seconds_count") == admitted
    assert metric(text, "fuserve_engine_core_first_token_seconds_sum") > 0
    # one per step message that reached the stream; a stream that fell behind gets steps merged (this
    # failed now and then on the 2-core box with >= 4 for 4 tokens), so at least one, not one per token
    assert metric(text, "fuserve_frontend_emit_seconds_count") >= 1
    for name in [
        "fuserve_engine_num_requests_waiting",
        "fuserve_engine_kv_cache_usage_ratio",
        "fuserve_engine_preemptions_total",
        "fuserve_engine_prefix_cache_hit_tokens_total",
    ]:
        assert re.search(rf"^{name}\{{replica=", text, re.M), name
    # a step's host work and its wait for the device, and the steps that carried prefill
    steps = metric(text, "fuserve_engine_steps_total")
    assert 0 < metric(text, "fuserve_engine_prefill_steps_total") <= steps
    wait, step_s = (
        metric(text, "fuserve_engine_device_wait_seconds_total"),
        metric(text, "fuserve_engine_step_seconds_total"),
    )
    assert 0 <= wait <= step_s and metric(text, "fuserve_engine_prefill_step_seconds_total") <= step_s


def test_overload_gets_429_and_the_server_recovers(cluster: ServeCluster, folder: Path) -> None:
    """One engine slot and one queue place: of five simultaneous requests, the excess is refused at
    once with an OpenAI-shaped 429 instead of waiting unseen."""
    from ray import serve

    from fuserve.cluster import build_app

    serve.run(
        build_app(tiny_config(folder, 1, max_ongoing_requests=1, max_queued_requests=1)),
        name="tight",
        route_prefix="/tight",
    )
    try:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=f"{cluster.url}/tight", timeout=TIMEOUT) as client:
                body = {"prompt": "busy", "max_tokens": 300, "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(5)))

        statuses = [r.status_code for r in asyncio.run(burst())]
        assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
        refused = next(r for r in asyncio.run(burst()) if r.status_code == 429).json()["error"]
        assert refused["code"] == "overloaded" and "retry" in refused["message"]
        with httpx.Client(base_url=f"{cluster.url}/tight", timeout=TIMEOUT) as client:
            assert (
                client.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200
            )
    finally:
        serve.delete("tight")


def test_engine_failures_map_to_status_codes() -> None:
    from fuserve.core_messages import EngineDeadError
    from fuserve.router.engine_client import api_error
    from fuserve.router.errors import overloaded
    from fuserve.sampling_params import RequestError

    assert api_error(overloaded("full")).status == 429
    assert api_error(EngineDeadError("the engine failed")).status == 503
    assert api_error(RequestError("top_k must be >= 0")).status == 400
    assert api_error(KeyError("bug")).status == 500


def test_model_generation_config_sets_unset_sampling(
    cluster: ServeCluster, one: httpx.Client, folder: Path, tmp_path: Path
) -> None:
    """A model whose generation_config.json says temperature 0: requests that leave temperature unset
    are greedy (any seed gives the same text), one that sets it samples as on a model without the file;
    its max_new_tokens caps a chat request that sets no max_tokens."""
    import shutil

    from ray import serve

    from fuserve.cluster import build_app

    greedy_folder = tmp_path / "tiny"
    shutil.copytree(folder, greedy_folder)
    (greedy_folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.0, "do_sample": False, "max_new_tokens": 5})
    )
    serve.run(build_app(tiny_config(greedy_folder, 1)), name="gen", route_prefix="/gen")
    try:
        body = {"prompt": "defaults", "max_tokens": 12, "ignore_eos": True}
        with httpx.Client(base_url=f"{cluster.url}/gen", timeout=TIMEOUT) as gen:
            texts = {
                gen.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"]
                for s in (1, 2)
            }
            sampled = gen.post("/v1/completions", json={**body, "seed": 3, "temperature": 1.0}).json()
            chat = gen.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True},
            ).json()
        # a chat request without max_tokens stops at the file's max_new_tokens, not at the context's end
        assert chat["usage"]["completion_tokens"] == 5 and chat["choices"][0]["finish_reason"] == "length"
        greedy = one.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
        assert texts == {greedy}
        same_seed = one.post("/v1/completions", json={**body, "seed": 3}).json()
        assert sampled["choices"][0]["text"] == same_seed["choices"][0]["text"] != greedy
    finally:
        serve.delete("gen")


# ---- the default model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_answers_paris(cluster: ServeCluster) -> None:
    from ray import serve

    from fuserve.cluster import build_app
    from fuserve.configs import load_config

    serve.run(
        build_app(load_config(Path(__file__).parents[1] / "configs" / "default.yaml")),
        name="smol",
        route_prefix="/smol",
    )
    try:
        client = openai.OpenAI(
            base_url=f"{cluster.url}/smol/v1", api_key="unused", timeout=120, max_retries=0
        )
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
    finally:
        serve.delete("smol")


def test_tensor_parallel_replica_answers_over_http(cluster: ServeCluster, folder: Path) -> None:
    """TP=2 on CPU (gloo): the engine core, a process of the replica's and no Ray worker, joins the
    cluster and starts rank 1 in the replica's placement group; greedy output equals TP=1's. Then rank
    1's process is killed mid-stream: the stream ends with an error event within seconds, naming no
    internals, and the replica stops answering as healthy."""
    import psutil
    from ray import serve

    from fuserve.cluster import build_app

    config = tiny_config(folder, 1)
    config.parallel.tensor_parallel_size = 2
    serve.run(build_app(config), name="tp2", route_prefix="/tp2")
    try:
        body = {"prompt": "tensor parallel", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=cluster.url, timeout=TIMEOUT) as client:
            tp2 = client.post("/tp2/v1/completions", json=body)
            tp1 = client.post("/one/v1/completions", json=body)
        assert tp2.status_code == 200, tp2.text
        assert tp2.json()["choices"][0]["text"] == tp1.json()["choices"][0]["text"]
        # Ray titles an actor's process after its class
        (rank1,) = [
            p for p in psutil.process_iter(["cmdline"]) if "TPWorker" in " ".join(p.info["cmdline"] or [])
        ]
        long = {"prompt": "a long one", "max_tokens": MAX_MODEL_LEN - 20, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=cluster.url, timeout=TIMEOUT) as client:
            core_pid = client.get("/tp2/health").json()["engine_core_pid"]
            with client.stream("POST", "/tp2/v1/completions", json=long) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: {")
                os.kill(rank1.pid, signal.SIGKILL)
                killed_at = time.perf_counter()
                rest = [line for line in lines if line.startswith("data: ")]
            took = time.perf_counter() - killed_at
            errors = [json.loads(line[6:])["error"] for line in rest if '"error"' in line]
            assert errors and rest[-1] == "data: [DONE]", rest[-3:]
            assert took < 10, f"the stream took {took:.1f} s to end after rank 1 died"
            assert str(rank1.pid) not in errors[0]["message"]
            health = client.get("/tp2/health")  # unhealthy, or already a new replica with a new core
            assert health.status_code == 503 or health.json()["engine_core_pid"] != core_pid, health.text
    finally:
        serve.delete("tp2")
