"""How one request wants its tokens chosen and when it wants to stop.

Validated when the request arrives, so a bad value fails that request alone with a message that
names the field, and never reaches the engine loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this temperature a draw is the argmax: logits / T would overflow float32 (or leave one token with
# all the mass anyway), and softmax of an overflow is NaN, which used to end a completion at once.
GREEDY_BELOW_TEMPERATURE = 1e-5
# logits divided or multiplied by a penalty outside this range overflow float32 (inf, then NaN)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-3, 1e3
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty")
FLOAT_FIELDS += ("repetition_penalty",)


class RequestError(ValueError):
    """A request the engine refuses; the message says which field and why (HTTP 400)."""


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # added to the logits before sampling, token id -> bias in [-100, 100] (OpenAI's logit_bias)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # an llguidance grammar the output must follow (built by fuserve/router/guided_requests.py from
    # response_format, tools or the guided_* extras); None: unconstrained
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self) -> None:
        def bad(msg: str) -> RequestError:
            return RequestError(msg)

        for name in FLOAT_FIELDS:
            if not math.isfinite(getattr(self, name)):
                raise bad(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.n < 1:
            raise bad(f"n must be at least 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0.0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop strings must be non-empty strings")
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise bad(f"logit_bias keys must be token ids >= 0, got {token}")
            if not -100.0 <= bias <= 100.0:
                raise bad(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
