"""The engine deployment's replica, which is its own HTTP and gRPC ingress: the frontend process.

    Serve's proxy (the length-aware router picks the replica) -> this replica:
    POST /v1/completions, /v1/chat/completions -> parse + check (protocol) -> tokenize, length,
        work estimate, prefix keys (prompts) -> EngineClient.open -> EngineCoreClient: the request
        goes to this replica's engine-core process over ZMQ -> deltas (detokenized here) -> JSON,
        or one SSE event per delta (responses)
    GET /v1/models, /health (503 when the engine is down), /metrics (Prometheus, this replica)
    gRPC fuserve.v1.Generation/Generate, GenerateStream (grpc_service) on Serve's gRPC proxy

Tokens take no Ray message: the engine core sends one message per step for all sequences, and
this process writes them to the clients. Serve still places, health-checks, scales and drains the
replicas; `record_routing_stats` feeds the length-aware router.

`EngineIngress` is the Serve deployment: it builds the engine core and answers Serve's polls.
`Frontend` (frontend.py) is the request handling, and the routes call the process's one Frontend: the
replica's own, or, with `serve.frontend_processes` > 1, that of the spawned process that accepted the
connection (frontend_processes.py).

(No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation.)
"""

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from fuserve.configs import FuserveConfig
from fuserve.gc_tuning import quiet_gc
from fuserve.router.core_client import EngineCoreClient
from fuserve.router.frontend import REPORTED_PREFIXES, Frontend
from fuserve.router.frontend_processes import CloseWhenHandedOver, FrontendProcesses
from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.replica_view import routing_report

ENGINE_START_TIMEOUT_S = 3600.0  # loading a large model from a slow disk takes long; Serve's own limits apply

logger = logging.getLogger("fuserve.router")
app = FastAPI(title="fuserve", description="OpenAI-compatible LLM serving on Ray Serve", docs_url=None)
app.add_middleware(CloseWhenHandedOver)  # the replica's own process, once its spawned ones take over


def warn_if_slow_http_path() -> list[str]:
    """The HTTP path users measure runs on uvloop and httptools (`ray[serve]` brings `uvicorn[standard]`).
    Without them the replica's loop and uvicorn fall back to pure Python: behind HAProxy on this
    project's CPU box, TTFT p50 at 64 streams doubled (benchmarks/NOTES.md). Returns what is missing."""
    import importlib.util

    missing = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m) is None]
    if missing:
        logger.warning(
            "%s not installed: the replica serves HTTP on the slow pure-Python path; "
            "install them with `pip install 'uvicorn[standard]'` (ray[serve] normally brings it)",
            " and ".join(missing),
        )
    return missing


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # constructed outside Serve (tests, benchmarks)
        return "local"


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:
        return ""


# ---- the routes: the same in every frontend process of a replica ------------------------------------
_serving: list[Frontend] = []  # this process's Frontend, once built


def serve_with(frontend: Frontend) -> None:
    """Makes `frontend` the one this process's routes call (one per process: a Serve replica, or one of
    its further frontend processes)."""
    _serving[:] = [frontend]


def _frontend() -> Frontend:
    return _serving[0]


@app.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _frontend().completions(request)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _frontend().chat_completions(request)


@app.get("/v1/models")
async def models(request: Request) -> Response:
    return await _frontend().get_models(request)


@app.get("/health")
async def health(request: Request) -> Response:
    return await _frontend().get_health(request)


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    return await _frontend().get_metrics(request)


@serve.ingress(app)
class EngineIngress:
    """The Engine deployment's replica: builds its engine core and its frontend, answers Serve's
    polls (routing and autoscaling stats, health), and, behind HAProxy with `serve.frontend_processes`
    > 1, starts the further frontend processes that share its port and its engine core."""

    async def __init__(self, config: FuserveConfig, draft: Any = None) -> None:
        """`draft`: the Draft deployment's handle (speculative.deploys_draft), bound only so Serve runs
        the draft with this app; the engine core finds it by name (speculative/draft_factory.py)."""
        replica_id = _replica_id()
        warn_if_slow_http_path()
        # here, not at the top: the loader brings torch, which a frontend process never needs
        from fuserve.workers.models.loader import load_tokenizer, resolve_source

        source = resolve_source(config.model)
        tokenizer = load_tokenizer(source) if source.kind != "dummy" else None
        num = config.serve.frontend_processes
        # with N > 1, N spawned processes serve HTTP, each with a core channel, beside the replica's own
        self.core = EngineCoreClient(config, tokenizer, replica_id, num_frontends=1 if num == 1 else num + 1)
        ready = await self.core.start(ENGINE_START_TIMEOUT_S)
        self.frontend = Frontend(config, tokenizer, self.core, ready, replica_id)
        serve_with(self.frontend)
        self.client = self.frontend.client
        self.prefixes = self.frontend.prefixes
        self.scheduler_config = config.scheduler
        self._last_report: dict = {}
        self._last_report_at = 0.0
        self.children: FrontendProcesses | None = None
        if num > 1:
            self.children = FrontendProcesses(
                config,
                self.core,
                ready,
                replica_id,
                self.prefixes.add,
                _app_name(),
                tokenizer=tokenizer,
                own_metrics=self.frontend.metrics.request_text,
            )
            self.frontend.gather_metrics = self.children.gather_metrics
            self.children.start_when_listening()
        quiet_gc()  # everything this replica keeps is built: out of later collections (gc_tuning.py)

    def record_routing_stats(self) -> dict:
        """Polled by Serve's controller; the router reads it as `replica.routing_stats`.

        `timestamp` is when these figures last changed, not when they were polled: Serve
        broadcasts a replica's stats to every router only when they differ from the last poll,
        so an idle replica costs no broadcasts, and the router still knows which of its own
        requests the figures already include (those routed before the timestamp). The count of
        admitted requests makes a request that came and went change the figures: behind HAProxy the
        router hears of no request's end, and only a newer report retires its pick. With frontend
        processes the replica's own process admits almost nothing: the engine core's count, which
        takes every process's requests, stands for it (routers estimate their number from it)."""
        s = self.core.stats
        admitted = self.client.num_admitted if self.children is None else s.num_requests_added
        report = {
            "healthy": self.core.healthy,
            "num_admitted": admitted,
            "outstanding_tokens": s.outstanding_tokens,
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "prefix_keys": self.prefixes.snapshot()[-REPORTED_PREFIXES:],
            **routing_report(s, self.scheduler_config),  # what the TTFT model reads
        }
        if report != self._last_report:
            self._last_report, self._last_report_at = report, time.time()
        return {**report, "timestamp": self._last_report_at}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Polled by Serve for fuserve's autoscaling policies (cluster/token_autoscaling.py): the engine
        core's figures, which count every frontend process's requests."""
        # here, not at the top: the fuserve.cluster package imports this module
        from fuserve.cluster.token_autoscaling import ENGINE_REQUESTS, OUTSTANDING_TOKENS

        s = self.core.stats
        return {OUTSTANDING_TOKENS: float(s.outstanding_tokens), ENGINE_REQUESTS: float(s.num_requests)}

    def check_health(self) -> None:
        """Serve replaces a replica whose engine core, or one of its frontend processes, died."""
        if not self.core.healthy:
            raise RuntimeError(f"the engine stopped: {self.core.error or 'unknown error'}")
        if self.children is not None and self.children.error is not None:
            raise RuntimeError(self.children.error)

    def __del__(self) -> None:
        """Serve calls this after draining the replica (graceful_shutdown_timeout_s): the further
        frontend processes drain their own streams, then the core ends."""
        children = getattr(self, "children", None)
        if children is not None:
            children.stop(children.config.serve.drain_timeout_s)
        core = getattr(self, "core", None)
        if core is not None:
            core.shutdown()

    # ---- gRPC: Serve's gRPC proxy calls these by name on the deployment ------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:  # noqa: N802
        return await self.frontend.Generate(request, grpc_context)

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        async for reply in self.frontend.GenerateStream(request, grpc_context):
            yield reply
