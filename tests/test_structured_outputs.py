"""Structured outputs and tool calling over real HTTP with the official `openai` client, against the
default model (SmolLM2-135M-Instruct) served on a real local Ray Serve cluster: one application shared
by the module, also asked over real gRPC (fuserve.proto) at the end. Replies are kept short (max_tokens)
so the module stays within its CI time."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from guided_schemas import PERSON, SCHEMAS

from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.proto import fuserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServeCluster

ROOT = Path(__file__).parents[1]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
        },
    },
}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}


@pytest.fixture(scope="module")
def base_url(serve_cluster: ServeCluster) -> Iterator[str]:
    from ray import serve

    from fuserve.cluster import build_app
    from fuserve.configs import load_config

    serve.run(
        build_app(load_config(ROOT / "configs" / "default.yaml")), name="guided", route_prefix="/guided"
    )
    try:
        yield f"{serve_cluster.url}/guided/v1"
    finally:
        serve.delete("guided")


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)


def chat(client: openai.OpenAI, content: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 64)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": content}], **kwargs
    )


def test_every_json_object_reply_parses(client: openai.OpenAI) -> None:
    prompts = [
        "Return a JSON object with a name and an age.",
        "Give the capital of France as JSON with the key capital.",
        "Return a JSON object with the keys city and country for Paris.",
    ]
    for prompt in prompts:
        choice = chat(client, prompt, response_format={"type": "json_object"}).choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_replies_validate_for_20_schemas(base_url: str) -> None:
    """All 20 at once: different grammars compile while the others decode, in one batch."""

    async def main() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)
        return await asyncio.gather(
            *(
                aclient.chat.completions.create(
                    model="SmolLM2-135M-Instruct.Q4_1",
                    messages=[{"role": "user", "content": "Answer in JSON."}],
                    max_tokens=96,
                    temperature=0,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
                    },
                )
                for i, schema in enumerate(SCHEMAS)
            )
        )

    replies = asyncio.run(main())
    for schema, reply in zip(SCHEMAS, replies, strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_named_and_required_tool_choice_give_valid_tool_calls(client: openai.OpenAI) -> None:
    named = chat(
        client,
        "What time is it in Tokyo?",
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    # one call (a 135M model, free to add calls, adds them until max_tokens)
    required = chat(
        client,
        "What is the weather in Paris?",
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    for reply, names in ((named, {"get_weather"}), (required, set(PARAMS))):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls and all(c.id.startswith("call_") and c.type == "function" for c in calls)
        for call in calls:
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_results_go_back_to_the_model(client: openai.OpenAI) -> None:
    """A conversation with the assistant's call and the tool's answer is accepted, and the model answers
    (tool_choice none: plain text)."""
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=24,
        temperature=0,
    )
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    assert reply.usage.prompt_tokens > 60  # the call and its result were rendered into the prompt


def _streamed(client: openai.OpenAI, content: str, **kwargs: Any) -> tuple[str, list[tuple], str | None]:
    text, calls, finish = "", {}, None
    for chunk in chat(client, content, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                seen = calls.setdefault(call.index, ["", ""])
                seen[0] += call.function.name or ""
                seen[1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, [tuple(calls[i]) for i in sorted(calls)], finish


def test_stream_and_non_stream_agree_under_greedy(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = chat(client, "Invent a person.", response_format=fmt)
    text, calls, finish = _streamed(client, "Invent a person.", response_format=fmt)
    assert (text, calls, finish) == (whole.choices[0].message.content, [], whole.choices[0].finish_reason)

    tools = {"tools": [WEATHER, CLOCK], "tool_choice": "required", "parallel_tool_calls": False}
    whole = chat(client, "Weather in Rome?", **tools).choices[0]
    text, calls, finish = _streamed(client, "Weather in Rome?", **tools)
    assert finish == whole.finish_reason == "tool_calls" and not text and not whole.message.content
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_guided_choice_and_regex(client: openai.OpenAI) -> None:
    reply = chat(client, "Is the sky blue?", extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")
    completion = client.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        prompt="My phone number is",
        max_tokens=16,
        temperature=0,
        extra_body={"guided_regex": r" [0-9]{3}-[0-9]{4}"},
    )
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", completion.choices[0].text)
    assert completion.choices[0].finish_reason == "stop"


def test_logit_bias_removes_and_forces_tokens(client: openai.OpenAI) -> None:
    def complete(**kwargs: Any) -> Any:
        return client.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1",
            prompt="The capital of France is",
            max_tokens=3,
            temperature=0,
            logprobs=0,
            **kwargs,
        ).choices[0]

    plain = complete()
    assert plain.text.startswith(" Paris")
    paris = client.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", prompt="x", max_tokens=1, temperature=0, logit_bias={"7042": 100}
    ).choices[0]
    assert paris.text == " Paris"  # +100 forces token 7042 (" Paris") whatever the prompt
    banned = complete(logit_bias={"7042": -100})
    assert not banned.text.startswith(" Paris") and "Paris" not in banned.logprobs.tokens[0]
    forced = complete(logit_bias={"42": 100})  # ":"
    assert forced.text == ":::"


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    body = {
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "prompt": "Once upon a time",
        "max_tokens": 4,
        "temperature": 0,
    }
    whole = client.completions.create(**body, echo=True).choices[0].text
    plain = client.completions.create(**body).choices[0].text
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**body, echo=True, stream=True) if c.choices
    )
    assert whole == streamed == "Once upon a time" + plain


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format.json_schema.schema",
            "objekt",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 3}},
                }
            },
            "response_format.json_schema.schema",
            "minimum",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
        ({"guided_regex": "[a-"}, "guided_regex", "regex"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "one structured-output option"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"logit_bias": {"5": 150}}, "logit_bias", "[-100, 100]"),
    ],
)
def test_bad_structured_requests_get_400s_naming_the_problem(
    base_url: str, extra: dict, param: str, fragment: str
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


# ---- the same options over gRPC, on the same application ----------------------------------------------
GRPC_APP = (("application", "guided"),)  # Serve's gRPC proxy: which application answers


@pytest.fixture(scope="module")
def stub(base_url: str, serve_cluster: ServeCluster) -> Iterator[pb_grpc.GenerationStub]:
    with grpc.insecure_channel(f"127.0.0.1:{serve_cluster.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield pb_grpc.GenerationStub(channel)


def grpc_chat(content: str, **fields: Any) -> pb.GenerateRequest:
    fields.setdefault("max_tokens", 64)
    fields.setdefault("temperature", 0.0)
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=content)], **fields)


def grpc_tool(tool: dict[str, Any]) -> pb.Tool:
    f = tool["function"]
    return pb.Tool(name=f["name"], description=f["description"], parameters=json.dumps(f["parameters"]))


def unary_and_streamed(
    stub: pb_grpc.GenerationStub, request: pb.GenerateRequest
) -> tuple[pb.Choice, pb.Choice]:
    """The unary reply's choice, and the streamed messages' choices joined into one."""
    whole = stub.Generate(request, metadata=GRPC_APP, timeout=120).choices[0]
    joined = pb.Choice()
    for message in stub.GenerateStream(request, metadata=GRPC_APP, timeout=120):
        for c in message.choices:
            joined.text += c.text
            joined.token_ids.extend(c.token_ids)
            joined.tool_calls.extend(c.tool_calls)
            joined.finish_reason = c.finish_reason or joined.finish_reason
    return whole, joined


def test_grpc_json_schema_reply_validates_and_stream_agrees(
    stub: pb_grpc.GenerationStub, client: Any
) -> None:
    schema = pb.JsonSchema(name="person", schema=json.dumps(PERSON))
    request = grpc_chat(
        "Invent a person.", response_format=pb.ResponseFormat(type="json_schema", json_schema=schema)
    )
    whole, streamed = unary_and_streamed(stub, request)
    assert whole.finish_reason == "stop", whole
    jsonschema.validate(json.loads(whole.text), PERSON)
    assert (streamed.text, streamed.token_ids, streamed.finish_reason) == (
        whole.text,
        whole.token_ids,
        "stop",
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    assert whole.text == chat(client, "Invent a person.", response_format=fmt).choices[0].message.content


def test_grpc_named_tool_choice_gives_a_tool_call(stub: pb_grpc.GenerationStub) -> None:
    request = grpc_chat(
        "What time is it in Tokyo?",
        tools=[grpc_tool(WEATHER), grpc_tool(CLOCK)],
        tool_choice=pb.ToolChoice(function="get_weather"),
    )
    whole, streamed = unary_and_streamed(stub, request)
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls" and choice.text == "", choice
        (call,) = choice.tool_calls  # each call comes whole: one streamed message holds all of it
        assert call.id.startswith("call_") and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), PARAMS["get_weather"])
    assert (streamed.tool_calls[0].name, streamed.tool_calls[0].arguments) == (
        whole.tool_calls[0].name,
        whole.tool_calls[0].arguments,
    )


def test_grpc_logit_bias_removes_a_token_and_echo_prepends_the_prompt(stub: pb_grpc.GenerationStub) -> None:
    def complete(**fields: Any) -> pb.Choice:
        request = pb.GenerateRequest(
            prompt="The capital of France is", max_tokens=3, temperature=0.0, **fields
        )
        return stub.Generate(request, metadata=GRPC_APP, timeout=120).choices[0]

    plain = complete()
    assert plain.text.startswith(" Paris") and plain.token_ids[0] == 7042
    banned = complete(logit_bias={7042: -100.0})
    assert 7042 not in banned.token_ids and not banned.text.startswith(" Paris")
    assert complete(echo=True).text == "The capital of France is" + plain.text


@pytest.mark.parametrize(
    ("fields", "http_extra", "fragment"),
    [
        (
            {
                "response_format": pb.ResponseFormat(
                    type="json_schema", json_schema=pb.JsonSchema(schema='{"type": "objekt"}')
                )
            },
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "", "schema": {"type": "objekt"}},
                }
            },
            "objekt",
        ),
        ({"guided_regex": "[a-"}, {"guided_regex": "[a-"}, "regex"),
        ({"logit_bias": {5: 150.0}}, {"logit_bias": {"5": 150.0}}, "[-100, 100]"),
        (
            {
                "response_format": pb.ResponseFormat(
                    type="json_schema", json_schema=pb.JsonSchema(schema="{type")
                )
            },
            None,
            "response_format.json_schema.schema is not valid JSON text",
        ),
    ],
)
def test_grpc_bad_options_are_invalid_argument_with_the_http_message(
    stub: pb_grpc.GenerationStub, base_url: str, fields: dict, http_extra: dict | None, fragment: str
) -> None:
    request = grpc_chat("hi", max_tokens=4, **fields)
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=GRPC_APP, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in info.value.details()
    if http_extra is not None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **http_extra}
        r = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == info.value.details()
