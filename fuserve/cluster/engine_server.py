"""The engine deployment: one AsyncEngine per Serve replica, streamed to the ingress step by step.

    ingress --handle.options(stream=True).generate.remote(EngineRequest)--> EngineServer.generate
        -> AsyncEngine.generate -> an EngineDelta per sequence per engine step, sent at once

Nothing here waits to batch deltas: each step's outputs leave as soon as the engine loop hands
them over (several in one message only when earlier ones have not left yet). When the ingress
stops consuming (its HTTP client went away), Serve cancels this generator; the `finally` aborts
the request so the engine frees its KV blocks immediately.

The replica also reports its outstanding tokens and recently seen prompt prefixes through
`record_routing_stats`, which Serve polls and hands to the length-aware router.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from ray import serve

from fuserve.configs import FuserveConfig
from fuserve.router.engine_messages import EngineDelta, EngineRequest, ModelInfo, ReplicaStats, StatsQuery
from fuserve.router.routing_policy import RecentPrefixes
from fuserve.workers.async_engine import AsyncEngine

STATS_EVERY_S = 0.25  # how often a stream carries a stats snapshot for /metrics
REPORTED_PREFIXES = 512  # prefix keys sent with each routing-stats report
_END = object()


class EngineServer:
    def __init__(
        self, config: FuserveConfig, engine_factory: Callable[[FuserveConfig], AsyncEngine] = AsyncEngine
    ) -> None:
        self.config = config
        self.engine = engine_factory(config)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests, benchmarks)
            self.replica_id = "local"
        self.prefixes = RecentPrefixes(4 * REPORTED_PREFIXES)
        self._last_report: dict = {}
        self._last_report_at = 0.0

    def model_info(self) -> ModelInfo:
        inner = self.engine.engine
        return ModelInfo(
            model_name=self.engine.model_name,
            max_model_len=inner.max_model_len,
            block_size=self.config.cache.block_size,
            has_tokenizer=inner.tokenizer is not None,
            sampling_defaults=dict(inner.generation.sampling_defaults),
            default_max_tokens=inner.generation.max_new_tokens,
        )

    def stats(self, query: StatsQuery | None = None) -> ReplicaStats:
        s = self.engine.stats
        bm = self.engine.engine.block_manager
        return ReplicaStats(
            replica_id=self.replica_id,
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            outstanding_tokens=s.outstanding_tokens,
            kv_cache_usage=s.kv_cache_usage,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=s.num_blocks,
            num_preemptions=s.num_preemptions,
            prefix_hit_tokens=s.prefix_hit_tokens,
            prefix_query_tokens=s.prefix_query_tokens,
            healthy=self.engine.healthy,
            timestamp=time.time(),
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineDelta]]:
        """Each message holds every delta ready at that moment: one step's while the ingress keeps
        up, several once it falls behind. Nothing ever waits for company; but a path slower than
        the engine (many streams, fast steps) carries the tokens in fewer, fuller messages instead
        of queueing one Ray message per token, which is what makes streaming through Serve slow."""
        self.prefixes.add(request.prefix_keys)
        ready: asyncio.Queue = asyncio.Queue()
        pump = asyncio.create_task(self._pump(request, ready))
        finished = 0
        last_stats = 0.0
        try:
            while True:
                items = [await ready.get()]
                while not ready.empty():
                    items.append(ready.get_nowait())
                batch = [d for d in items if isinstance(d, EngineDelta)]
                finished += sum(d.finished for d in batch)
                now = time.monotonic()
                if batch and (batch[-1].finished or now - last_stats >= STATS_EVERY_S):
                    last_stats = now
                    batch[-1].stats = self.stats()
                if batch:
                    yield batch
                if isinstance(items[-1], BaseException):
                    raise items[-1]
                if items[-1] is _END:
                    return
        finally:
            pump.cancel()  # its AsyncEngine.generate stops, and aborts the request if unfinished
            if finished < request.params.n:  # cancelled or failed: free the blocks now
                self.engine.abort(request.request_id)

    async def _pump(self, request: EngineRequest, ready: asyncio.Queue) -> None:
        """Moves the engine's outputs into `ready` as they come, so `generate` can take them in bulk."""
        try:
            stream = self.engine.generate(request.prompt_token_ids, request.params, request.request_id)
            async with aclosing(stream):
                async for out in stream:
                    ready.put_nowait(
                        EngineDelta(
                            index=out.index,
                            text=out.delta_text,
                            token_ids=out.delta_token_ids,
                            finished=out.finished,
                            finish_reason=out.finish_reason,
                            logprobs=out.delta_logprobs,
                            num_prompt_tokens=out.num_prompt_tokens,
                            num_cached_tokens=out.num_cached_tokens,
                            replica_id=self.replica_id,
                        )
                    )
            ready.put_nowait(_END)
        except Exception as err:  # handed to `generate`, which raises it to the caller
            ready.put_nowait(err)

    def record_routing_stats(self) -> dict:
        """Polled by Serve's controller; the router reads it as `replica.routing_stats`.

        `timestamp` is when these figures last changed, not when they were polled: Serve
        broadcasts a replica's stats to every router only when they differ from the last poll,
        so an idle replica costs no broadcasts, and the router still knows which of its own
        requests the figures already include (those routed before the timestamp)."""
        s = self.engine.stats
        report = {
            "outstanding_tokens": s.outstanding_tokens,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "prefix_keys": self.prefixes.snapshot()[-REPORTED_PREFIXES:],
        }
        if report != self._last_report:
            self._last_report, self._last_report_at = report, time.time()
        return {**report, "timestamp": self._last_report_at}

    def check_health(self) -> None:
        """Serve restarts a replica whose engine loop died."""
        if not self.engine.healthy:
            raise RuntimeError(f"the engine stopped: {self.engine.error or 'unknown error'}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
