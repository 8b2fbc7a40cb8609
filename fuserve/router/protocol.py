"""The OpenAI API's request and response bodies, as pydantic models, and their sampling settings.

Requests are validated here, before anything is tokenized or routed, so a wrong type or a value
out of range is a 400 that names the field (pydantic). Fields the OpenAI API has and fuserve
cannot honor (suffix, best_of...) are refused by `check()` with a message rather than silently
ignored; unknown fields are ignored, as OpenAI's own server does. `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens` and the `guided_*`
fields are extensions (vLLM's names). Structured outputs (`response_format`, `guided_*`, `tools`)
become one grammar in guided_requests.py and tool_calls.py.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from fuserve.router.errors import bad_request
from fuserve.sampling_params import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, SamplingParams
from fuserve.workers.models.generation_config import SAMPLING_FIELDS

# settings whose default, when a request leaves them unset, is the model's own (generation_config.py)
MODEL_DEFAULTABLE = tuple(SAMPLING_FIELDS)
# a token id as a request may send it: the engine checks it against the vocabulary; this bound keeps
# a number too large for the engine core's message encoding (64-bit) from reaching it
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _SamplingRequest(BaseModel):
    """Settings shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = Field(default=None, ge=0, lt=2**31)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    timeout: float | None = Field(default=None, gt=0.0, le=86400.0)  # seconds; deadline of this request
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _check_common(self) -> None:
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit() or not -100.0 <= bias <= 100.0:
                raise bad_request(
                    f"logit_bias maps token ids to biases in [-100, 100]; got {token!r}: {bias}", "logit_bias"
                )
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")

    def _sampling(
        self, max_tokens: int | None, logprobs: int | None, defaults: dict[str, float | int]
    ) -> SamplingParams:
        """Settings the request leaves unset (None) take the model's default, else fuserve's."""
        chosen = {name: getattr(self, name) for name in MODEL_DEFAULTABLE}
        unset = {name: defaults[name] for name, value in chosen.items() if value is None and name in defaults}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            **{name: value for name, value in chosen.items() if value is not None},
            **unset,
            n=self.n,
            max_tokens=max_tokens,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(t): b for t, b in (self.logit_bias or {}).items()},
            grammar=self.grammar(),
        )

    def grammar(self) -> str | None:
        """The grammar the output must follow (400 when it is bad), or None."""
        from fuserve.router.guided_requests import request_grammar

        return request_grammar(self)

    @property
    def parses_tool_calls(self) -> bool:
        return False

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None and self.logprobs is not False  # type: ignore[attr-defined]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        """Refuse what fuserve does not implement (pydantic already checked types and ranges)."""
        self._check_common()
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported by fuserve (no prompt logprobs)", "echo")
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported by fuserve; remove it", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported by fuserve; use n", "best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("prompt is an empty list: send at least one prompt", "prompt")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):  # validated as one of the union's lists: homogeneous
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def sampling_params(
        self, max_tokens: int | None, defaults: dict[str, float | int] | None = None
    ) -> SamplingParams:
        return self._sampling(max_tokens, self.logprobs, defaults or {})


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    _tool_format: Any = PrivateAttr(default=None)  # the model's ToolCallFormat; None: Hermes

    def check(self) -> None:
        """Refuse what fuserve does not implement (pydantic already checked types and ranges)."""
        self._check_common()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them; tools, earlier tool calls and tool results are
        written in the model's tool-call format (tool_calls.py)."""
        from fuserve.router.tool_calls import render_conversation

        return render_conversation(self)

    def use_tool_format(self, fmt: Any) -> None:
        """Sets the model's tool-call format (a ToolCallFormat), which the prompt, the grammar and the
        reply's parsing follow; the frontend sets it from the model's chat template."""
        self._tool_format = fmt

    @property
    def tool_format(self) -> Any:
        """The model's ToolCallFormat (Hermes unless `use_tool_format` set another)."""
        from fuserve.router.tool_calls import request_format

        return request_format(self)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools to pass to the chat template itself (one that takes `tools`), or None."""
        return self.tool_format.template_tools(self)

    @property
    def parses_tool_calls(self) -> bool:
        from fuserve.router.tool_calls import tool_mode

        return tool_mode(self) != "none"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(
        self, max_tokens: int | None, defaults: dict[str, float | int] | None = None
    ) -> SamplingParams:
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, defaults or {})


# ---- responses ------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ToolCallsMessage(BaseModel):
    """An assistant reply that calls tools (plain replies keep AssistantMessage's shape)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage | ToolCallsMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ToolCallsDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall]


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage | ToolCallsDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fuserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
