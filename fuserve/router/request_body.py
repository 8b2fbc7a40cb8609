"""An HTTP request body, from bytes to a JSON object fit for the protocol models, or a 4xx that says why.

    data = parse_json_object(await read_body(request, limit))

Every way a body can be wrong ends here as a 400 or 413, never as an exception from deeper down
(the fuzz in tests/test_reliability_serve.py found each of these as a 500 before):
- larger than `serve.max_request_bytes` (413, checked while reading, so a huge body is not buffered);
- bytes that are not UTF-8 (JSON's only encoding, RFC 8259);
- not JSON, or JSON with `NaN`/`Infinity`, numbers that overflow a float, or integers of thousands of
  digits (Python refuses to parse those);
- nested deeper than any request needs (`MAX_DEPTH`), which would otherwise exhaust the recursion limit;
- lone UTF-16 surrogates (`"\\udc80"` is valid JSON, but no UTF-8 string holds one, so tokenizers and
  response encoders fail on it): each becomes U+FFFD, the replacement character, as a UTF-8 decoder
  treats an invalid sequence.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request

from fuserve.router.errors import APIError, bad_request, from_json_error, too_large

MAX_DEPTH = 32  # an OpenAI request nests 4 deep (messages -> content part -> text); 32 is plenty
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _invalid_number(text: str) -> APIError:
    return bad_request(
        f"the request body holds the number {text[:40]!r}, which is not a finite JSON number; "
        "send plain finite numbers",
        None,
        "invalid_json",
    )


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _invalid_number(text)
    return value


def _parse_constant(text: str) -> float:
    raise _invalid_number(text)


def clean_text(s: str) -> str:
    """`s` with each lone surrogate replaced by U+FFFD: a string any UTF-8 encoder takes."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", s)


def clean(value: Any, depth: int = 0) -> Any:
    """The parsed JSON value with every string cleaned; a 400 past MAX_DEPTH levels of nesting."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            raise bad_request(
                f"the request body nests more than {MAX_DEPTH} levels deep; no request needs that",
                None,
                "invalid_json",
            )
        if isinstance(value, dict):
            return {clean_text(k): clean(v, depth + 1) for k, v in value.items()}
        return [clean(v, depth + 1) for v in value]
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad_request(
            f"the request body is not valid UTF-8 (byte {err.start} is {body[err.start : err.start + 1]!r}); "
            "send JSON encoded as UTF-8",
            None,
            "invalid_json",
        ) from None
    try:
        data = json.loads(text, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as err:
        raise from_json_error(err) from None
    except RecursionError:
        raise bad_request(
            f"the request body nests more than {MAX_DEPTH} levels deep; no request needs that",
            None,
            "invalid_json",
        ) from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise bad_request(
            "the request body holds an integer of thousands of digits; send numbers in range",
            None,
            "invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    if _may_need_cleaning(text):
        data = clean(data)
    return data


def _may_need_cleaning(text: str) -> bool:
    """Whether the walk over the parsed body is needed: only a `\\uD8xx`-`\\uDFxx` escape makes a
    surrogate (UTF-8 input has none), and deep nesting needs more brackets than MAX_DEPTH. Both are
    C-speed scans, so a long prompt (a 100k-token id list, say) is not walked in Python."""
    if "\\ud" in text or "\\uD" in text:
        return True
    return text.count("[") + text.count("{") > MAX_DEPTH
