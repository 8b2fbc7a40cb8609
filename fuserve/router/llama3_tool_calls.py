"""Tool calling in the Llama-3 JSON format, the one Llama-3.1/3.2/3.3 Instruct models are tuned on:

    prompt   the tools as JSON in the prompt, with the instruction to answer a call as
             {"name": function name, "parameters": dictionary of argument name and its value} (the
             model's own template does this when it takes `tools`, as Llama-3.1's does); earlier calls
             as that JSON; tool results in the `ipython` role
    output   a reply that is a call: JSON objects `{"name": ..., "parameters": {...}}` (`arguments` is
             read too), several separated by `; `, optionally after <|python_tag|>; text before a
             <|python_tag|> is content. Any other reply is content.

A reply is a call only from its start (after whitespace) or from a <|python_tag|>: a JSON object in the
middle of prose is prose. <|python_tag|> is a special token, so it is in the text only when the request
keeps special tokens; either way the JSON after it reads the same.

Streaming holds back a reply's start while it may be a call (whitespace, a partial <|python_tag|>, a
JSON object not yet closed) and sends each call whole once its object closes; a JSON object that is not
a call, or text after the calls, is sent as content. `parse` is the stream fed the whole reply at once,
so streaming and non-streaming give the same calls and content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fuserve.router.protocol import ToolCall
from fuserve.router.tool_call_format import ToolCallFormat, call_arguments, partial_prefix, tool_call

PYTHON_TAG = "<|python_tag|>"
_SEPARATORS = " \t\r\n;"  # between parallel calls: "; " as Llama-3.2 writes them, or whitespace
_decoder = json.JSONDecoder()

SYSTEM_PROMPT = (
    "You have access to the following functions. To call a function, please respond with JSON for a "
    'function call. Respond in the format {{"name": function name, "parameters": dictionary of argument '
    "name and its value}}. Do not use variables.\n\n{tools}"
)


class Llama3CallStream:
    """One streamed choice's text, split into content deltas and whole tool calls as it arrives."""

    def __init__(self) -> None:
        self._held = ""  # text not yet sent: the reply's start, a partial tag, an open JSON object
        self._state = "start"  # start: nothing decided | text: content | calls: after a call or the tag
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._held += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._step(content, calls):
            pass
        self.num_calls += len(calls)
        return "".join(content), calls

    def _step(self, content: list[str], calls: list[ToolCall]) -> bool:
        """One move of the state machine; False when it must wait for more text."""
        held = self._held
        if self._state == "start":
            s = held.lstrip()
            if not s or (len(s) < len(PYTHON_TAG) and PYTHON_TAG.startswith(s)):
                return False  # the reply's start: whitespace, or what may become the tag
            if s.startswith(PYTHON_TAG):
                self._held, self._state = s[len(PYTHON_TAG) :], "calls"
            else:
                self._held, self._state = (s, "calls") if s.startswith("{") else (held, "text")
            return True
        if self._state == "text":
            tag = held.find(PYTHON_TAG)
            if tag >= 0:
                content.append(held[:tag])
                self._held, self._state = held[tag + len(PYTHON_TAG) :], "calls"
                return True
            keep = partial_prefix(held, PYTHON_TAG)
            content.append(held[: len(held) - keep])
            self._held = held[len(held) - keep :]
            return False
        s = held.lstrip(_SEPARATORS)  # between calls: not content
        self._held = s
        if not s:
            return False
        if not s.startswith("{"):
            self._state = "text"
            return True
        try:
            obj, end = _decoder.raw_decode(s)
        except json.JSONDecodeError:
            return False  # not closed yet (or never: then finish() sends it as content)
        call = tool_call(obj, "parameters", "arguments")
        if call is None:
            self._state = "text"  # a JSON object that is not a call is content, and so is what follows
            return True
        calls.append(call)
        self._held = s[end:]
        return True

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the stream: what is held (whitespace, a partial tag, an unclosed or malformed
        JSON object, separators after the last call) is content."""
        held, self._held = self._held, ""
        if self._state == "calls":
            held = held.lstrip(_SEPARATORS)
        self._state = "text"
        return held, []


@dataclass(frozen=True)
class Llama3JsonFormat(ToolCallFormat):
    name = "llama3_json"
    arguments_key = "parameters"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        return SYSTEM_PROMPT.format(tools="".join(json.dumps(t, indent=4) + "\n\n" for t in tools))

    def calls_text(self, calls: list[ToolCall]) -> str:
        return "; ".join(
            json.dumps({"name": c.function.name, "parameters": call_arguments(c)}) for c in calls
        )

    def tool_result(self, content: str) -> dict[str, str]:
        return {"role": "ipython", "content": content}

    def calls_lark(self, body: dict[str, Any], parallel: bool) -> str:
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: %json {json.dumps(body)}\n"

    def auto_lark(self, body: dict[str, Any]) -> str:
        # Words (not starting like a JSON call), or calls, bare or after <|python_tag|>. Text before the
        # tag is not offered: one free-text lexeme that may or may not end at the tag left the bare
        # calls unreachable (the lexer took their "{" as text).
        return (
            "start: TEXT | <|python_tag|>? calls\n"
            'calls: call ("; " call)*\n'
            f"call: %json {json.dumps(body)}\n"
            "TEXT: /(?s:[^{\\s].*)?/\n"
        )

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        stream = Llama3CallStream()
        content, calls = stream.feed(text)
        rest, _ = stream.finish()
        content += rest
        return (content.strip(), calls) if calls else (content, calls)

    def stream(self) -> Llama3CallStream:
        return Llama3CallStream()


LLAMA3_JSON = Llama3JsonFormat()
