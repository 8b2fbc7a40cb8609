"""The Hermes tool-call format without a server: prompt rendering, parsing (whole and streamed in
awkward pieces) and the grammars of tool_choice required / named, checked against llguidance with the
default model's tokenizer."""

from __future__ import annotations

import json

import llguidance
import pytest

from fuserve.configs import FuserveConfig
from fuserve.router.errors import APIError
from fuserve.router.protocol import ChatCompletionRequest
from fuserve.router.tool_calls import ToolCallStream, parse_tool_calls, render_conversation, tool_grammar
from fuserve.workers.grammar_compiler import llguidance_tokenizer
from fuserve.workers.models.loader import load_tokenizer, resolve_source

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
REPLY = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def request(**kwargs: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, CLOCK], **kwargs}
    )


def test_parse_whole_reply() -> None:
    content, calls = parse_tool_calls(REPLY)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2
    assert parse_tool_calls("no calls <tool_call> not json </tool_call>")[1] == []
    assert parse_tool_calls("plain text") == ("plain text", [])


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_pieces_give_the_same_calls(piece: int) -> None:
    stream = ToolCallStream()
    content, calls = "", []
    for i in range(0, len(REPLY), piece):
        text, new = stream.feed(REPLY[i : i + piece])
        assert "<" not in text  # a partial marker is held back, never sent as content
        content, calls = content + text, calls + new
    text, new = stream.finish()
    content, calls = content + text, calls + new
    whole_content, whole_calls = parse_tool_calls(REPLY)
    assert content.strip() == whole_content
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole_calls
    ]


def test_streamed_text_with_a_lone_angle_bracket_is_released() -> None:
    stream = ToolCallStream()
    assert stream.feed("a < b") == ("a < b", [])
    assert stream.feed(" and <tool") == (" and ", [])
    assert stream.finish() == ("<tool", [])


def test_conversation_renders_tools_calls_and_results() -> None:
    req = request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "cold"},
        ]
    )
    conv = render_conversation(req)
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool"]
    assert conv[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in conv[0]["content"]
    assert (
        conv[2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    assert conv[3]["content"] == "<tool_response>\ncold\n</tool_response>"
    assert "<tools>" not in render_conversation(request(tool_choice="none"))[0]["content"]


def test_required_and_named_grammars_accept_calls_and_refuse_others() -> None:
    tokenizer = load_tokenizer(resolve_source(FuserveConfig().model))
    lltok = llguidance_tokenizer(tokenizer, tokenizer.vocab_size)
    named = tool_grammar(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    required = tool_grammar(request(tool_choice="required"))
    assert tool_grammar(request()) is None and tool_grammar(request(tool_choice="none")) is None
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    clock = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, grammar)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return matcher.consume_tokens(ids) and matcher.is_accepting()

    assert accepts(named, weather) and not accepts(named, clock)
    assert (
        accepts(required, weather) and accepts(required, clock) and accepts(required, weather + "\n" + clock)
    )
    assert not accepts(required, "Sure!")
    with pytest.raises(APIError, match="not among the tools"):
        tool_grammar(request(tool_choice={"type": "function", "function": {"name": "nope"}}))
