"""The Llama-3 JSON tool-call format, on a tiny Llama checkpoint saved with a Llama-3.1-style chat
template: the choice of format from the template (and the config's override), the prompt (tools given
to the template, calls and `ipython` results), the auto parser (`<|python_tag|>{...}` and bare JSON,
whole and streamed in awkward pieces), and, served on a real local Ray Serve cluster over HTTP with
the official `openai` client, tool_choice required / named giving valid calls parsed back in the
Llama-3 format, streaming equal to non-streaming."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import llguidance
import openai
import pytest
from checkpoints import CHAT_TEMPLATE
from llama3_chat import LLAMA30_TEMPLATE, LLAMA31_TEMPLATE, make_llama3_chat_checkpoint

from fuserve.configs import FuserveConfig, config_from_dict
from fuserve.router.hermes_tool_calls import HermesFormat
from fuserve.router.llama3_tool_calls import Llama3CallStream, Llama3JsonFormat
from fuserve.router.protocol import ChatCompletionRequest
from fuserve.router.tool_call_format import choose_tool_call_format
from fuserve.workers.grammar_compiler import llguidance_tokenizer
from fuserve.workers.models.loader import load_tokenizer, resolve_source
from fuserve.workers.tokenizer import Tokenizer

if TYPE_CHECKING:
    from conftest import ServeCluster

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
LLAMA3 = Llama3JsonFormat()

# (reply, content, calls as (name, arguments))
REPLIES = [
    (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        "",
        [("get_weather", {"city": "Paris", "unit": "c"})],
    ),
    (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
        '{"name": "get_time", "arguments": {}}',
        "",
        [("get_weather", {"city": "Oslo"}), ("get_time", {})],
    ),
    (
        'Let me look.<|python_tag|>{"name": "get_time", "parameters": {"zone": "utc"}}',
        "Let me look.",
        [("get_time", {"zone": "utc"})],
    ),
    ('\n {"name": "get_time", "parameters": {}}\n', "", [("get_time", {})]),
    ('{"answer": 4}', '{"answer": 4}', []),
    ('It is {"name": "x"} here', 'It is {"name": "x"} here', []),
    ("a < b and <|pyth", "a < b and <|pyth", []),
    ('{"name": "get_time", "parameters": {"zone": ', '{"name": "get_time", "parameters": {"zone": ', []),
    ('{"name": "get_time", "parameters": {}} and then text', "and then text", [("get_time", {})]),
    ("  plain text", "  plain text", []),
]


def request(**kwargs: Any) -> ChatCompletionRequest:
    body = {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER, CLOCK],
        **kwargs,
    }
    return ChatCompletionRequest.model_validate(body)


def named(calls: list) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama3_chat_checkpoint(tmp_path_factory.mktemp("llama3chat") / "tiny-llama3")


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(folder)


def test_the_format_is_chosen_from_the_chat_template_and_the_override_forces_one(folder: Path) -> None:
    default_template = load_tokenizer(resolve_source(FuserveConfig().model)).chat_template
    assert choose_tool_call_format(default_template) == HermesFormat(template_takes_tools=False)
    assert choose_tool_call_format(CHAT_TEMPLATE) == HermesFormat()
    assert choose_tool_call_format(None) == HermesFormat()
    assert choose_tool_call_format(LLAMA31_TEMPLATE) == Llama3JsonFormat(template_takes_tools=True)
    assert choose_tool_call_format(LLAMA30_TEMPLATE) == Llama3JsonFormat(template_takes_tools=False)
    assert choose_tool_call_format(LLAMA31_TEMPLATE, "hermes") == HermesFormat(template_takes_tools=True)
    assert isinstance(choose_tool_call_format(CHAT_TEMPLATE, "llama3_json"), Llama3JsonFormat)

    # through the config, as the frontend and the HAProxy router read it
    from fuserve.cluster.ingress_routing import HintBuilder

    def builder(**model: str) -> HintBuilder:
        return HintBuilder(config_from_dict({"model": {"path": str(folder), **model}}))

    assert isinstance(builder().tool_format, Llama3JsonFormat)
    assert isinstance(builder(tool_call_format="hermes").tool_format, HermesFormat)
    with pytest.raises(ValueError, match="tool_call_format"):
        config_from_dict({"model": {"path": str(folder), "tool_call_format": "xml"}})


def test_template_that_takes_tools_renders_tools_calls_and_ipython_results(tokenizer: Tokenizer) -> None:
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
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "cold"},
        ]
    )
    req.use_tool_format(choose_tool_call_format(tokenizer.chat_template))
    text = tokenizer.apply_chat_template(req.conversation(), True, req.template_tools())
    user = text.split("<|start_header_id|>user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    assert '"name": "get_weather"' in user and user.endswith("Weather?")  # tools in the first user message
    assert "Environment: ipython\nBe brief.<|eot_id|>" in text
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
        '{"city": "Oslo", "unit": "c"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\ncold<|eot_id|>"
    ) in text
    req.tool_choice = "none"  # tools not shown to the model; the earlier call and its result still are
    hidden = tokenizer.apply_chat_template(req.conversation(), True, req.template_tools())
    assert "Given the following functions" not in hidden and "Environment: ipython" not in hidden
    assert "ipython<|end_header_id|>\n\ncold" in hidden


def test_template_without_tools_gets_them_in_the_system_message() -> None:
    req = request(
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                    {
                        "id": "b",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "X"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "noon"},
        ]
    )
    req.use_tool_format(choose_tool_call_format(LLAMA30_TEMPLATE))
    conv = req.conversation()
    assert req.template_tools() is None
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "ipython"]
    assert (
        '"parameters": dictionary of argument name' in conv[0]["content"]
        and "get_weather" in conv[0]["content"]
    )
    assert (
        conv[2]["content"]
        == '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "X"}}'
    )
    assert conv[3]["content"] == "noon"


@pytest.mark.parametrize(("reply", "content", "calls"), REPLIES)
def test_auto_parser_reads_python_tag_and_bare_json_calls(reply: str, content: str, calls: list) -> None:
    got_content, got_calls = LLAMA3.parse(reply)
    assert (got_content, named(got_calls)) == (content, calls)
    assert all(c.id.startswith("call_") for c in got_calls) and len({c.id for c in got_calls}) == len(
        got_calls
    )


@pytest.mark.parametrize("piece", [1, 2, 5, 13])
def test_streamed_pieces_give_what_the_whole_reply_gives(piece: int) -> None:
    for reply, content, calls in REPLIES:
        stream = Llama3CallStream()
        got_content, got_calls, seen_calls = "", [], 0
        for i in range(0, len(reply), piece):
            text, new = stream.feed(reply[i : i + piece])
            if calls and not seen_calls:  # nothing of a call (nor a partial tag) goes out as content
                assert "{" not in text and "<|" not in text, (reply, text)
            seen_calls += len(new)
            got_content, got_calls = got_content + text, got_calls + new
        text, new = stream.finish()
        got_content, got_calls = got_content + text, got_calls + new
        assert (got_content.strip() if calls else got_content, named(got_calls)) == (content, calls), reply


def test_required_and_named_grammars_accept_llama3_calls_and_refuse_others(tokenizer: Tokenizer) -> None:
    lltok = llguidance_tokenizer(tokenizer, tokenizer.vocab_size)
    fmt = choose_tool_call_format(tokenizer.chat_template)

    def grammar(**kwargs: Any) -> str:
        req = request(**kwargs)
        req.use_tool_format(fmt)
        out = req.grammar()
        assert out is not None
        return out

    def accepts(g: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, g)
        return (
            matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
            and matcher.is_accepting()
        )

    weather = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
    clock = '{"name": "get_time", "parameters": {"zone": "utc"}}'
    named_g = grammar(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    required = grammar(tool_choice="required")
    single = grammar(tool_choice="required", parallel_tool_calls=False)
    assert accepts(named_g, weather) and not accepts(named_g, clock)
    assert accepts(required, clock) and accepts(required, f"{weather}; {clock}")
    assert accepts(single, clock) and not accepts(single, f"{weather}; {clock}")
    assert not accepts(required, f"<tool_call>\n{clock}\n</tool_call>")
    assert not accepts(required, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}')


def test_auto_with_a_strict_tool_constrains_its_calls_and_leaves_words_free(tokenizer: Tokenizer) -> None:
    """tool_choice auto, get_weather strict and get_time not: in both formats the model may answer in
    words or call; a strict tool's arguments must follow its schema, the other's are any object."""
    from fuserve.router.hermes_tool_calls import HERMES

    lltok = llguidance_tokenizer(tokenizer, tokenizer.vocab_size)
    strict_weather = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}

    def accepts(fmt: Any, text: str, special: list[int] | None = None) -> bool:
        req = request(tools=[strict_weather, CLOCK])
        req.use_tool_format(fmt)
        grammar = req.grammar()
        assert grammar is not None, "auto with a strict tool has a grammar"
        matcher = llguidance.LLMatcher(lltok, grammar)
        ids = (special or []) + tokenizer.encode(text, add_special_tokens=False)
        return matcher.consume_tokens(ids) and matcher.is_accepting()

    hermes = HERMES
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    loose = '<tool_call>\n{"name": "get_time", "arguments": {"anything": 1}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>'
    assert accepts(hermes, "It is sunny, no call needed.")
    assert accepts(hermes, f"Let me look. {call}") and accepts(hermes, call)
    assert accepts(hermes, loose)
    assert not accepts(hermes, bad) and not accepts(hermes, f"Let me look. {bad}")

    llama = choose_tool_call_format(tokenizer.chat_template)
    python_tag = tokenizer.backend.token_to_id("<|python_tag|>")
    weather = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
    assert accepts(llama, "It is sunny.") and accepts(llama, weather)
    assert accepts(llama, weather, special=[python_tag])
    assert accepts(llama, '{"name": "get_time", "parameters": {"anything": 1}}')
    assert not accepts(llama, '{"name": "get_weather", "parameters": {"town": "Paris"}}')
    assert request(tools=[WEATHER, CLOCK]).grammar() is None, "auto without strict tools is free"


# ---- served: the same request path as every chat request ---------------------------------------
@pytest.fixture(scope="module")
def client(serve_cluster: ServeCluster, folder: Path) -> Iterator[openai.OpenAI]:
    from ray import serve

    from fuserve.cluster import build_app

    config = config_from_dict(
        {
            "model": {"path": str(folder), "name": "tiny-llama3", "max_model_len": 2048},
            "cache": {"num_blocks": 256},
            "serve": {"num_replicas": 1, "num_cpus_per_replica": 1.0},
        }
    )
    serve.run(build_app(config), name="llama3tools", route_prefix="/llama3tools")
    try:
        yield openai.OpenAI(
            base_url=f"{serve_cluster.url}/llama3tools/v1", api_key="unused", timeout=120, max_retries=0
        )
    finally:
        serve.delete("llama3tools")


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": "Weather in Paris?"}])
    kwargs.setdefault("max_tokens", 96)
    return client.chat.completions.create(
        model="tiny-llama3", tools=[WEATHER, CLOCK], temperature=0, **kwargs
    )


def streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[tuple[str, str]], str | None]:
    text, calls, finish = "", {}, None
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                seen = calls.setdefault(call.index, ["", ""])
                seen[0] += call.function.name or ""
                seen[1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, [(name, args) for name, args in (calls[i] for i in sorted(calls))], finish


def test_served_required_and_named_give_llama3_calls_streamed_as_whole(client: openai.OpenAI) -> None:
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, {"get_time"}),
        ({"tool_choice": "required", "parallel_tool_calls": False}, set(PARAMS)),
    ]
    for kwargs, names in cases:
        whole = chat(client, **kwargs).choices[0]
        assert whole.finish_reason == "tool_calls" and not whole.message.content, whole
        calls = whole.message.tool_calls
        assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].function.name in names
        jsonschema.validate(json.loads(calls[0].function.arguments), PARAMS[calls[0].function.name])
        text, stream_calls, finish = streamed(client, **kwargs)
        assert (text, finish) == ("", "tool_calls")
        assert stream_calls == [(c.function.name, c.function.arguments) for c in calls]


def test_served_auto_and_tool_results_stream_as_they_reply(client: openai.OpenAI) -> None:
    """A random model rarely calls: its auto reply is text, the same streamed or not; a conversation
    with a call and its `ipython` result is accepted and rendered (the prompt grows)."""
    whole = chat(client, tool_choice="auto", max_tokens=24).choices[0]
    text, calls, finish = streamed(client, tool_choice="auto", max_tokens=24)
    assert (text, finish) == (whole.message.content or "", whole.finish_reason)
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]

    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}
    messages = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]
    first = chat(client, messages=messages[:1], tool_choice="none", max_tokens=2)
    after = chat(client, messages=messages, tool_choice="none", max_tokens=2)
    assert after.usage.prompt_tokens > first.usage.prompt_tokens + len('{"name": "get_time"') + len("12:00")
