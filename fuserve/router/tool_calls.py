"""Tool calling in the Hermes format, the one ChatML models such as the default SmolLM2 are tuned on:

    prompt   the tools' signatures in the system message, inside <tools></tools>; earlier calls as
             <tool_call>{"name": ..., "arguments": {...}}</tool_call>; tool results as `tool` messages
             inside <tool_response></tool_response>
    output   tool_choice auto: whatever the model writes, its <tool_call> blocks parsed into tool_calls
             tool_choice required / {"type": "function", ...}: a grammar makes the output one call (or,
             with parallel_tool_calls, several) of an offered function whose arguments follow its
             parameters' schema; the same parser reads it back
             tool_choice none (or no tools): plain text, tools not shown to the model

Replies carry `tool_calls` (ids, arguments as a JSON string) and finish_reason "tool_calls". Streaming
(`ToolCallStream`) sends text as it comes but holds back what may be the start of a <tool_call> block,
and sends each call whole, in one chunk, once its block closes: the official client accumulates a
call's chunks by index, so one chunk per call is a valid stream.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import llguidance

from fuserve.router.errors import bad_request
from fuserve.router.guided_requests import JSON_STYLE
from fuserve.router.protocol import FunctionCall, ToolCall

if TYPE_CHECKING:
    from fuserve.router.protocol import ChatCompletionRequest, Tool, _SamplingRequest

START, END = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)


def tool_mode(req: _SamplingRequest) -> str:
    """none | auto | required | named, for a chat request (completions have no tools)."""
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if not tools or choice == "none":
        return "none"
    if choice is None or choice == "auto":
        return "auto"
    return "required" if choice == "required" else "named"


def _named_tool(req: ChatCompletionRequest) -> Tool:
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


def _call_schema(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(req: _SamplingRequest) -> str | None:
    """The grammar of tool_choice required or named (llguidance Lark with JSON-schema bodies); None else."""
    mode = tool_mode(req)
    if mode not in ("required", "named"):
        return None
    chat: ChatCompletionRequest = req  # type: ignore[assignment]
    tools = [_named_tool(chat)] if mode == "named" else list(chat.tools or [])
    schemas = [_call_schema(t) for t in tools]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = {**body, "x-guidance": JSON_STYLE}
    repeat = ' ("\\n" call)*' if chat.parallel_tool_calls and mode == "required" else ""
    lark = f'start: call{repeat}\ncall: "{START}\\n" body "\\n{END}"\nbody: %json {json.dumps(body)}\n'
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _call_text(call: ToolCall) -> str:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        arguments = call.function.arguments
    return f"{START}\n{json.dumps({'name': call.function.name, 'arguments': arguments})}\n{END}"


def render_conversation(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages for the chat template, with tools and tool traffic in the Hermes format."""
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if m.role == "assistant" and m.tool_calls:
            content = "\n".join([content, *(_call_text(c) for c in m.tool_calls)]).lstrip("\n")
        elif m.role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tool_mode(req) != "none":
        listed = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in req.tools or [])
        prompt = SYSTEM_PROMPT.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _tool_call(block: str) -> ToolCall | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=call["name"], arguments=json.dumps(arguments)),
    )


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The text outside <tool_call> blocks, and the calls inside them. A block that does not parse as
    a call stays in the text; an unclosed last block counts when its JSON is whole."""
    content, calls, rest = [], [], text
    while START in rest:
        before, _, after = rest.partition(START)
        body, closed, rest = after.partition(END)
        call = _tool_call(body.strip())
        if call is None:
            content.append(before + START + body + (END if closed else ""))
        else:
            content.append(before)
            calls.append(call)
    content.append(rest)
    return "".join(content).strip() if calls else "".join(content), calls


class ToolCallStream:
    """One streamed choice's text, split into content deltas and whole tool calls as it arrives."""

    def __init__(self) -> None:
        self._held = ""  # text that is, or may become, a <tool_call> block
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._held += text
        content, calls = [], []
        while True:
            start = self._held.find(START)
            if start < 0:
                keep = _partial_prefix(self._held, START)
                content.append(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep :]
                break
            end = self._held.find(END, start)
            if end < 0:
                content.append(self._held[:start])
                self._held = self._held[start:]
                break
            before, block = self._held[:start], self._held[start + len(START) : end]
            self._held = self._held[end + len(END) :]
            call = _tool_call(block.strip())
            if call is None:
                content.append(before + START + block + END)
            else:
                content.append(before)
                calls.append(call)
        self.num_calls += len(calls)
        return self._trim("".join(content)), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the stream: a held unclosed block is a call if its JSON is whole, else text."""
        held, self._held = self._held, ""
        if held.startswith(START):
            call = _tool_call(held[len(START) :].strip())
            if call is not None:
                self.num_calls += 1
                return "", [call]
        return self._trim(held), []

    def _trim(self, text: str) -> str:
        """Whitespace between calls is not content."""
        return text.strip() if self.num_calls and not text.strip() else text


def _partial_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
