"""The gRPC API (fuserve/router/proto/fuserve.proto) mapped onto the same path as HTTP.

A `GenerateRequest` becomes the equivalent OpenAI request model (so both APIs share one set of
checks and defaults; its structured-output, tool, logit_bias and echo options via grpc_options.py),
deltas become `GenerateResponse` messages (tool calls parsed as on HTTP, tool_calls.py), and an
`APIError` becomes the matching gRPC status code with the same message. Serve's gRPC proxy calls
the ingress methods `Generate` and `GenerateStream` by name; it is started with `SERVICER_FUNCTION`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from pydantic import ValidationError

from fuserve.core_messages import TokenLogprobs
from fuserve.router.engine_messages import EngineDelta
from fuserve.router.errors import APIError, bad_request, from_validation
from fuserve.router.grpc_options import message_fields, option_fields
from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.protocol import ChatCompletionRequest, CompletionRequest, ToolCall
from fuserve.router.responses import Transcript
from fuserve.router.tool_call_format import CallStream, ToolCallFormat, feed_delta

SERVICER_FUNCTION = "fuserve.router.proto.fuserve_pb2_grpc.add_GenerationServicer_to_server"

STATUS_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def to_api_request(r: pb.GenerateRequest) -> CompletionRequest | ChatCompletionRequest:
    sources = [name for name in ("prompt", "prompt_token_ids", "messages") if getattr(r, name)]
    if len(sources) != 1:
        raise bad_request(
            f"set exactly one of prompt, prompt_token_ids, messages (got {', '.join(sources) or 'none'})",
            "prompt",
        )
    data: dict[str, Any] = {
        "model": r.model or None,
        "n": r.n or 1,
        "stop": list(r.stop),
        "ignore_eos": r.ignore_eos,
    }
    data.update({name: getattr(r, name) for name in _OPTIONAL if r.HasField(name)})
    if r.HasField("max_tokens"):
        data["max_tokens"] = r.max_tokens
    data.update(option_fields(r, chat=bool(r.messages)))
    try:
        if r.messages:
            data["messages"] = [message_fields(m) for m in r.messages]
            if r.HasField("logprobs"):
                data.update(logprobs=True, top_logprobs=r.logprobs)
            return ChatCompletionRequest.model_validate(data)
        data["prompt"] = r.prompt or list(r.prompt_token_ids)
        if r.HasField("logprobs"):
            data["logprobs"] = r.logprobs
        return CompletionRequest.model_validate(data)
    except ValidationError as err:
        raise from_validation(err) from None


def authorization(context: Any) -> str | None:
    """The call's `authorization` metadata (`Bearer KEY`), as HTTP's header of that name."""
    if context is None:
        return None
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return value
    return None


def trace_id(context: Any) -> str | None:
    """Serve's id of the call (it returns it to the client as `request_id` trailing metadata)."""
    getter = getattr(context, "request_id", None)
    return getter() if callable(getter) else None


def _logprobs(lps: list[TokenLogprobs]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_token_ids=[t for t, _ in lp.top],
            top_logprobs=[v for _, v in lp.top],
        )
        for lp in lps
    ]


def _usage(t: Transcript) -> pb.Usage:
    u = t.usage()
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    return pb.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_prompt_tokens=cached
    )


def _calls(calls: list[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in calls]


@dataclass
class StreamReplies:
    """One GenerateStream call's messages. With tools (`tool_format`: the model's tool-call format), a
    choice's text goes through that format's stream, as on the HTTP path: text that may open a call is
    held back, and each call is sent whole in one message once it closes. With echo, a choice's first
    message starts with its prompt."""

    request_id: str
    model: str
    tool_format: ToolCallFormat | None = None
    echo: list[str | None] | None = None
    _tool_streams: dict[int, CallStream] = field(default_factory=dict)

    def message(self, deltas: list[tuple[int, EngineDelta]]) -> pb.GenerateResponse:
        """One message for the (choice index, delta) pairs that arrived together: one Choice per
        choice index, with its consecutive deltas joined."""
        choices: dict[int, pb.Choice] = {}
        for index, d in deltas:
            c = choices.get(index)
            if c is None:
                c = choices[index] = pb.Choice(index=index)
            if self.echo and self.echo[index] is not None:
                c.text, self.echo[index] = self.echo[index], None
            text, finish = self._with_tools(index, d, c) if self.tool_format else (d.text, d.finish_reason)
            c.text += text
            c.token_ids.extend(d.token_ids)
            c.logprobs.extend(_logprobs(d.logprobs))
            if finish:
                c.finish_reason = finish
        return pb.GenerateResponse(id=self.request_id, model=self.model, choices=list(choices.values()))

    def _with_tools(self, index: int, d: EngineDelta, c: pb.Choice) -> tuple[str, str | None]:
        """The delta's text to send now, its calls added to `c`, and its finish reason."""
        assert self.tool_format is not None
        stream = self._tool_streams.get(index)
        if stream is None:
            stream = self._tool_streams[index] = self.tool_format.stream()
        content, calls, finish = feed_delta(stream, d.text, d.finished, d.finish_reason)
        c.tool_calls.extend(_calls(calls))
        return content, finish

    def usage(self, t: Transcript) -> pb.GenerateResponse:
        return pb.GenerateResponse(id=self.request_id, model=self.model, usage=_usage(t))


def unary_response(
    request_id: str,
    model: str,
    t: Transcript,
    tool_format: ToolCallFormat | None = None,
    echo: list[str | None] | None = None,
) -> pb.GenerateResponse:
    """`tool_format`: the request offered tools, so calls in a reply, in the model's tool-call format,
    are calls (as on HTTP); `echo`: each choice's prompt text, which its text starts with."""
    choices = []
    for i, c in enumerate(t.choices):
        text, calls = "".join(c.text), []
        finish = c.finish_reason or ""
        if tool_format is not None:
            content, calls = tool_format.parse(text)
            if calls:
                text, finish = content, "tool_calls" if finish == "stop" else finish
        choices.append(
            pb.Choice(
                index=i,
                text=((echo[i] or "") if echo else "") + text,
                token_ids=c.token_ids,
                finish_reason=finish,
                logprobs=_logprobs(c.logprobs),
                tool_calls=_calls(calls),
            )
        )
    return pb.GenerateResponse(id=request_id, model=model, choices=choices, usage=_usage(t))


def fail(context: Any, err: APIError) -> NoReturn:
    """Ends the call with the matching status: Serve's proxy sends the code set on the context
    when the method raises (a returned message would go out with status OK)."""
    if context is not None:
        context.set_code(STATUS_TO_GRPC.get(err.status, grpc.StatusCode.INTERNAL))
        context.set_details(err.message)
    raise err
