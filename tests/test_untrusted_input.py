"""What an attacker or an unlucky client can send, checked below the HTTP layer (fast, no Ray).

Each case here was a 500, a crash or a silently wrong answer before (issue 20's fuzz): bodies that are
not UTF-8, nested past the recursion limit, with NaN/Infinity or numbers of thousands of digits, lone
surrogates that crashed the tokenizer, numbers too large for the engine core's message encoding, and a
tiny temperature whose logits overflowed into NaN (an empty completion where greedy answers).
"""

from __future__ import annotations

import json
import math

import pytest
from checkpoints import make_checkpoint
from pydantic import ValidationError

from fuserve import LLM, RequestError, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.router.api_keys import ApiKeys, with_env_api_keys
from fuserve.router.errors import APIError
from fuserve.router.protocol import ChatCompletionRequest, CompletionRequest
from fuserve.router.request_body import MAX_DEPTH, parse_json_object
from fuserve.router.responses import MIN_LOGPROB, finite_logprob


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nests more than"),
        (b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "nests more than"),
        (b'{"prompt": "hi", "temperature": NaN}', "not a finite JSON number"),
        (b'{"prompt": "hi", "temperature": -Infinity}', "not a finite JSON number"),
        (b'{"prompt": "hi", "temperature": 1e400}', "not a finite JSON number"),
        (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "thousands of digits"),
        (b'{"prompt": "hi", ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'"a string"', "JSON object"),
    ],
)
def test_bad_bodies_are_400s_that_say_why(body: bytes, fragment: str) -> None:
    with pytest.raises(APIError) as info:
        parse_json_object(body)
    assert info.value.status == 400 and fragment in info.value.message


def test_lone_surrogates_become_replacement_characters_everywhere() -> None:
    body = json.dumps({"prompt": "a\udc80b", "stop": ["\ud800"], "\udfff": 1, "ok": "caf\u00e9 \U0001f600"})
    data = parse_json_object(body.encode())
    assert data["prompt"] == "a\ufffdb" and data["stop"] == ["\ufffd"] and "\ufffd" in data
    assert data["ok"] == "caf\u00e9 \U0001f600"  # a valid pair (escaped in JSON) is one character, kept
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # encodable: what the response encoder needs


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": 2**64},
        {"top_k": 2**40},
        {"prompt": [1, 2**40]},
        {"prompt": [[1], [-1]]},
        {"stop_token_ids": [2**63]},
        {"repetition_penalty": 1e-30},
        {"repetition_penalty": 1e30},
        {"timeout": 0},
    ],
)
def test_numbers_out_of_the_engines_range_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "hi", **fields})


def test_sampling_params_refuse_non_finite_and_overflowing_values() -> None:
    for name in ("temperature", "top_p", "presence_penalty", "repetition_penalty"):
        with pytest.raises(RequestError, match=f"{name} must be a finite number"):
            SamplingParams(**{name: math.nan})
    with pytest.raises(RequestError, match=r"repetition_penalty must be in \[0.001, 1000\]"):
        SamplingParams(repetition_penalty=1e-20)
    assert SamplingParams(temperature=1e-30).greedy and not SamplingParams(temperature=0.01).greedy


def test_logprobs_in_responses_are_finite_json_numbers() -> None:
    assert finite_logprob(-math.inf) == MIN_LOGPROB and finite_logprob(math.nan) == MIN_LOGPROB
    assert finite_logprob(-0.5) == -0.5


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama3", vocab_size=260)
    return LLM(config_from_dict({"model": {"path": str(folder), "max_model_len": 128}}))


def test_tiny_temperature_answers_as_greedy_does(llm: LLM) -> None:
    """A temperature of 1e-40 overflowed logits / T to inf, softmax to NaN, and the draw to token 0."""
    greedy = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for t in (1e-300, 1e-40, 1e-8):
        tiny = llm.generate("hello", SamplingParams(temperature=t, max_tokens=12, ignore_eos=True, seed=1))
        assert tiny[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    sampled = llm.generate(
        "hello", SamplingParams(temperature=1e-5, max_tokens=12, ignore_eos=True, seed=1, logprobs=2)
    )
    out = sampled[0].outputs[0]
    assert len(out.token_ids) == 12
    assert all(math.isfinite(lp.logprob) for lp in out.logprobs)


def test_surrogates_in_chat_messages_do_not_reach_the_tokenizer() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x\udc80"}]}).encode()
    req = ChatCompletionRequest.model_validate(parse_json_object(body))
    assert req.conversation()[0]["content"] == "x\ufffd"


# ---- API keys ---------------------------------------------------------------------------------------
def test_api_keys_allow_only_the_configured_bearer_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSERVE_API_KEYS", raising=False)
    ApiKeys.from_config(config_from_dict({}).serve).check(None)  # none configured: open
    config = config_from_dict({"serve": {"api_keys": ["k-one"]}})
    monkeypatch.setenv("FUSERVE_API_KEYS", " k-two , ")
    keys = ApiKeys.from_config(config.serve)
    for good in ("Bearer k-one", "bearer k-two", "Bearer  k-one "):
        keys.check(good)
    for bad in (None, "", "Bearer", "Basic k-one", "Bearer k-on", "Bearer k-one2", "k-one"):
        with pytest.raises(APIError) as info:
            keys.check(bad)
        assert info.value.status == 401 and "k-one" not in info.value.message
    # the env var's keys travel inside the config to replicas elsewhere; no key is ever printed
    baked = with_env_api_keys(config)
    assert [k.get_secret_value() for k in baked.serve.api_keys] == ["k-one", "k-two"]
    for text in (repr(baked), str(baked), baked.model_dump_json()):
        assert "k-one" not in text and "k-two" not in text
    # a config dumped with its keys masked and read back must not make the mask a key
    with pytest.raises(ValueError, match="masked key"):
        ApiKeys.from_config(config_from_dict(json.loads(baked.model_dump_json())).serve)
