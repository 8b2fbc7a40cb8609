"""The gRPC API (fuserve/router/proto/fuserve.proto) mapped onto the same path as HTTP.

A `GenerateRequest` becomes the equivalent OpenAI request model (so both APIs share one set of
checks and defaults), deltas become `GenerateResponse` messages, and an `APIError` becomes the
matching gRPC status code with the same message. Serve's gRPC proxy calls the ingress methods
`Generate` and `GenerateStream` by name; it is started with `SERVICER_FUNCTION` below.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from pydantic import ValidationError

from fuserve.core_messages import TokenLogprobs
from fuserve.router.engine_messages import EngineDelta
from fuserve.router.errors import APIError, bad_request, from_validation
from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.protocol import ChatCompletionRequest, CompletionRequest
from fuserve.router.responses import Transcript

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
    try:
        if r.messages:
            data["messages"] = [{"role": m.role, "content": m.content} for m in r.messages]
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


def stream_message(request_id: str, model: str, deltas: list[tuple[int, EngineDelta]]) -> pb.GenerateResponse:
    """One message for the (choice index, delta) pairs that arrived together: one Choice per choice
    index, with its consecutive deltas joined."""
    choices: dict[int, pb.Choice] = {}
    for index, d in deltas:
        c = choices.get(index)
        if c is None:
            c = choices[index] = pb.Choice(index=index)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        c.logprobs.extend(_logprobs(d.logprobs))
        if d.finish_reason:
            c.finish_reason = d.finish_reason
    return pb.GenerateResponse(id=request_id, model=model, choices=list(choices.values()))


def usage_message(request_id: str, model: str, t: Transcript) -> pb.GenerateResponse:
    return pb.GenerateResponse(id=request_id, model=model, usage=_usage(t))


def unary_response(request_id: str, model: str, t: Transcript) -> pb.GenerateResponse:
    choices = [
        pb.Choice(
            index=i,
            text="".join(c.text),
            token_ids=c.token_ids,
            finish_reason=c.finish_reason or "",
            logprobs=_logprobs(c.logprobs),
        )
        for i, c in enumerate(t.choices)
    ]
    return pb.GenerateResponse(id=request_id, model=model, choices=choices, usage=_usage(t))


def fail(context: Any, err: APIError) -> NoReturn:
    """Ends the call with the matching status: Serve's proxy sends the code set on the context
    when the method raises (a returned message would go out with status OK)."""
    if context is not None:
        context.set_code(STATUS_TO_GRPC.get(err.status, grpc.StatusCode.INTERNAL))
        context.set_details(err.message)
    raise err
