"""From a request's structured-output options to the one llguidance grammar its output must follow.

    response_format {"type": "json_object"}                       any JSON object
    response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}   that schema
    guided_json (a schema, or its JSON text), guided_regex, guided_choice (strings), guided_grammar (Lark)
                                                                   vLLM's extras, same meaning
    tools with tool_choice required / a named function             tool_calls.py

At most one of them per request. The grammar is checked here, in the frontend, so a bad schema, regex or
grammar is a 400 naming llguidance's complaint before the request reaches the engine; the engine core
compiles it again for the tokenizer, on a thread and cached (fuserve/workers/grammar_compiler.py). The
check is cached by grammar text, so a schema sent again costs nothing here.

JSON is generated compact with `, ` and `: ` separators and no other whitespace: a model allowed free
whitespace can pad a reply with newlines until max_tokens runs out.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import llguidance

from fuserve.router.errors import bad_request

if TYPE_CHECKING:
    from fuserve.router.protocol import _SamplingRequest

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict[str, Any] | bool, param: str) -> str:
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)  # type: ignore[arg-type]
    except ValueError as err:
        raise bad_request(f"{param} is not a JSON schema: {err}", param) from None


def choice_grammar(choices: list[str], param: str) -> str:
    if not choices or any(not c for c in choices):
        raise bad_request(f"{param} must list at least one non-empty string", param)
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


@functools.lru_cache(maxsize=512)
def grammar_problem(grammar: str) -> str:
    """llguidance's error for a grammar, or '' when it compiles."""
    return llguidance.LLMatcher.validate_grammar(grammar)


def checked(grammar: str, param: str) -> str:
    problem = grammar_problem(grammar)
    if problem:
        raise bad_request(f"{param} cannot be used: {problem.strip()}", param)
    return grammar


def _response_format_grammar(fmt: dict[str, Any]) -> tuple[str, str] | None:
    """(the parameter a problem is reported on, the grammar), or None for text."""
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", json_schema_grammar({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
            raise bad_request(
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                "response_format",
            )
        param = "response_format.json_schema.schema"
        return param, json_schema_grammar(spec.get("schema", {}), param)
    raise bad_request(
        f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'", "response_format"
    )


def request_grammar(req: _SamplingRequest) -> str | None:
    """The grammar of an API request (chat or completions), checked; None when its output is free."""
    from fuserve.router.tool_calls import tool_grammar

    found: list[tuple[str, str]] = []
    if req.response_format:
        fmt = _response_format_grammar(req.response_format)
        if fmt is not None:
            found.append(fmt)
    if req.guided_json is not None:
        schema = req.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise bad_request(f"guided_json is not valid JSON: {err}", "guided_json") from None
        found.append(("guided_json", json_schema_grammar(schema, "guided_json")))
    if req.guided_regex is not None:
        found.append(("guided_regex", llguidance.LLMatcher.grammar_from_regex(req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", choice_grammar(req.guided_choice, "guided_choice")))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", llguidance.LLMatcher.grammar_from_lark(req.guided_grammar)))
    tools = tool_grammar(req)
    if tools is not None:
        found.append(("tool_choice", tools))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"one structured-output option per request, got {names}: keep one", found[1][0])
    return checked(found[0][1], found[0][0]) if found else None
