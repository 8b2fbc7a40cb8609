"""A gRPC request's OpenAI options become the same OpenAI request the HTTP routes build (no cluster: the
mapping alone; tests/test_structured_outputs.py asks a served model over real gRPC)."""

from __future__ import annotations

import json

import pytest

from fuserve.router.engine_messages import EngineDelta
from fuserve.router.errors import APIError
from fuserve.router.grpc_service import StreamReplies, to_api_request
from fuserve.router.hermes_tool_calls import HERMES
from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.protocol import ChatCompletionRequest, CompletionRequest

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_options_map_to_the_openai_request_fields() -> None:
    chat = to_api_request(
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")],
            tools=[
                pb.Tool(name="get_weather", description="weather", parameters=json.dumps(PARAMS), strict=True)
            ],
            tool_choice=pb.ToolChoice(function="get_weather"),
            parallel_tool_calls=False,
            logit_bias={7: -100.0},
        )
    )
    assert isinstance(chat, ChatCompletionRequest)
    (tool,) = chat.tools or []
    assert (tool.function.name, tool.function.parameters, tool.function.strict) == (
        "get_weather",
        PARAMS,
        True,
    )
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.parallel_tool_calls is False and chat.logit_bias == {"7": -100.0}
    assert chat.grammar() is not None  # a named tool: the HTTP path's tool grammar

    schema = pb.JsonSchema(name="p", schema=json.dumps(PARAMS), strict=True)
    completion = to_api_request(
        pb.GenerateRequest(
            prompt="x", echo=True, response_format=pb.ResponseFormat(type="json_schema", json_schema=schema)
        )
    )
    assert isinstance(completion, CompletionRequest) and completion.echo
    assert completion.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": PARAMS, "strict": True},
    }
    assert to_api_request(pb.GenerateRequest(prompt="x", guided_choice=["a", "b"])).guided_choice == [
        "a",
        "b",
    ]
    auto = to_api_request(
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")],
            tools=[pb.Tool(name="f")],
            tool_choice=pb.ToolChoice(),
        )
    )
    assert (
        auto.tool_choice is None and auto.parses_tool_calls and auto.grammar() is None
    )  # auto: parsed, not forced


def test_an_old_clients_request_leaves_every_option_unset() -> None:
    """A message with none of the new fields (what an old client sends) is the request it always was."""
    req = to_api_request(
        pb.GenerateRequest.FromString(pb.GenerateRequest(prompt="x", max_tokens=3).SerializeToString())
    )
    assert isinstance(req, CompletionRequest) and not req.echo and req.logit_bias is None
    assert req.response_format is None and req.grammar() is None


def test_tool_traffic_goes_back_into_the_conversation() -> None:
    call = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    req = to_api_request(
        pb.GenerateRequest(
            messages=[
                pb.ChatMessage(role="user", content="Weather in Paris?"),
                pb.ChatMessage(role="assistant", tool_calls=[call]),
                pb.ChatMessage(role="tool", tool_call_id="call_1", content='{"sky": "sunny"}'),
            ],
            tools=[pb.Tool(name="get_weather", parameters=json.dumps(PARAMS))],
            tool_choice=pb.ToolChoice(mode="none"),
        )
    )
    assert isinstance(req, ChatCompletionRequest)
    rendered = [m["content"] for m in req.conversation()]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in rendered


@pytest.mark.parametrize(
    ("request_", "param", "fragment"),
    [
        (pb.GenerateRequest(prompt="x", guided_json="{nope"), "guided_json", "not valid JSON"),
        (
            pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content="x")], tools=[pb.Tool(name="f", parameters="[")]
            ),
            "tools[0].parameters",
            "not valid JSON text",
        ),
        (pb.GenerateRequest(prompt="x", tools=[pb.Tool(name="f")]), "tools", "need messages"),
        (pb.GenerateRequest(prompt="x", logit_bias={5: float("nan")}), "logit_bias", "[-100, 100]"),
        (
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], echo=True),
            "echo",
            "prompt",
        ),
    ],
)
def test_bad_options_name_the_field(request_: pb.GenerateRequest, param: str, fragment: str) -> None:
    with pytest.raises(APIError) as info:
        req = to_api_request(request_)
        req.check()
        req.grammar()
    assert info.value.status == 400 and info.value.param == param and fragment in info.value.message


def test_streamed_tool_calls_come_whole_once_their_block_closes() -> None:
    replies = StreamReplies("chatcmpl-1", "m", tool_format=HERMES)
    pieces = ["<tool_", 'call>\n{"name": "f", "argu', 'ments": {"a": 1}}\n</tool_call>']
    messages = [
        replies.message([(0, EngineDelta(index=0, text=p, token_ids=[1], finished=False))]) for p in pieces
    ]
    assert [len(m.choices[0].tool_calls) for m in messages] == [0, 0, 1]
    assert all(m.choices[0].text == "" for m in messages)
    call = messages[-1].choices[0].tool_calls[0]
    assert (call.name, json.loads(call.arguments)) == ("f", {"a": 1}) and call.id.startswith("call_")
    end = replies.message(
        [(0, EngineDelta(index=0, text="", token_ids=[2], finished=True, finish_reason="stop"))]
    )
    assert end.choices[0].finish_reason == "tool_calls"
