"""From engine deltas to OpenAI bodies: whole responses, streamed chunks, usage, logprobs.

A request with several prompts (completions) and `n` samples each has `num_prompts * n` choices;
choice `i * n + k` is sample k of prompt i, as in OpenAI's API. `Transcript` accumulates what the
non-streaming response needs and the usage the last streamed chunk reports; each streamed delta
becomes one chunk the moment it arrives. With tools, a chat reply's calls (in the model's format)
become `tool_calls` (tool_calls.py); with `echo`, a completion's text starts with its prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from fuserve.core_messages import TokenLogprobs
from fuserve.router.engine_messages import EngineDelta
from fuserve.router.hermes_tool_calls import HERMES
from fuserve.router.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    ToolCallsDelta,
    ToolCallsMessage,
    TopLogprob,
    Usage,
)
from fuserve.router.tool_call_format import CallStream, ToolCallFormat, feed_delta

DecodeToken = Callable[[int], str]
MIN_LOGPROB = -9999.0  # JSON has no -inf (nor NaN): a zero-probability token reports this, as vLLM does


def finite_logprob(v: float) -> float:
    return v if v >= MIN_LOGPROB else MIN_LOGPROB  # NaN compares false, so it too becomes MIN_LOGPROB


def completion_logprobs(lps: list[TokenLogprobs], decode: DecodeToken, offset: int) -> CompletionLogprobs:
    """The legacy completions shape; `offset` is where these tokens start in the choice's text."""
    out = CompletionLogprobs()
    for lp in lps:
        token = decode(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(finite_logprob(lp.logprob))
        out.top_logprobs.append({decode(t): finite_logprob(v) for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(lps: list[TokenLogprobs], decode: DecodeToken) -> ChatLogprobs:
    content = []
    for lp in lps:
        token = decode(lp.token_id)
        top = [
            TopLogprob(token=(s := decode(t)), logprob=finite_logprob(v), bytes=list(s.encode()))
            for t, v in lp.top
        ]
        value = finite_logprob(lp.logprob)
        content.append(TokenLogprob(token=token, logprob=value, bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_chars: int = 0
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


class Transcript:
    """Everything streamed so far for one API request."""

    def __init__(self, num_prompts: int, n: int, keep_text: bool) -> None:
        self.n = n
        self.keep_text = keep_text  # streaming sends text on; only usage must be kept
        self.choices = [_Choice() for _ in range(num_prompts * n)]
        self.prompt_tokens = [0] * num_prompts
        self.cached_tokens = [0] * num_prompts

    def add(self, prompt_index: int, d: EngineDelta) -> tuple[int, int]:
        """Records one delta; returns its choice index and the text offset it starts at."""
        i = prompt_index * self.n + d.index
        c = self.choices[i]
        offset = c.num_chars
        if self.keep_text:
            c.text.append(d.text)
            c.token_ids.extend(d.token_ids)
            c.logprobs.extend(d.logprobs)
        c.num_chars += len(d.text)
        c.num_tokens += len(d.token_ids)
        if d.finished:
            c.finish_reason = d.finish_reason
        self.prompt_tokens[prompt_index] = d.num_prompt_tokens or self.prompt_tokens[prompt_index]
        self.cached_tokens[prompt_index] = max(self.cached_tokens[prompt_index], d.num_cached_tokens)
        return i, offset

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens)
        completion = sum(c.num_tokens for c in self.choices)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens)),
        )

    def completion_response(
        self,
        request_id: str,
        model: str,
        decode: DecodeToken,
        want_logprobs: bool,
        echo: list[str] | None = None,
    ) -> CompletionResponse:
        """`echo`: each choice's prompt text, which its text starts with."""
        choices = []
        for i, c in enumerate(self.choices):
            lp = completion_logprobs(c.logprobs, decode, 0) if want_logprobs else None
            text = (echo[i] if echo else "") + "".join(c.text)
            choices.append(CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=c.finish_reason))
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=self.usage())

    def chat_response(
        self,
        request_id: str,
        model: str,
        decode: DecodeToken,
        want_logprobs: bool,
        tool_calls: bool = False,
        tool_format: ToolCallFormat = HERMES,
    ) -> ChatCompletionResponse:
        """`tool_calls`: the request offered tools, so calls in a reply (in `tool_format`) are parsed."""
        choices = []
        for i, c in enumerate(self.choices):
            lp = chat_logprobs(c.logprobs, decode) if want_logprobs else None
            text = "".join(c.text)
            calls = tool_format.parse(text) if tool_calls else (text, [])
            message: AssistantMessage | ToolCallsMessage = AssistantMessage(content=text)
            finish = c.finish_reason
            if calls[1]:
                message = ToolCallsMessage(content=calls[0] or None, tool_calls=calls[1])
                finish = "tool_calls" if finish == "stop" else finish
            choices.append(ChatChoice(index=i, message=message, logprobs=lp, finish_reason=finish))
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=self.usage())


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
_SENTINEL = "\x00fuserve-text\x00"  # stands for a chunk's text while its template is made
_encode_json = msgspec.json.Encoder().encode  # the same JSON string as pydantic's (tests check)


@dataclass
class ChunkWriter:
    """Serializes one streamed response's chunks: same id, model and creation time on each.

    Most chunks differ only in their text (no logprobs, usage or finish reason): those are a
    template per choice with the text put in, byte for byte what the pydantic models give, without
    building them for every token (the frontend's CPU per token is what bounds a replica)."""

    request_id: str
    model: str
    decode: DecodeToken
    want_logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))
    tool_calls: bool = False  # the request offered tools: calls in the text are sent as tool_calls
    tool_format: ToolCallFormat = HERMES  # the model's format, which those calls are written in
    echo: list[str | None] | None = None  # each completion choice's prompt, sent before its first text
    _tool_streams: dict[int, CallStream] = field(default_factory=dict)
    _templates: dict[tuple[bool, int], tuple[str, str]] = field(default_factory=dict, repr=False)

    def _plain(self, chat: bool, choice: int, text: str) -> str:
        """A text-only chunk from its template."""
        key = (chat, choice)
        parts = self._templates.get(key)
        if parts is None:
            blank = EngineDelta(index=choice, text=_SENTINEL, token_ids=[], finished=False)
            whole = self._chat_chunk(choice, blank) if chat else self._completion_chunk(choice, blank, 0)
            head, tail = whole.split(_encode_json(_SENTINEL).decode())
            parts = self._templates[key] = (head, tail)
        return parts[0] + _encode_json(text).decode() + parts[1]

    def _is_plain(self, choice: int, d: EngineDelta, usage: Usage | None) -> bool:
        """Text alone (possibly empty: a model served without a tokenizer streams token ids with no
        text): no usage, finish, logprobs, tool-call parsing or echoed prompt still to send."""
        if usage is not None or d.finish_reason is not None or self.want_logprobs:
            return False
        return not self.tool_calls and not (self.echo and self.echo[choice] is not None)

    def completion(self, choice: int, d: EngineDelta, offset: int, usage: Usage | None = None) -> str:
        if self._is_plain(choice, d, usage):
            return self._plain(False, choice, d.text)
        return self._completion_chunk(choice, d, offset, usage)

    def _completion_chunk(self, choice: int, d: EngineDelta, offset: int, usage: Usage | None = None) -> str:
        lp = completion_logprobs(d.logprobs, self.decode, offset) if self.want_logprobs else None
        text = d.text
        if self.echo and self.echo[choice] is not None:
            text, self.echo[choice] = self.echo[choice] + text, None
        body = CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(index=choice, text=text, logprobs=lp, finish_reason=d.finish_reason)],
            usage=usage,
        )
        return sse(body.model_dump_json())

    def chat_role(self, choice: int) -> str:
        """OpenAI opens each chat choice with a chunk that carries only the role."""
        delta = DeltaMessage(role="assistant", content="")
        return self._chat([ChatChunkChoice(index=choice, delta=delta)])

    def chat(self, choice: int, d: EngineDelta, usage: Usage | None = None) -> str:
        if self._is_plain(choice, d, usage):
            return self._plain(True, choice, d.text)
        return self._chat_chunk(choice, d, usage)

    def _chat_chunk(self, choice: int, d: EngineDelta, usage: Usage | None = None) -> str:
        lp = chat_logprobs(d.logprobs, self.decode) if self.want_logprobs else None
        if self.tool_calls:
            return self._chat_with_tools(choice, d, lp, usage)
        delta = DeltaMessage(content=d.text) if d.text or not d.finished else DeltaMessage()
        choices = [ChatChunkChoice(index=choice, delta=delta, logprobs=lp, finish_reason=d.finish_reason)]
        return self._chat(choices, usage)

    def _chat_with_tools(
        self, choice: int, d: EngineDelta, lp: ChatLogprobs | None, usage: Usage | None
    ) -> str:
        stream = self._tool_streams.get(choice)
        if stream is None:
            stream = self._tool_streams[choice] = self.tool_format.stream()
        first = stream.num_calls
        content, calls, finish = feed_delta(stream, d.text, d.finished, d.finish_reason)
        if not (content or calls or d.finished or lp):
            return ""  # held back: it may be the start of a call
        delta: DeltaMessage | ToolCallsDelta = DeltaMessage(content=content or None)
        if calls:
            delta = ToolCallsDelta(content=content or None, tool_calls=_call_deltas(calls, first))
        choices = [ChatChunkChoice(index=choice, delta=delta, logprobs=lp, finish_reason=finish)]
        return self._chat(choices, usage)

    def _chat(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return sse(chunk.model_dump_json())

    def usage(self, usage: Usage, chat: bool) -> str:
        if chat:
            body = ChatCompletionChunk(
                id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
            )
        else:
            body = CompletionResponse(
                id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
            )
        return sse(body.model_dump_json())


def _call_deltas(calls: list[ToolCall], first_index: int) -> list[DeltaToolCall]:
    """Whole calls as stream deltas: the first chunk of a call carries its id, name and arguments."""
    return [
        DeltaToolCall(
            index=first_index + k,
            id=c.id,
            type="function",
            function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments),
        )
        for k, c in enumerate(calls)
    ]
