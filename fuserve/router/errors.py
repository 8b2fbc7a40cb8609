"""Errors as OpenAI clients expect them: `{"error": {"message", "type", "param", "code"}}` + status.

Every refusal goes through `APIError`, so the official `openai` client raises its matching
exception (BadRequestError, NotFoundError, RateLimitError, ...) with our message, and the message
says what was wrong and how to fix it.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = 1  # for 429 and 503: the Retry-After header, in whole seconds

    def __reduce__(self) -> tuple:
        """Pickles with all fields: Ray ships it to the gRPC proxy inside Serve's status error."""
        return (APIError, (self.status, self.message, self.type, self.param, self.code))

    def with_retry_after(self, seconds: int) -> APIError:
        self.retry_after_s = max(1, seconds)
        return self

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        extra = {"Retry-After": str(self.retry_after_s)} if self.status in (429, 503) else {}
        if self.status == 401:
            extra["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers={**extra, **(headers or {})})

    def sse(self) -> str:
        """The same error as a server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"the model {model!r} does not exist here; this server serves {served!r} (see GET /v1/models)",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def overloaded(detail: str) -> APIError:
    return APIError(
        429,
        f"the server is overloaded ({detail}); retry after a short wait with backoff",
        "rate_limit_error",
        None,
        "overloaded",
    )


def unavailable(request_id: str = "") -> APIError:
    """The replica's engine stopped. What stopped it (exit codes, PIDs) is in the log, not here."""
    ref = f" (request id {request_id})" if request_id else ""
    return APIError(
        503,
        f"this replica's engine is not running{ref}; retry shortly, another replica (or this one's "
        "replacement) will serve it",
        "service_unavailable",
        None,
        "not_ready",
    )


def internal(request_id: str = "") -> APIError:
    """A fault of the server's own; the log holds the details under the request id."""
    ref = f" under request id {request_id}" if request_id else ""
    return APIError(
        500, f"internal server error; the server's log has the details{ref}", "internal_error", None, None
    )


def unauthorized(detail: str) -> APIError:
    return APIError(401, f"unauthorized: {detail}", "authentication_error", None, "invalid_api_key")


def too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request is {size} bytes, more than this server's limit of {limit} bytes "
        "(serve.max_request_bytes): send less",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def deadline_exceeded(timeout_s: float) -> APIError:
    return APIError(
        408,
        f"the request did not finish within its deadline of {timeout_s:g} s (the `timeout` field, or "
        "serve.request_timeout_s) and was stopped; raise the timeout or ask for fewer tokens",
        "timeout_error",
        "timeout",
        "deadline_exceeded",
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> str:
    """`messages.0.role`; pydantic's union-branch tags (`prompt.str`, `prompt.list[int]`) dropped."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    return ".".join(parts)


def from_validation(err: ValidationError) -> APIError:
    """The problems pydantic found (up to five), with the first one's field path as `param`."""
    errors = err.errors()
    param = _field_path(errors[0]["loc"]) or None
    problems = "; ".join(f"{_field_path(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
    return bad_request(f"invalid request: {problems}", param)


def from_json_error(err: json.JSONDecodeError) -> APIError:
    return bad_request(
        f"the request body is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
        "send a JSON object with Content-Type: application/json",
        None,
        "invalid_json",
    )
