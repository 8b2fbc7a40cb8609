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
    finished: bool
    finish_reason: str | None = None
    delta_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    # The sequence's token list and where its output stood at this step: the whole output is sliced
    # only when read (`token_ids`). The engine core sends deltas only, and copying every sequence's
    # output every step grew the host's step with the generation's length. Later steps only add or
    # remove tokens past `output_end`, so the slice is what it was when this output was made.
    tokens: list[int] = field(default_factory=list, repr=False)
    output_start: int = 0
    output_end: int = 0

    @property
    def token_ids(self) -> list[int]:
        """Every output token so far (the deltas of all steps up to this one)."""
        return self.tokens[self.output_start : self.output_end]
