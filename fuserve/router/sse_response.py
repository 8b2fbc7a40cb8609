"""A streamed (SSE) response whose first chunk goes out in the request's own task.

Starlette's StreamingResponse, under servers of ASGI spec < 2.4 (uvicorn says 2.3: it drops writes to a
gone client instead of raising), streams from a task it spawns while the request's task listens for
the disconnect. On a busy event loop that spawned task waits a whole pass of the loop before its first
write: at 256 streams on an H100 a pass is ~10 ms of other streams' tokens, all of it added to the time
to first token. Here the roles are swapped: the request's task writes (the first chunk is ready when
the response starts, ingress.py's `_started`), and the spawned task only listens for the disconnect,
which cancels the writer; closing the body then aborts the engine requests, as before.
"""

from __future__ import annotations

import sys

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

if sys.version_info < (3, 11):  # anyio brings the backport there
    from exceptiongroup import BaseExceptionGroup


class SSEResponse(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
        if scope["type"] != "http" or spec >= (2, 4) or self.background is not None:
            await super().__call__(scope, receive, send)
            return
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await self.stream_response(send)
                group.cancel_scope.cancel()
        except BaseExceptionGroup as errors:  # one failure is raised as itself, as Starlette does
            if len(errors.exceptions) != 1:
                raise
            raise errors.exceptions[0] from None
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
