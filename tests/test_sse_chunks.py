"""Streamed chunks made from a per-choice template must be byte for byte the pydantic models' JSON."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fuserve.core_messages import TokenLogprobs
from fuserve.router.engine_messages import EngineDelta
from fuserve.router.protocol import Usage
from fuserve.router.responses import ChunkWriter

# no lone surrogates; empty text is what a model served without a tokenizer streams
TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=0, max_size=12)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, choice=st.integers(0, 3), model=st.text(max_size=8))
def test_template_chunks_equal_the_models(text: str, choice: int, model: str) -> None:
    w = ChunkWriter("chatcmpl-x", model, str, want_logprobs=False)
    d = EngineDelta(index=0, text=text, token_ids=[7], finished=False)
    for _ in range(2):  # the second call takes the cached template
        assert w.chat(choice, d) == w._chat_chunk(choice, d)
        assert w.completion(choice, d, 3) == w._completion_chunk(choice, d, 3)
    body = json.loads(w.chat(choice, d).removeprefix("data: "))
    assert body["choices"][0]["delta"]["content"] == text and body["model"] == model


def test_chunks_with_more_than_text_take_the_models() -> None:
    """A finish reason, usage or logprobs: not the template (it has none of them)."""
    w = ChunkWriter("cmpl-x", "m", lambda t: f"<{t}>", want_logprobs=True)
    lp = [TokenLogprobs(token_id=5, logprob=-0.5, top=[(5, -0.5)])]
    d = EngineDelta(index=0, text="a", token_ids=[5], finished=False, logprobs=lp)
    choice = json.loads(w.completion(0, d, 0).removeprefix("data: "))["choices"][0]
    assert choice["logprobs"]["tokens"] == ["<5>"]
    plain = ChunkWriter("cmpl-x", "m", str, want_logprobs=False)
    end = EngineDelta(index=0, text="b", token_ids=[6], finished=True, finish_reason="length")
    assert json.loads(plain.chat(0, end).removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    mid = EngineDelta(index=0, text="c", token_ids=[6], finished=False)
    assert json.loads(plain.completion(0, mid, 0, usage).removeprefix("data: "))["usage"]["total_tokens"] == 3


def test_echo_and_tool_calls_are_not_templated() -> None:
    """The echoed prompt goes before the first text; tool-call text is parsed, not sent as content."""
    w = ChunkWriter("cmpl-x", "m", str, want_logprobs=False, echo=["Say: "])
    d = EngineDelta(index=0, text="hi", token_ids=[1], finished=False)
    assert json.loads(w.completion(0, d, 0).removeprefix("data: "))["choices"][0]["text"] == "Say: hi"
    assert json.loads(w.completion(0, d, 2).removeprefix("data: "))["choices"][0]["text"] == "hi"
    tools = ChunkWriter("chatcmpl-x", "m", str, want_logprobs=False, tool_calls=True)
    held = tools.chat(0, EngineDelta(index=0, text="<tool_call>", token_ids=[1], finished=False))
    assert "tool_call" not in held
