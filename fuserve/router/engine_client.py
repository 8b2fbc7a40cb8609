"""The frontend's way into its engine core: open streams, merge them, time them, cancel them.

    streams = await client.open(engine_requests)   # waits for each first token; errors -> APIError
    async for prompt_index, batch in streams: ...   # deltas the moment they arrive
    await streams.close()                           # always (finally): aborts what still runs

`open` waits for the first delta of every stream before anything is sent to the client, so a
request the engine refuses or a dead engine gets a proper status code instead of a broken stream.
Closing ends the core client's generators, which abort their requests in the engine (its KV blocks
are freed). The time to first token and the gaps between tokens are measured here, where each
delta leaves for the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fuserve.core_messages import EngineDeadError
from fuserve.router.core_client import EngineCoreClient
from fuserve.router.engine_messages import EngineDelta, EngineRequest
from fuserve.router.errors import APIError, bad_request, deadline_exceeded, internal, overloaded, unavailable
from fuserve.router.metrics import ServingMetrics
from fuserve.sampling_params import RequestError

_END = object()
Deltas = AsyncGenerator[list[EngineDelta], None]
logger = logging.getLogger("fuserve.router")


def api_error(err: BaseException, request_id: str = "") -> APIError:
    """What the client should see for an exception raised while serving a request. A server fault's
    details (exit codes, PIDs, tracebacks) go to the log under the request id, never to the client."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, RequestError):
        return bad_request(str(err))
    if isinstance(err, EngineDeadError):
        logger.error("request %s: the engine stopped: %s", request_id, err)
        return unavailable(request_id)
    logger.error("request %s failed", request_id, exc_info=err)
    return internal(request_id)


async def _close_all(gens: list[Deltas]) -> None:
    for gen in gens:
        try:
            await gen.aclose()  # runs its `finally`: aborts the request if it has not finished
        except RuntimeError:  # still running in a cancelled task, whose unwinding runs that `finally`
            pass


async def _firsts(gens: list[Deltas]) -> list[list[EngineDelta] | BaseException]:
    """Each stream's first delta, or what it raised. One stream (the common case) is awaited in place:
    gather's task would cost the first token one more pass of a busy event loop."""
    if len(gens) == 1:
        try:
            return [await gens[0].__anext__()]
        except Exception as err:
            return [err]
    return await asyncio.gather(*(gen.__anext__() for gen in gens), return_exceptions=True)


class EngineStreams:
    """The merged output of one API request's engine requests (one per prompt), in batches: each
    batch is what the engine core's messages held for it since the consumer last looked."""

    def __init__(
        self,
        gens: list[Deltas],
        firsts: list[list[EngineDelta]],
        metrics: ServingMetrics,
        arrival: float,
        release: Callable[[], None],
    ) -> None:
        self.gens, self.firsts, self.metrics, self.arrival = gens, firsts, metrics, arrival
        self._release: Callable[[], None] | None = release
        self.replicas = sorted({batch[0].replica_id for batch in firsts})
        self._last_token_at: dict[tuple[int, int], float] = {}
        self._first_sent = False
        self._pumps: list[asyncio.Task] = []
        self.admit_s = self.core_first_s = math.nan  # this request's share of its TTFT (open() sets them)

    def _record(self, prompt_index: int, batch: list[EngineDelta]) -> None:
        now = time.perf_counter()
        m = self.metrics
        if batch and batch[0].received_at:
            m.emit.observe(now - batch[0].received_at)
        for d in batch:
            k = len(d.token_ids)
            if not k:
                continue
            m.generation_tokens.inc(k)
            key = (prompt_index, d.index)
            last = self._last_token_at.get(key)
            if not self._first_sent:
                self._first_sent = True
                m.ttft.observe(now - self.arrival)
            elif last is not None:  # several tokens at once: the gap is spread over them
                m.itl.observe((now - last) / k, k)
            self._last_token_at[key] = now

    async def _one(self, i: int) -> AsyncIterator[list[EngineDelta]]:
        yield self.firsts[i]
        async for batch in self.gens[i]:
            yield batch

    async def __aiter__(self) -> AsyncIterator[tuple[int, list[EngineDelta]]]:
        if len(self.gens) == 1:  # the common case: no tasks, no queue, nothing between engine and client
            self._record(0, self.firsts[0])
            yield 0, self.firsts[0]
            async for batch in self.gens[0]:
                self._record(0, batch)
                yield 0, batch
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for batch in self._one(i):
                    queue.put_nowait((i, batch))
            except BaseException as err:  # handed to the consumer, which re-raises it
                queue.put_nowait((i, err))
            finally:
                queue.put_nowait((i, _END))

        self._pumps = [asyncio.create_task(pump(i)) for i in range(len(self.gens))]
        remaining = len(self.gens)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                self._record(i, item)
                yield i, item

    async def close(self) -> None:
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await _close_all(self.gens)
        if self._release is not None:
            self._release, release = None, self._release
            release()
            self.metrics.e2e.observe(time.perf_counter() - self.arrival)


class EngineClient:
    """Admission control lives here, in the replica: Serve's proxy (and HAProxy, which skips Serve's
    per-replica limit) forwards everything, and the replica refuses what it cannot hold with an
    OpenAI-shaped 429 at once, instead of letting it wait unseen."""

    def __init__(
        self,
        core: EngineCoreClient,
        metrics: ServingMetrics,
        max_open: int | None,
        max_queued_prefill_tokens: int | None = None,
    ) -> None:
        self.core = core
        self.metrics = metrics
        self.max_open = max_open  # API requests admitted at once (running + queued); None: no limit
        self.max_queued_prefill_tokens = max_queued_prefill_tokens  # None: no limit
        self.num_open = 0
        self.num_admitted = 0  # ever: lets a routing report show that requests came and went
        self.queued_prefill_tokens = 0  # prompt tokens admitted whose first token has not come yet

    def _release(self, deadline: asyncio.TimerHandle | None = None) -> None:
        self.num_open -= 1
        if deadline is not None:
            deadline.cancel()

    def _admit(self, prompt_tokens: int) -> None:
        """Raises a 429 when the replica holds all it may: requests, or prompt tokens waiting for
        prefill (a burst of long prompts fills the KV cache and stalls every stream before the
        request count would say so). One request is admitted whenever nothing waits, however long."""
        if self.max_open is not None and self.num_open >= self.max_open:
            raise overloaded(f"{self.num_open} requests in flight on this replica, its limit")
        queued, limit = self.queued_prefill_tokens, self.max_queued_prefill_tokens
        if limit is not None and queued and queued + prompt_tokens > limit:
            raise overloaded(
                f"{queued} prompt tokens wait for prefill on this replica; this request's {prompt_tokens} "
                f"would pass its limit of {limit}"
            )

    def _set_deadline(
        self, requests: list[EngineRequest], arrival: float, timeout_s: float | None
    ) -> asyncio.TimerHandle | None:
        """Past the deadline every stream of the request fails with a 408; the streams' close aborts
        them in the engine core, which frees their KV blocks."""
        if timeout_s is None:
            return None
        err = deadline_exceeded(timeout_s)

        def expire() -> None:
            for r in requests:
                self.core.fail(r.request_id, err)

        delay = max(0.0, timeout_s - (time.perf_counter() - arrival))
        return asyncio.get_running_loop().call_later(delay, expire)

    async def open(
        self,
        requests: list[EngineRequest],
        arrival: float,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> EngineStreams:
        """`timeout_s`: the request's deadline, from `arrival`; `request_id`: the API request's id,
        which the log and a 5xx message name."""
        prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        self._admit(prompt_tokens)
        self.num_open += 1
        self.num_admitted += 1
        self.queued_prefill_tokens += prompt_tokens
        opened_at = time.perf_counter()
        self.metrics.admit.observe(opened_at - arrival)
        gens: list[Deltas] = [self.core.generate(r) for r in requests]  # type: ignore[misc]
        deadline = self._set_deadline(requests, arrival, timeout_s)
        try:
            results = await _firsts(gens)
        except asyncio.CancelledError:  # the client left: each generator's `finally` aborts its request
            self._release(deadline)
            await _close_all(gens)
            raise
        finally:
            self.queued_prefill_tokens -= prompt_tokens
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            self._release(deadline)
            await _close_all(gens)
            if isinstance(failed, StopAsyncIteration):
                failed = RuntimeError("the engine ended a stream without output")
            raise api_error(failed, request_id)
        firsts: list[list[EngineDelta]] = results  # type: ignore[assignment]
        first_back = max(batch[0].received_at for batch in firsts)
        if first_back:
            self.metrics.core_first_token.observe(first_back - opened_at)
        for r in requests:
            self.metrics.prompt_tokens.inc(len(r.prompt_token_ids))
        for batch in firsts:
            self.metrics.cached_prompt_tokens.inc(batch[0].num_cached_tokens)
        streams = EngineStreams(gens, firsts, self.metrics, arrival, lambda: self._release(deadline))
        streams.admit_s = opened_at - arrival
        streams.core_first_s = first_back - opened_at if first_back else math.nan
        return streams
