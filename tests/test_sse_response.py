"""until_disconnect (router/sse_response.py): a response's work runs in the caller's task and ends with
ClientGone when the client leaves; its own errors come out as themselves, its result as is."""

from __future__ import annotations

import asyncio

import pytest

from fuserve.router.sse_response import ClientGone, until_disconnect


def _receive(messages: list[dict]) -> tuple[asyncio.Queue, object]:
    queue: asyncio.Queue = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)

    async def receive() -> dict:
        return await queue.get()

    return queue, receive


def test_work_result_error_and_disconnect() -> None:
    async def main() -> None:
        _, quiet = _receive([])

        async def answer() -> int:
            return 5

        assert await until_disconnect(quiet, answer) == 5

        async def fails() -> None:
            raise ValueError("engine said no")

        with pytest.raises(ValueError, match="engine said no"):
            await until_disconnect(quiet, fails)

        # more body first (ignored), then the client leaves while the work still waits on the engine
        _, leaving = _receive([{"type": "http.request", "body": b""}, {"type": "http.disconnect"}])
        cancelled = []

        async def waits() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        with pytest.raises(ClientGone):
            await asyncio.wait_for(until_disconnect(leaving, waits), 5)
        assert cancelled == [True]

    asyncio.run(main())
