"""A response's work in the request's own task, a spawned task watching for the client to leave.

Starlette's StreamingResponse, under servers of ASGI spec < 2.4 (uvicorn says 2.3: it drops writes to a
gone client instead of raising), streams from a task it spawns while the request's task listens for
the disconnect. On a busy event loop that spawned task waits a whole pass of the loop before its first
write: at 256 streams on an H100 a pass is ~10 ms of other streams' tokens, all of it added to the time
to first token. Here the roles are swapped: the request's task does the work (the first chunk is ready
when a stream starts, ingress.py's `_started`), and the spawned task only listens for the disconnect,
which cancels the work; closing the body then aborts the engine requests, as before.

Behind HAProxy the router tells Serve not to watch for disconnects itself (ingress_routing.py, which
saves the replica a receive-proxy task and a call task per request, each a pass of the loop before the
request is even read): both kinds of response watch here, a stream with `SSEResponse`, a whole answer
with `until_disconnect`.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

if sys.version_info < (3, 11):  # anyio brings the backport there
    from exceptiongroup import BaseExceptionGroup

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before the response was complete."""


async def _disconnected(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """`work()`, or ClientGone as soon as the client leaves (`work` is cancelled)."""
    done: list[T] = []
    try:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await _disconnected(receive)
                group.cancel_scope.cancel()

            group.start_soon(watch)
            done.append(await work())
            group.cancel_scope.cancel()
    except BaseExceptionGroup as errors:  # one failure is raised as itself, as Starlette does
        if len(errors.exceptions) != 1:
            raise
        raise errors.exceptions[0] from None
    if not done:
        raise ClientGone()
    return done[0]


class SSEResponse(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
        if scope["type"] != "http" or spec >= (2, 4) or self.background is not None:
            await super().__call__(scope, receive, send)
            return
        try:
            await until_disconnect(receive, lambda: self.stream_response(send))
        except ClientGone:
            pass
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
