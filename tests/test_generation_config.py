"""The model's generation_config.json: its eos ids stop generation, and its sampling values are the
defaults of requests that leave a setting unset (model.generation_config auto), never overriding one
a request sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoints import make_checkpoint

from fuserve.configs import ModelConfig, config_from_dict
from fuserve.llm import LLM
from fuserve.router.engine_messages import ModelInfo
from fuserve.router.prompts import resolve_max_tokens
from fuserve.router.protocol import ChatCompletionRequest, CompletionRequest
from fuserve.sampling_params import SamplingParams
from fuserve.workers.models.generation_config import FILE_NAME, read_generation_config
from fuserve.workers.models.loader import load_tokenizer, resolve_source

LLAMA31_INSTRUCT = {  # the shape of Llama-3.1-8B-Instruct's file
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.42.3",
}


def write(folder: Path, content: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FILE_NAME).write_text(json.dumps(content))
    return folder


def test_reads_eos_ids_and_the_authors_sampling_defaults(tmp_path: Path) -> None:
    gen = read_generation_config(write(tmp_path, LLAMA31_INSTRUCT))
    assert gen.eos_token_ids == (128001, 128008, 128009)
    assert gen.sampling_defaults == {"temperature": 0.6, "top_p": 0.9}
    # transformers' own defaults are not the author's choice; a single eos id is a list of one
    qwen_like = {"eos_token_id": 7, "top_k": 50, "temperature": 1.0, "repetition_penalty": 1.05, "min_p": 0}
    gen = read_generation_config(write(tmp_path / "q", qwen_like))
    assert gen.eos_token_ids == (7,) and gen.sampling_defaults == {"repetition_penalty": 1.05, "min_p": 0}
    # generation_config none: stop ids still count, sampling defaults do not
    gen = read_generation_config(tmp_path, sampling_defaults=False)
    assert gen.eos_token_ids == (128001, 128008, 128009) and gen.sampling_defaults == {}


def test_no_file_and_bad_files(tmp_path: Path) -> None:
    assert read_generation_config(tmp_path).sampling_defaults == {}
    assert read_generation_config(None).eos_token_ids == ()
    (tmp_path / FILE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        read_generation_config(tmp_path)
    write(tmp_path, {"top_p": 0.0})
    with pytest.raises(ValueError, match=r"top_p.*model.generation_config: none"):
        read_generation_config(tmp_path)
    write(tmp_path, {"top_k": 20.5})
    with pytest.raises(ValueError, match=r"top_k to 20.5, not a whole number.*generation_config: none"):
        read_generation_config(tmp_path)
    write(tmp_path, {"top_k": -1, "top_p": 0.8})  # vLLM's "no top-k" is ours too
    assert read_generation_config(tmp_path).sampling_defaults == {"top_k": 0, "top_p": 0.8}
    write(tmp_path, {"max_new_tokens": 0})
    with pytest.raises(ValueError, match=r"max_new_tokens to 0, not a positive whole number"):
        read_generation_config(tmp_path)
    write(tmp_path, {"max_new_tokens": 256, "eos_token_id": 2})
    assert read_generation_config(tmp_path).max_new_tokens == 256
    assert read_generation_config(tmp_path, sampling_defaults=False).max_new_tokens is None  # `none`


def test_requests_take_model_defaults_only_where_unset() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    unset = CompletionRequest(prompt="hi").sampling_params(8, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.6, 0.9, 20, 1.05)
    assert unset.min_p == 0.0  # the model has no min_p: fuserve's default
    explicit = CompletionRequest(prompt="hi", temperature=0, top_k=0, repetition_penalty=1.0).sampling_params(
        8, defaults
    )
    assert (explicit.temperature, explicit.top_k, explicit.repetition_penalty, explicit.top_p) == (
        0,
        0,
        1.0,
        0.9,
    )
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    params = chat.sampling_params(8, defaults)
    assert params.top_p == 0.5 and params.temperature == 0.6
    plain = CompletionRequest(prompt="hi").sampling_params(8)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def _llm(folder: Path, mode: str = "auto") -> LLM:
    return LLM(
        config_from_dict(
            {
                "model": {"path": str(folder), "max_model_len": 64, "generation_config": mode},
                "cache": {"block_size": 4, "num_blocks": 32},
            }
        )
    )


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_engine_stops_on_generation_config_eos_and_applies_defaults(tmp_path: Path, mode: str) -> None:
    folder = make_checkpoint(tmp_path / "tiny", "llama3", vocab_size=260)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    before = _llm(folder).generate([1, 2, 3], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    tokens = before[0].outputs[0].token_ids
    stop_id = tokens[3]
    first = tokens.index(stop_id)
    write(folder, {"eos_token_id": [259, stop_id], "temperature": 0.0, "top_k": 50, "max_new_tokens": 7})

    llm = _llm(folder, mode)
    out = llm.generate([1, 2, 3], greedy)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == tokens[: first + 1]
    assert (
        llm.generate([1, 2, 3], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
        .outputs[0]
        .token_ids
        == tokens
    )  # ignore_eos still ignores it
    defaults = llm.default_sampling_params()
    assert defaults.top_k == 0  # 50 is transformers' default, not the model's
    assert defaults.temperature == (0.0 if mode == "auto" else 1.0)
    assert defaults.max_tokens == (7 if mode == "auto" else SamplingParams().max_tokens)


def test_tokenizer_stop_ids_join_both_files_without_changing_the_config(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "tiny", "llama3", vocab_size=260)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [258]
    (folder / "config.json").write_text(json.dumps(config))
    write(folder, {"eos_token_id": [259]})
    source = resolve_source(ModelConfig(path=str(folder)))
    for _ in range(2):  # a second tokenizer from the same source sees the same ids
        assert load_tokenizer(source).eos_token_ids == {258, 259}
    assert source.hf_config["eos_token_id"] == [258]


def test_max_new_tokens_caps_requests_that_set_no_max_tokens() -> None:
    info = ModelInfo("m", max_model_len=100, block_size=16, has_tokenizer=True, default_max_tokens=30)
    assert resolve_max_tokens(10, None, info, "messages", "max_tokens") == 30
    assert resolve_max_tokens(80, None, info, "messages", "max_tokens") == 20  # the room left is less
    assert resolve_max_tokens(10, 50, info, "messages", "max_tokens") == 50  # a request's own value wins
    plain = ModelInfo("m", max_model_len=100, block_size=16, has_tokenizer=True)
    assert resolve_max_tokens(10, None, plain, "messages", "max_tokens") == 90
