"""Admission control and deadlines in the replica's frontend, against a real engine-core process.

- Prompt tokens waiting for prefill are bounded: past the bound a request is refused with a 429 at
  once (deterministic here: requests opened together, before any first token); one request is always
  admitted when nothing waits; once the first tokens come the bound frees up.
- A request past its deadline fails with a 408 and its abort frees every KV block in the core.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from checkpoints import make_checkpoint

from fuserve import SamplingParams
from fuserve.configs import FuserveConfig, config_from_dict
from fuserve.router.core_client import EngineCoreClient
from fuserve.router.engine_client import EngineClient, EngineStreams
from fuserve.router.engine_messages import EngineRequest
from fuserve.router.errors import APIError
from fuserve.router.frontend import prefill_token_limit
from fuserve.router.metrics import ServingMetrics

NUM_BLOCKS = 128


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> FuserveConfig:
    folder = make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "llama", "llama3", vocab_size=260, max_position_embeddings=2048
    )
    return config_from_dict(
        {"model": {"path": str(folder), "max_model_len": 2048}, "cache": {"num_blocks": NUM_BLOCKS}}
    )


def request(rid: str, num_prompt: int, max_tokens: int) -> EngineRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(rid, [3 + i % 200 for i in range(num_prompt)], params, work_tokens=0)


def test_the_prefill_bound_defaults_to_the_kv_capacity() -> None:
    serve = config_from_dict({}).serve
    assert prefill_token_limit(serve, 4096) == 4096
    serve.max_queued_prefill_tokens = 100
    assert prefill_token_limit(serve, 4096) == 100
    serve.max_queued_prefill_tokens = -1
    assert prefill_token_limit(serve, 4096) is None


async def _drain(streams: EngineStreams) -> int:
    n = 0
    try:
        async for _, batch in streams:
            n += sum(len(d.token_ids) for d in batch)
    finally:
        await streams.close()
    return n


def test_queued_prefill_tokens_are_bounded_and_deadlines_free_blocks(config: FuserveConfig) -> None:
    async def main() -> None:
        core = EngineCoreClient(config, None)
        try:
            await core.start(120)
            client = EngineClient(core, ServingMetrics(), max_open=None, max_queued_prefill_tokens=100)
            burst = [request(f"p{i}", 60, 4) for i in range(3)]
            opened = await asyncio.gather(
                *(client.open([r], time.perf_counter()) for r in burst), return_exceptions=True
            )
            assert isinstance(opened[0], EngineStreams), opened[0]  # nothing waited: admitted
            for refused in opened[1:]:
                assert isinstance(refused, APIError) and refused.status == 429, refused
                assert "60 prompt tokens wait for prefill" in refused.message
            assert client.queued_prefill_tokens == 0  # the first token came: nothing waits now
            big = await client.open([request("big", 500, 2)], time.perf_counter())  # over the bound, alone
            assert await _drain(opened[0]) == 4 and await _drain(big) == 2

            # a deadline: the request fails with a 408 and the core gets its blocks back
            started = time.perf_counter()
            with pytest.raises(APIError) as info:  # before or after its first token, on a loaded box
                await _drain(await client.open([request("slow", 20, 2000)], started, timeout_s=0.3))
            assert info.value.status == 408 and info.value.code == "deadline_exceeded"
            assert time.perf_counter() - started < 5
            deadline = time.monotonic() + 10
            while core.stats.num_free_blocks != NUM_BLOCKS and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert core.stats.num_free_blocks == NUM_BLOCKS and core.stats.num_running == 0
            assert client.num_open == 0
        finally:
            core.shutdown()

    asyncio.run(main())


def test_a_replica_without_uvloop_or_httptools_says_how_to_get_them(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib.util

    from fuserve.router.ingress import warn_if_slow_http_path

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    with caplog.at_level("WARNING", logger="fuserve.router"):
        assert warn_if_slow_http_path() == ["uvloop"]
    assert "uvicorn[standard]" in caplog.text
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert warn_if_slow_http_path() == []  # the test environment has both, as users do
