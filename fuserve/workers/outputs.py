"""What the engine hands back each step, per sequence: the new text and tokens since last time."""

from __future__ import annotations

from dataclasses import dataclass, field

from fuserve.core_messages import TokenLogprobs


@dataclass
class RequestOutput:
    request_id: str
    index: int  # which of the request's n sequences
    delta_text: str
    delta_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    delta_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
