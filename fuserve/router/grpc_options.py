"""A gRPC request's OpenAI options (structured outputs, tools, logit_bias, echo) as OpenAI request fields.

    response_format {type, json_schema {name, schema (JSON text), strict}}   -> response_format
    guided_json (JSON text), guided_regex, guided_choice, guided_grammar     -> the same names
    tools [{name, description, parameters (JSON text), strict}], tool_choice {mode | function},
    parallel_tool_calls                                                       -> tools, tool_choice, ...
    logit_bias {token id: bias}, echo                                         -> logit_bias, echo

Only the shape changes here: the fields go into the same pydantic request the OpenAI routes build, so
the checks, the grammar (guided_requests.py, tool_calls.py) and every error message are the HTTP path's
own. What only gRPC can get wrong is refused here: JSON text that does not parse, and an option that
does not fit the request's kind (tools on a prompt, echo on messages), which HTTP's models would ignore.
"""

from __future__ import annotations

import json
from typing import Any

from fuserve.router.errors import bad_request
from fuserve.router.proto import fuserve_pb2 as pb

_GUIDED = ("guided_json", "guided_regex", "guided_grammar")


def json_text(text: str, param: str) -> Any:
    """The value of a field that holds JSON as text; a 400 naming the field when it does not parse."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise bad_request(
            f"{param} is not valid JSON text ({err}); send the JSON as a string", param
        ) from None


def message_fields(m: pb.ChatMessage) -> dict[str, Any]:
    """A chat message, with an assistant's earlier tool calls and a tool message's call id."""
    data: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        data["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        data["tool_call_id"] = m.tool_call_id
    return data


def _response_format(f: pb.ResponseFormat) -> dict[str, Any]:
    out: dict[str, Any] = {"type": f.type or "text"}
    if f.HasField("json_schema"):
        spec: dict[str, Any] = {"name": f.json_schema.name}
        if f.json_schema.schema:
            spec["schema"] = json_text(f.json_schema.schema, "response_format.json_schema.schema")
        if f.json_schema.HasField("strict"):
            spec["strict"] = f.json_schema.strict
        out["json_schema"] = spec
    return out


def _tool(t: pb.Tool, i: int) -> dict[str, Any]:
    function: dict[str, Any] = {"name": t.name, "description": t.description or None}
    if t.parameters:
        function["parameters"] = json_text(t.parameters, f"tools[{i}].parameters")
    if t.HasField("strict"):
        function["strict"] = t.strict
    return {"type": "function", "function": function}


def _tool_choice(c: pb.ToolChoice) -> str | dict[str, Any] | None:
    kind = c.WhichOneof("choice")
    if kind == "function":
        return {"type": "function", "function": {"name": c.function}}
    return c.mode if kind == "mode" else None


def option_fields(r: pb.GenerateRequest, chat: bool) -> dict[str, Any]:
    """The request's options as OpenAI request fields (unset ones left out, so defaults apply)."""
    data: dict[str, Any] = {name: getattr(r, name) for name in _GUIDED if r.HasField(name)}
    if r.guided_choice:
        data["guided_choice"] = list(r.guided_choice)
    if r.HasField("response_format"):
        data["response_format"] = _response_format(r.response_format)
    if r.logit_bias:
        data["logit_bias"] = {str(token): bias for token, bias in r.logit_bias.items()}
    tools = r.tools or r.HasField("tool_choice") or r.HasField("parallel_tool_calls")
    if tools and not chat:
        raise bad_request("tools and tool_choice need messages (a chat request); send messages", "tools")
    if r.echo and chat:
        raise bad_request("echo applies to prompt and prompt_token_ids requests, not messages", "echo")
    if chat:
        if r.tools:
            data["tools"] = [_tool(t, i) for i, t in enumerate(r.tools)]
        if r.HasField("tool_choice"):
            data["tool_choice"] = _tool_choice(r.tool_choice)
        if r.HasField("parallel_tool_calls"):
            data["parallel_tool_calls"] = r.parallel_tool_calls
    else:
        data["echo"] = r.echo
    return data
