"""What every tool-call format shares, and which format a model gets.

A model is tuned to call tools in one textual format, the one its chat template renders earlier calls
in. A `ToolCallFormat` holds everything that differs between formats, behind one interface:

    conversation / template_tools   the tools and tool traffic in the conversation for the template:
                                    a template that itself takes `tools` gets them, and the calls and
                                    results as HF's apply_chat_template passes them; any other template
                                    gets them written into the messages in the format's own words
    grammar                         tool_choice required / named: one call (or several, with
                                    parallel_tool_calls) of an offered function, its arguments following
                                    the function's parameters' schema
    parse / stream                  tool_choice auto: the calls in a whole reply, or in a streamed one
                                    (what may be the start of a call is held back, each call sent whole)

The formats: Hermes `<tool_call>` blocks (hermes_tool_calls.py) for ChatML models (the default
SmolLM2) and any template not recognised, Llama-3 JSON (llama3_tool_calls.py) for templates with
Llama-3 headers. `model.tool_call_format` forces one.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import llguidance

from fuserve.router.errors import bad_request
from fuserve.router.guided_requests import JSON_STYLE
from fuserve.router.protocol import FunctionCall, ToolCall

if TYPE_CHECKING:
    from fuserve.router.protocol import ChatCompletionRequest, Tool, _SamplingRequest

# A template that names `tools` renders them itself (as HF's apply_chat_template lets it).
_TAKES_TOOLS = re.compile(r"\btools\b")


def tool_mode(req: _SamplingRequest) -> str:
    """none | auto | required | named, for a chat request (completions have no tools)."""
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if not tools or choice == "none":
        return "none"
    if choice is None or choice == "auto":
        return "auto"
    return "required" if choice == "required" else "named"


def named_tool(req: ChatCompletionRequest) -> Tool:
    choice = req.tool_choice
    assert isinstance(choice, dict)
    name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise bad_request(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    for tool in req.tools or []:
        if tool.function.name == name:
            return tool
    offered = ", ".join(t.function.name for t in req.tools or [])
    raise bad_request(f"tool_choice names {name!r}, which is not among the tools ({offered})", "tool_choice")


def call_arguments(call: ToolCall) -> Any:
    """An earlier call's arguments as JSON (the API sends them as a string), for the template."""
    try:
        return json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        return call.function.arguments


def tool_call(obj: Any, *keys: str) -> ToolCall | None:
    """A call from a parsed JSON object `{"name": ..., <key>: {...}}` (the first of `keys` present), or
    None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = next((obj[k] for k in keys if k in obj), {})
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=obj["name"], arguments=json.dumps(arguments)),
    )


def partial_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class CallStream(Protocol):
    """One streamed choice's text, split into content deltas and whole tool calls as it arrives."""

    num_calls: int

    def feed(self, text: str) -> tuple[str, list[ToolCall]]: ...

    def finish(self) -> tuple[str, list[ToolCall]]: ...


def feed_delta(
    stream: CallStream, text: str, finished: bool, finish_reason: str | None
) -> tuple[str, list[ToolCall], str | None]:
    """One streamed delta through a choice's call stream, as HTTP's SSE and gRPC's streams both send it:
    the content to send now, the calls completed, and the finish reason (a choice that stopped after
    calling ends with "tool_calls")."""
    content, calls = stream.feed(text)
    if finished:
        more_content, more_calls = stream.finish()
        content, calls = content + more_content, calls + more_calls
        if stream.num_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
    return content, calls, finish_reason


@dataclass(frozen=True)
class ToolCallFormat(ABC):
    """One tool-call format, for one model's chat template."""

    template_takes_tools: bool = False

    name: ClassVar[str]
    arguments_key: ClassVar[str]  # the key a call's arguments are under in the model's JSON

    # ---- the prompt -----------------------------------------------------------------------------
    @abstractmethod
    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """The tools offered and how to call them, for a template that does not take `tools`."""

    @abstractmethod
    def calls_text(self, calls: list[ToolCall]) -> str:
        """An assistant's earlier calls as the model writes them."""

    @abstractmethod
    def tool_result(self, content: str) -> dict[str, str]:
        """A `tool` message as the template takes it, for a template that does not take `tools`."""

    def template_tools(self, req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
        """The tools to pass to the template itself, or None (the template does not take them, or the
        request shows none to the model)."""
        if not self.template_takes_tools or tool_mode(req) == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in req.tools or []]

    def conversation(self, req: ChatCompletionRequest) -> list[dict[str, Any]]:
        """The request's messages for the chat template, with tools and tool traffic in this format."""
        if self.template_takes_tools:
            return [_hf_message(m) for m in req.messages]
        out: list[dict[str, Any]] = []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            content = m.text()
            if m.role == "assistant" and m.tool_calls:
                content = "\n".join([content, self.calls_text(m.tool_calls)]).lstrip("\n")
            elif m.role == "tool":
                out.append(self.tool_result(content))
                continue
            out.append({"role": role, "content": content})
        if tool_mode(req) != "none":
            prompt = self.system_prompt([t.model_dump(exclude_none=True) for t in req.tools or []])
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    # ---- tool_choice required / named ----------------------------------------------------------
    @abstractmethod
    def calls_lark(self, body: dict[str, Any], parallel: bool) -> str:
        """The Lark grammar of one call (or several, `parallel`) whose JSON follows `body`."""

    @abstractmethod
    def auto_lark(self, body: dict[str, Any]) -> str:
        """The Lark grammar of tool_choice auto with strict tools: free text, or text the format lets
        open a call and then calls whose JSON follows `body` (the model may still answer in words)."""

    def grammar(self, req: _SamplingRequest) -> str | None:
        """The grammar of tool_choice required or named, and of auto when some tool is `strict`
        (llguidance Lark with JSON-schema bodies); None where the output is free."""
        mode = tool_mode(req)
        chat: ChatCompletionRequest = req  # type: ignore[assignment]
        strict = mode == "auto" and any(t.function.strict for t in chat.tools or [])
        if mode not in ("required", "named") and not strict:
            return None
        tools = [named_tool(chat)] if mode == "named" else list(chat.tools or [])
        schemas = [self._call_schema(t, constrain=mode != "auto" or bool(t.function.strict)) for t in tools]
        body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        body = {**body, "x-guidance": JSON_STYLE}
        if strict:
            return llguidance.LLMatcher.grammar_from_lark(self.auto_lark(body))
        lark = self.calls_lark(body, bool(chat.parallel_tool_calls and mode == "required"))
        return llguidance.LLMatcher.grammar_from_lark(lark)

    def _call_schema(self, tool: Tool, constrain: bool = True) -> dict[str, Any]:
        """A call of `tool`; with `constrain` off (a tool that is not strict, offered under auto beside
        strict ones) its arguments are any JSON object."""
        params = tool.function.parameters or {"type": "object", "properties": {}}
        if not constrain:
            params = {"type": "object"}
        return {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, self.arguments_key: params},
            "required": ["name", self.arguments_key],
            "additionalProperties": False,
        }

    # ---- tool_choice auto ----------------------------------------------------------------------
    @abstractmethod
    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole reply's content (outside the calls) and its calls."""

    @abstractmethod
    def stream(self) -> CallStream:
        """A parser for one streamed choice: the same calls and content as `parse`."""


def _hf_message(m: Any) -> dict[str, Any]:
    """A message as HF's apply_chat_template takes it: calls with their arguments as JSON objects,
    tool results with the call they answer."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.role == "assistant" and m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": call_arguments(c)},
            }
            for c in m.tool_calls
        ]
    if m.role == "tool" and m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


FORMATS = ("auto", "hermes", "llama3_json")


def detect_format(chat_template: str | None) -> str:
    """The format a chat template's model was tuned on: Llama-3 JSON for Llama-3 headers (unless the
    template writes Hermes `<tool_call>` blocks itself), Hermes for ChatML and anything else."""
    if chat_template is None or "<tool_call>" in chat_template:
        return "hermes"
    if "<|start_header_id|>" in chat_template:
        return "llama3_json"
    return "hermes"


def choose_tool_call_format(chat_template: str | None, override: str = "auto") -> ToolCallFormat:
    """The model's format: `override` (model.tool_call_format) unless it is `auto`, else detected."""
    from fuserve.router.hermes_tool_calls import HermesFormat
    from fuserve.router.llama3_tool_calls import Llama3JsonFormat

    if override not in FORMATS:
        raise ValueError(f"model.tool_call_format {override!r} is not one of {', '.join(FORMATS)}")
    name = detect_format(chat_template) if override == "auto" else override
    takes_tools = bool(chat_template and _TAKES_TOOLS.search(chat_template))
    kind = HermesFormat if name == "hermes" else Llama3JsonFormat
    return kind(template_takes_tools=takes_tools)
