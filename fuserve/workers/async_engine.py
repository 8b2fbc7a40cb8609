"""The engine behind asyncio: `generate()` yields incremental outputs, `abort()` cancels.

The model step blocks for milliseconds to seconds, so the engine loop runs on its own thread and
the caller's event loop stays free to accept and stream requests. Requests and aborts cross into
the loop thread through a locked inbox; outputs cross back with `call_soon_threadsafe` as soon as
each step ends, one message per sequence per step, so streaming adds no batching delay.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fuserve.configs import FuserveConfig
from fuserve.core_messages import CoreStats, EngineDeadError
from fuserve.sampling_params import SamplingParams
from fuserve.workers.engine import LLMEngine
from fuserve.workers.outputs import RequestOutput


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int
    finished: set[int] = field(default_factory=set)


class AsyncEngine:
    def __init__(
        self, config: FuserveConfig, engine_factory: Callable[[FuserveConfig], LLMEngine] = LLMEngine
    ):
        self.engine = engine_factory(config)
        self.model_name = self.engine.model_name
        self._cv = threading.Condition()
        self._adds: list[tuple[str, list[int], SamplingParams, float | None]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = False
        self.error: str | None = None
        self.stats: CoreStats = self.engine.stats()
        self._thread = threading.Thread(target=self._loop, name="fuserve-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive() and self.engine.healthy

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields one output per sequence per step until all n sequences finish. A consumer that
        stops iterating (client gone) aborts the request and frees its KV blocks."""
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running: {self.error or 'stopped'}")
        request_id = request_id or self.new_request_id()
        prompt_ids = self.engine.encode_prompt(prompt)
        self.engine.check_request(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        with self._cv:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._adds.append((request_id, prompt_ids, params, arrival_time))
            self._cv.notify()
        try:
            while len(stream.finished) < stream.n:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.finished.add(item.index)
                yield item
        finally:
            if len(stream.finished) < stream.n:
                self.abort(request_id)
            with self._cv:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---- the loop thread ------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not (self._stopped or self._adds or self._aborts or engine.has_unfinished()):
                    self._cv.wait()
                if self._stopped:
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for request_id, prompt_ids, params, arrival in adds:
                try:
                    engine.add_request(request_id, prompt_ids, params, arrival)
                except Exception as err:  # a bad request fails alone
                    self._deliver(request_id, err)
            for request_id in aborts:
                engine.abort(request_id)
            try:
                outputs = engine.step() if engine.has_unfinished() else []
            except Exception as err:
                self.error = f"{type(err).__name__}: {err}"
                traceback.print_exc()
                dead = EngineDeadError(f"the engine failed and stopped: {self.error}")
                with self._cv:
                    for request_id in list(self._streams):
                        self._deliver(request_id, dead)
                return
            self.stats = engine.stats()
            with self._cv:
                for out in outputs:
                    self._deliver(out.request_id, out)
