"""The ingress's way into the engine deployment: open streams, merge them, time them, cancel them.

    streams = await client.open(engine_requests)   # waits for each first token; errors -> APIError
    async for prompt_index, batch in streams: ...   # deltas the moment they arrive
    await streams.close()                           # always (finally): cancels what still runs

`open` waits for the first delta of every stream before anything is sent to the client, so a
request the engine refuses, an overloaded deployment or a dead replica gets a proper status code
instead of a broken stream. Closing cancels the Serve handle calls, which cancels the replica's
generator and aborts the request in the engine (its KV blocks are freed). The time to first token
and the gaps between tokens are measured here, where each delta leaves for the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from fuserve.router.engine_messages import EngineDelta, EngineRequest
from fuserve.router.errors import APIError, bad_request, internal, overloaded, unavailable
from fuserve.router.metrics import ServingMetrics
from fuserve.sampling_params import RequestError
from fuserve.workers.async_engine import EngineDeadError

_END = object()


def _cancel(gens: list[DeploymentResponseGenerator]) -> None:
    """Cancels the handle calls. Serve's `cancel()` re-raises a call's own failure (e.g. the
    backpressure error that refused it); that failure is already being reported, so drop it."""
    for gen in gens:
        try:
            gen.cancel()
        except Exception:  # see the docstring
            pass


def _api_error(err: BaseException) -> APIError:
    """What the client should see for an exception raised while opening a stream."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, BackPressureError):
        return overloaded(str(err))
    cause = err.cause if hasattr(err, "cause") else err  # RayTaskError wraps the replica's exception
    if isinstance(err, RequestError) or isinstance(cause, RequestError):
        return bad_request(str(cause if isinstance(cause, RequestError) else err))
    if isinstance(err, EngineDeadError) or isinstance(cause, EngineDeadError):
        return unavailable(str(cause))
    if isinstance(err, (RayActorError, DeploymentUnavailableError)):
        return unavailable(f"{type(err).__name__}: {err}")
    return internal(f"{type(err).__name__}: {err}")


class EngineStreams:
    """The merged output of one API request's engine requests (one per prompt), in batches: each
    batch is what one engine replica sent in one message (see EngineServer.generate)."""

    def __init__(
        self,
        gens: list[DeploymentResponseGenerator],
        firsts: list[list[EngineDelta]],
        metrics: ServingMetrics,
        arrival: float,
    ) -> None:
        self.gens, self.firsts, self.metrics, self.arrival = gens, firsts, metrics, arrival
        self.replicas = sorted({batch[0].replica_id for batch in firsts})
        self._last_token_at: dict[tuple[int, int], float] = {}
        self._first_sent = False
        self._pumps: list[asyncio.Task] = []
        for batch in firsts:
            metrics.replica_requests.labels(batch[0].replica_id).inc()

    def _record(self, prompt_index: int, batch: list[EngineDelta]) -> None:
        now = time.perf_counter()
        m = self.metrics
        for d in batch:
            if d.stats is not None:
                m.update_replica(d.stats)
            k = len(d.token_ids)
            if not k:
                continue
            m.generation_tokens.inc(k)
            key = (prompt_index, d.index)
            last = self._last_token_at.get(key)
            if not self._first_sent:
                self._first_sent = True
                m.ttft.observe(now - self.arrival)
            elif last is not None:
                for _ in range(k):  # several tokens at once: the gap is spread over them
                    m.itl.observe((now - last) / k)
            self._last_token_at[key] = now

    async def _one(self, i: int) -> AsyncIterator[list[EngineDelta]]:
        yield self.firsts[i]
        async for batch in self.gens[i]:
            yield batch

    async def __aiter__(self) -> AsyncIterator[tuple[int, list[EngineDelta]]]:
        if len(self.gens) == 1:  # the common case: no tasks, no queue, nothing between engine and client
            async for batch in self._one(0):
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
        _cancel(self.gens)  # a no-op for a finished stream; aborts the engine request otherwise
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)


class EngineClient:
    def __init__(self, handle: DeploymentHandle, metrics: ServingMetrics) -> None:
        self.handle = handle.options(stream=True, method_name="generate")
        self.metrics = metrics

    async def open(self, requests: list[EngineRequest], arrival: float) -> EngineStreams:
        gens: list[DeploymentResponseGenerator] = []
        try:
            gens.extend(self.handle.remote(r) for r in requests)  # may refuse at once: backpressure
            firsts = await asyncio.gather(*(gen.__anext__() for gen in gens))
        except StopAsyncIteration:
            _cancel(gens)
            raise internal("the engine ended a stream without output") from None
        except (asyncio.CancelledError, RequestCancelledError, TaskCancelledError):
            _cancel(gens)
            raise
        except Exception as err:
            _cancel(gens)
            raise _api_error(err) from None
        for r in requests:
            self.metrics.prompt_tokens.inc(len(r.prompt_token_ids))
        for batch in firsts:
            self.metrics.cached_prompt_tokens.inc(batch[0].num_cached_tokens)
        return EngineStreams(gens, list(firsts), self.metrics, arrival)
