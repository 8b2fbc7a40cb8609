"""The gRPC API on Ray Serve's gRPC proxy, with a real grpcio client and a tiny Llama."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
from checkpoints import make_checkpoint

from fuserve.configs import config_from_dict
from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.proto import fuserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServeCluster

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def stub(
    serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pb_grpc.GenerationStub]:
    from ray import serve

    from fuserve.cluster import build_app

    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama3", vocab_size=260)
    config = config_from_dict(
        {"model": {"path": str(folder), "name": "tiny", "max_model_len": 256}, "cache": {"num_blocks": 256}}
    )
    serve.run(build_app(config), name="grpc", route_prefix="/grpc")
    with grpc.insecure_channel(f"127.0.0.1:{serve_cluster.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        yield pb_grpc.GenerationStub(channel)


def test_unary_generate(stub: pb_grpc.GenerationStub) -> None:
    request = pb.GenerateRequest(prompt="hello", max_tokens=6, temperature=0.0)
    reply = stub.Generate(request, timeout=TIMEOUT_S)
    assert reply.model == "tiny" and reply.id.startswith("cmpl-")
    (choice,) = reply.choices
    assert len(choice.token_ids) == 6 and choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 6


def test_stream_is_incremental_and_matches_unary(stub: pb_grpc.GenerationStub) -> None:
    request = pb.GenerateRequest(prompt="stream me", max_tokens=16, temperature=0.0, ignore_eos=True)
    whole = stub.Generate(request, timeout=TIMEOUT_S).choices[0]
    messages, arrivals = [], []
    for message in stub.GenerateStream(request, timeout=TIMEOUT_S):
        messages.append(message)
        arrivals.append(time.perf_counter())
    deltas = [m.choices[0] for m in messages if m.choices]
    # One message per engine step, or several steps in one when the path falls behind the engine
    # (tiny model: ~1 ms steps); never the whole answer in one message.
    assert 4 <= len(deltas) <= 16
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == list(whole.token_ids)
    assert deltas[-1].finish_reason == "length"
    assert messages[-1].usage.completion_tokens == 16
    assert arrivals[-1] > arrivals[0]


def test_chat_n_and_logprobs(stub: pb_grpc.GenerationStub) -> None:
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=4, n=2, seed=3, logprobs=2
    )
    reply = stub.Generate(request, timeout=TIMEOUT_S)
    assert reply.id.startswith("chatcmpl-")
    assert [c.index for c in reply.choices] == [0, 1]
    for c in reply.choices:
        assert len(c.logprobs) == 4
        assert all(len(lp.top_token_ids) == 2 and lp.logprob <= 0 for lp in c.logprobs)


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (pb.GenerateRequest(prompt="hi", model="gpt-4"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (pb.GenerateRequest(prompt="x" * 300), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of"),
        (pb.GenerateRequest(prompt="hi", top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ],
)
def test_errors_have_status_codes(
    stub: pb_grpc.GenerationStub, request_: pb.GenerateRequest, code: grpc.StatusCode, fragment: str
) -> None:
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request_, timeout=TIMEOUT_S)
        assert info.value.code() == code
        assert fragment in info.value.details()
    assert stub.Generate(pb.GenerateRequest(prompt="ok", max_tokens=2), timeout=TIMEOUT_S).choices


def test_unset_sampling_fields_stay_unset_for_model_defaults() -> None:
    """proto3 `optional`: a top_k or min_p the client never set takes the model's default; an explicit 0
    (off) does not."""
    from fuserve.router.grpc_service import to_api_request

    defaults = {"top_k": 20, "min_p": 0.05, "temperature": 0.7}
    unset = to_api_request(pb.GenerateRequest(prompt="x")).sampling_params(4, defaults)
    assert (unset.top_k, unset.min_p, unset.temperature) == (20, 0.05, 0.7)
    off = to_api_request(pb.GenerateRequest(prompt="x", top_k=0, min_p=0.0, temperature=1.0))
    params = off.sampling_params(4, defaults)
    assert (params.top_k, params.min_p, params.temperature) == (0, 0.0, 1.0)
