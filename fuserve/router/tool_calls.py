"""Tool calling, in the model's own format (tool_call_format.py chooses it from the chat template):

    prompt   the tools, earlier calls and tool results written into the conversation as the model was
             tuned to read them (or passed to a template that takes `tools`)
    output   tool_choice auto: whatever the model writes, its calls parsed into tool_calls
             tool_choice required / {"type": "function", ...}: a grammar makes the output one call (or,
             with parallel_tool_calls, several) of an offered function whose arguments follow its
             parameters' schema; the same parser reads it back
             tool_choice none (or no tools): plain text, tools not shown to the model

Replies carry `tool_calls` (ids, arguments as a JSON string) and finish_reason "tool_calls". Streaming
sends text as it comes but holds back what may be the start of a call, and sends each call whole.

A request carries its model's format (`ChatCompletionRequest.use_tool_format`, set by the frontend);
one that was given none uses Hermes. The formats: hermes_tool_calls.py, llama3_tool_calls.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fuserve.router.hermes_tool_calls import HERMES, ToolCallStream, parse_tool_calls
from fuserve.router.tool_call_format import ToolCallFormat, choose_tool_call_format, tool_mode

if TYPE_CHECKING:
    from fuserve.router.protocol import ChatCompletionRequest, _SamplingRequest

__all__ = [
    "ToolCallFormat",
    "ToolCallStream",
    "choose_tool_call_format",
    "parse_tool_calls",
    "render_conversation",
    "request_format",
    "tool_grammar",
    "tool_mode",
]


def request_format(req: _SamplingRequest) -> ToolCallFormat:
    """The tool-call format of the model the request is for."""
    fmt = getattr(req, "_tool_format", None)
    return fmt if isinstance(fmt, ToolCallFormat) else HERMES


def tool_grammar(req: _SamplingRequest) -> str | None:
    """The grammar of tool_choice required or named in the request's format; None else."""
    return request_format(req).grammar(req)


def render_conversation(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages for the chat template, with tools and tool traffic in its format."""
    return request_format(req).conversation(req)
