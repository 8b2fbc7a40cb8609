"""From an OpenAI request to engine requests: tokenize, check the length, estimate the work.

The ingress does this before routing, so the router knows each request's cost in tokens and its
leading prompt blocks, and an over-long prompt is refused without occupying a replica.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fuserve.router.engine_messages import EngineRequest, ModelInfo
from fuserve.router.errors import bad_request
from fuserve.router.routing_policy import prefix_keys
from fuserve.sampling_params import RequestError, SamplingParams
from fuserve.workers.tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer | None, prompt: str | list[int], param: str) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_request(
                "this model has no tokenizer (dummy weights): send token ids as the prompt", param
            )
        return tokenizer.encode(prompt)
    return list(prompt)


def encode_chat(
    tokenizer: Tokenizer | None,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Renders the model's chat template (or a plain default) and tokenizes it: the template
    already holds the special tokens, so none are added again. `tools` go to a template that takes
    them (tool_call_format.py)."""
    if tokenizer is None:
        raise bad_request("this model has no tokenizer (dummy weights), so it cannot chat", "messages")
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt, tools)
    except Exception as err:  # a template's raise_exception, e.g. roles that must alternate
        raise bad_request(f"the model's chat template refused these messages: {err}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def resolve_max_tokens(
    num_prompt_tokens: int, max_tokens: int | None, info: ModelInfo, prompt_param: str, max_tokens_param: str
) -> int:
    """`max_tokens` as the engine will use it, or a 400 that says why not. Unset, it is the room left in
    the context, capped by the model's generation_config max_new_tokens where it has one."""
    limit = info.max_model_len
    if num_prompt_tokens == 0:
        raise bad_request("the prompt is empty: send at least one token of text", prompt_param)
    if num_prompt_tokens >= limit:
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens but this model's max_model_len is {limit}: "
            "shorten the prompt (leave room for at least one output token)",
            prompt_param,
            "context_length_exceeded",
        )
    room = limit - num_prompt_tokens
    if max_tokens is None:
        return room if info.default_max_tokens is None else min(room, info.default_max_tokens)
    if max_tokens > room:
        raise bad_request(
            f"the prompt ({num_prompt_tokens} tokens) plus {max_tokens_param} ({max_tokens}) exceeds this "
            f"model's max_model_len {limit}: lower {max_tokens_param} to at most {room}",
            max_tokens_param,
            "context_length_exceeded",
        )
    return max_tokens


def sampling_or_400(
    build: Callable[[int, dict[str, float | int]], SamplingParams],
    max_tokens: int,
    defaults: dict[str, float | int],
) -> SamplingParams:
    """Calls `build(max_tokens, the model's sampling defaults)`; SamplingParams' own checks become 400s."""
    try:
        return build(max_tokens, defaults)
    except RequestError as err:
        raise bad_request(str(err)) from None


def engine_request(
    request_id: str, token_ids: list[int], params: SamplingParams, info: ModelInfo
) -> EngineRequest:
    assert params.max_tokens is not None
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=token_ids,
        params=params,
        work_tokens=params.n * (len(token_ids) + params.max_tokens),
        prefix_keys=prefix_keys(token_ids, info.block_size),
        block_size=info.block_size,
    )
