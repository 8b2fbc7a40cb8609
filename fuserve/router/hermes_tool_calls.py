"""Tool calling in the Hermes format, the one ChatML models such as the default SmolLM2 are tuned on:

    prompt   the tools' signatures in the system message, inside <tools></tools>; earlier calls as
             <tool_call>{"name": ..., "arguments": {...}}</tool_call>; tool results as `tool` messages
             inside <tool_response></tool_response>
    output   <tool_call> blocks, each one call; text outside them is content

Streaming sends text as it comes but holds back what may be the start of a <tool_call> block, and
sends each call whole, in one chunk, once its block closes: the official client accumulates a call's
chunks by index, so one chunk per call is a valid stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fuserve.router.protocol import ToolCall
from fuserve.router.tool_call_format import ToolCallFormat, call_arguments, partial_prefix, tool_call

START, END = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)


def _block_call(block: str) -> ToolCall | None:
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    return tool_call(obj, "arguments", "parameters")


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The text outside <tool_call> blocks, and the calls inside them. A block that does not parse as
    a call stays in the text; an unclosed last block counts when its JSON is whole."""
    content, calls, rest = [], [], text
    while START in rest:
        before, _, after = rest.partition(START)
        body, closed, rest = after.partition(END)
        call = _block_call(body.strip())
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
                keep = partial_prefix(self._held, START)
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
            call = _block_call(block.strip())
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
            call = _block_call(held[len(START) :].strip())
            if call is not None:
                self.num_calls += 1
                return "", [call]
        return self._trim(held), []

    def _trim(self, text: str) -> str:
        """Whitespace between calls is not content."""
        return text.strip() if self.num_calls and not text.strip() else text


@dataclass(frozen=True)
class HermesFormat(ToolCallFormat):
    name = "hermes"
    arguments_key = "arguments"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        return SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))

    def calls_text(self, calls: list[ToolCall]) -> str:
        return "\n".join(
            f"{START}\n{json.dumps({'name': c.function.name, 'arguments': call_arguments(c)})}\n{END}"
            for c in calls
        )

    def tool_result(self, content: str) -> dict[str, str]:
        return {"role": "tool", "content": f"<tool_response>\n{content}\n</tool_response>"}

    def calls_lark(self, body: dict[str, Any], parallel: bool) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return f'start: call{repeat}\ncall: "{START}\\n" body "\\n{END}"\nbody: %json {json.dumps(body)}\n'

    def auto_lark(self, body: dict[str, Any]) -> str:
        # One lexeme for the text before the first call, marker included, so that the lexer never has
        # to choose between more text and the marker (two lexemes there made every call unreachable).
        return (
            f"start: TEXT | OPEN calls\n"
            f'calls: call ("\\n{START}" call)*\n'
            f'call: "\\n" body "\\n{END}"\n'
            f"body: %json {json.dumps(body)}\n"
            f"TEXT: /(?s:.*)/ & ~/(?s:.*){START}(?s:.*)/\n"
            f"OPEN: /(?s:.*){START}/ & ~/(?s:.*){START}(?s:.+)/\n"
        )

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        return parse_tool_calls(text)

    def stream(self) -> ToolCallStream:
        return ToolCallStream()


HERMES = HermesFormat()
