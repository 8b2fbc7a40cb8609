"""A replica's request handling, one `Frontend` per process that accepts connections: the OpenAI
routes' parsing and checks, tokenization, the engine client, SSE, /health and /metrics, and gRPC.

    POST /v1/completions, /v1/chat/completions -> parse + check (protocol) -> tokenize, length,
        work estimate, prefix keys (prompts) -> EngineClient.open -> EngineCoreClient: the request
        goes to this replica's engine-core process over ZMQ -> deltas (detokenized here) -> JSON,
        or one SSE event per delta (responses)

The body is parsed by hand rather than by FastAPI's signature binding, so malformed JSON and wrong
types are 400s in OpenAI's error shape instead of FastAPI's 422. Streamed deltas are written as
they arrive; a client that goes away closes its streams, and the engine aborts its requests.
The routes and the Serve deployment that owns the engine core are in ingress.py.

(No `from __future__ import annotations`, as in ingress.py: FastAPI must see real annotations.)
"""

import asyncio
import os
import resource
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from fuserve.configs import FuserveConfig, ServeConfig
from fuserve.core_messages import CoreReady
from fuserve.gc_tuning import gc_seconds_total
from fuserve.router import grpc_service
from fuserve.router.api_keys import ApiKeys
from fuserve.router.core_client import EngineCoreClient
from fuserve.router.engine_client import EngineClient, EngineStreams, api_error
from fuserve.router.engine_messages import EngineRequest, ModelInfo, ReplicaStats
from fuserve.router.errors import APIError, from_validation, model_not_found, too_large
from fuserve.router.frontend_processes import frontend_cpu_seconds
from fuserve.router.hermes_tool_calls import HERMES
from fuserve.router.metrics import (
    ROUTED_AT_HEADER,
    TRANSIT_HEADER,
    TTFT_PARTS_HEADER,
    ServingMetrics,
    transit_seconds,
)
from fuserve.router.prompts import (
    encode_chat,
    encode_prompt,
    engine_request,
    resolve_max_tokens,
    sampling_or_400,
)
from fuserve.router.proto import fuserve_pb2 as pb
from fuserve.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from fuserve.router.request_body import parse_json_object, read_body
from fuserve.router.responses import SSE_DONE, ChunkWriter, Transcript
from fuserve.router.routing_policy import RecentPrefixes
from fuserve.router.sse_response import ClientGone, SSEResponse, until_disconnect
from fuserve.router.tool_call_format import ToolCallFormat, choose_tool_call_format
from fuserve.workers.tokenizer import Tokenizer

REPORTED_PREFIXES = 512  # prefix keys sent with each routing-stats report
REQUEST_ID_HEADER = "x-request-id"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _started(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Runs the SSE generator to its first event now. A generator that never started has no
    `finally` to run, so a client gone before the response began would leave the engine
    requests running; a started one is closed (and cancels them) even if never read again."""
    first = await events.__anext__()

    async def chained() -> AsyncIterator[str]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return chained()


def admission_limit(serve_cfg: ServeConfig) -> int | None:
    """API requests one replica holds at once: its engine slots plus its queue (-1: no queue limit)."""
    if serve_cfg.max_queued_requests < 0:
        return None
    return serve_cfg.max_ongoing_requests + serve_cfg.max_queued_requests


def prefill_token_limit(serve_cfg: ServeConfig, kv_capacity_tokens: int) -> int | None:
    """Prompt tokens one replica holds waiting for prefill: the config's bound, else the KV cache's
    capacity (more than it can hold at once only waits, or preempts); None: no bound."""
    limit = serve_cfg.max_queued_prefill_tokens
    if limit is None:
        return kv_capacity_tokens
    return None if limit < 0 else limit


class Frontend:
    """One process's share of the replica's HTTP and gRPC work, on its channel to the engine core. The
    replica's own process has one (EngineIngress builds it); with `serve.frontend_processes` > 1 each
    further process has one too (frontend_processes.py), so the routes below reach the one of the
    process that accepted the connection."""

    def __init__(
        self,
        config: FuserveConfig,
        tokenizer: Tokenizer | None,
        core: EngineCoreClient,
        ready: CoreReady,
        replica_id: str,
    ) -> None:
        self.replica_id = replica_id
        self.tokenizer = tokenizer
        template = self.tokenizer.chat_template if self.tokenizer else None
        self.tool_format = choose_tool_call_format(template, config.model.tool_call_format)
        self.core = core
        self.info = ModelInfo(
            model_name=ready.model_name,
            max_model_len=ready.max_model_len,
            block_size=ready.block_size,
            has_tokenizer=ready.has_tokenizer,
            sampling_defaults=dict(ready.sampling_defaults),
            default_max_tokens=ready.default_max_tokens,
        )
        self.metrics = ServingMetrics()
        kv_tokens = ready.stats.num_blocks * ready.block_size
        # The admission bounds hold for the replica: each of its frontend processes takes its share.
        share = config.serve.frontend_processes
        limit = admission_limit(config.serve)
        max_prefill = prefill_token_limit(config.serve, kv_tokens)
        self.client = EngineClient(
            core,
            self.metrics,
            None if limit is None else -(-limit // share),
            None if max_prefill is None else -(-max_prefill // share),
        )
        self.api_keys = ApiKeys.from_config(config.serve)
        self.max_request_bytes = config.serve.max_request_bytes
        self.request_timeout_s = config.serve.request_timeout_s
        self.prefixes = RecentPrefixes(4 * REPORTED_PREFIXES)
        # a further frontend process hands each request's prefix keys to the replica's routing report
        self.on_prefixes: Callable[[list], None] | None = None
        # with frontend processes: the others' request figures, which /metrics sums with this one's
        self.gather_metrics: Callable[[], Awaitable[list[bytes]]] | None = None
        # with several frontend processes: the replica's own pid (a spawned one sets its parent's): the CPU
        # reported is that process's and its frontend children's, whichever of them answers
        self.replica_pid = None if config.serve.frontend_processes == 1 else os.getpid()
        self._token_text: dict[int, str] = {}

    # ---- this replica's state: routing, health, metrics ------------------------------------------
    def stats(self) -> ReplicaStats:
        if self.replica_pid is None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime
        else:
            cpu = frontend_cpu_seconds(self.replica_pid, self.core.core_pid)
        engine = self.core.stats
        if not self.core.healthy:  # its engine's requests are gone with it: report none running
            engine = msgspec.structs.replace(
                engine, num_waiting=0, num_running=0, outstanding_tokens=0, kv_cache_usage=0.0
            )
        return ReplicaStats(
            replica_id=self.replica_id,
            engine=engine,
            frontend_cpu_seconds_total=cpu,
            frontend_gc_seconds_total=gc_seconds_total(),
            healthy=self.core.healthy,
            timestamp=time.time(),
        )

    # ---- shared by HTTP and gRPC ------------------------------------------------------------------
    def _decode_token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else ""
            self._token_text[token_id] = text
        return text

    @staticmethod
    def _grpc_tool_format(req: CompletionRequest | ChatCompletionRequest) -> ToolCallFormat | None:
        """The format a gRPC reply's calls are parsed in (the model's, as on HTTP), or None without tools."""
        return req.tool_format if isinstance(req, ChatCompletionRequest) and req.parses_tool_calls else None

    def _echo(self, req: CompletionRequest | ChatCompletionRequest) -> list[str | None] | None:
        """With `echo` (completions), each choice's prompt text (choice i * n + k is prompt i's)."""
        if not getattr(req, "echo", False):
            return None
        decode = self.tokenizer.decode if self.tokenizer else lambda ids, **_: ""
        texts = [p if isinstance(p, str) else decode(p, skip_special_tokens=False) for p in req.prompts()]
        return [t for t in texts for _ in range(req.n)]

    def _check_model(self, model: str | None) -> None:
        if model and model != self.info.model_name:
            raise model_not_found(model, self.info.model_name)

    def _completion_requests(self, req: CompletionRequest, request_id: str) -> list[EngineRequest]:
        self._check_model(req.model)
        req.check()
        out = []
        for i, prompt in enumerate(req.prompts()):
            ids = encode_prompt(self.tokenizer, prompt, "prompt")
            max_tokens = resolve_max_tokens(len(ids), req.max_tokens, self.info, "prompt", "max_tokens")
            params = sampling_or_400(req.sampling_params, max_tokens, self.info.sampling_defaults)
            out.append(engine_request(f"{request_id}-{i}", ids, params, self.info))
        return out

    def _chat_requests(self, req: ChatCompletionRequest, request_id: str) -> list[EngineRequest]:
        self._check_model(req.model)
        req.check()
        req.use_tool_format(self.tool_format)
        ids = encode_chat(self.tokenizer, req.conversation(), req.add_generation_prompt, req.template_tools())
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = resolve_max_tokens(len(ids), req.requested_max_tokens, self.info, "messages", param)
        params = sampling_or_400(req.sampling_params, max_tokens, self.info.sampling_defaults)
        return [engine_request(request_id, ids, params, self.info)]

    async def _open(
        self, requests: list[EngineRequest], arrival: float, timeout_s: float | None, request_id: str
    ) -> EngineStreams:
        for r in requests:
            self.prefixes.add(r.prefix_keys)
            if self.on_prefixes is not None:
                self.on_prefixes(r.prefix_keys)
        timeout_s = timeout_s if timeout_s is not None else self.request_timeout_s
        return await self.client.open(requests, arrival, timeout_s, request_id)

    def _finish(self, endpoint: str, status: int | str) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()

    # ---- HTTP ---------------------------------------------------------------------------------------
    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        data = parse_json_object(await read_body(request, self.max_request_bytes))
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise from_validation(err) from None

    async def _serve_http(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        arrival = time.perf_counter()
        transit = transit_seconds(request.headers.get(ROUTED_AT_HEADER), time.time())
        request_id = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
        # Serve's proxy gives every request an x-request-id (the client's own, if it sent one) and
        # echoes it on the response: that id is the one logs and 5xx messages name. Outside Serve,
        # the response id stands in.
        trace_id = request.headers.get(REQUEST_ID_HEADER)
        id_header = {} if trace_id else {REQUEST_ID_HEADER: request_id}
        if transit is not None:
            self.metrics.transit.observe(transit)
            id_header[TRANSIT_HEADER] = f"{transit * 1e3:.3f}"
        trace_id = trace_id or request_id
        self.metrics.in_flight.inc()
        streaming = False
        try:
            self.api_keys.check(request.headers.get("authorization"))
            if chat:
                req = await self._parse(request, ChatCompletionRequest)
                requests = self._chat_requests(req, request_id)
            else:
                req = await self._parse(request, CompletionRequest)
                requests = self._completion_requests(req, request_id)
            streams = await self._open(requests, arrival, req.timeout, trace_id)
            headers = {"x-fuserve-replica": ",".join(streams.replicas), **id_header}
            if req.stream:
                streaming = True
                events = await _started(self._sse(endpoint, req, request_id, trace_id, streams, chat))
                replica_s = time.perf_counter() - arrival
                headers[TTFT_PARTS_HEADER] = (
                    f"{streams.admit_s * 1e3:.3f},{streams.core_first_s * 1e3:.3f},{replica_s * 1e3:.3f}"
                )
                return SSEResponse(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
            transcript = Transcript(len(requests), req.n, keep_text=True)

            async def collect() -> None:
                async for i, batch in streams:
                    for d in batch:
                        transcript.add(i, d)

            try:
                await until_disconnect(request.receive, collect)
            except ClientGone:
                self._finish(endpoint, "cancelled")
                return Response(status_code=499)  # nobody reads it: the connection is closed
            finally:
                await streams.close()
            if chat:
                body = transcript.chat_response(
                    request_id,
                    self.info.model_name,
                    self._decode_token,
                    req.wants_logprobs,
                    req.parses_tool_calls,
                    req.tool_format,
                )
            else:
                body = transcript.completion_response(
                    request_id, self.info.model_name, self._decode_token, req.wants_logprobs, self._echo(req)
                )
            self._finish(endpoint, 200)
            return JSONResponse(body.model_dump(), headers=headers)
        except APIError as err:
            self._finish(endpoint, err.status)
            return err.response(id_header)
        except asyncio.CancelledError:
            self._finish(endpoint, "cancelled")
            raise
        except Exception as err:  # the engine died (503), or a bug (500, logged): never drop the connection
            api_err = api_error(err, trace_id)
            self._finish(endpoint, api_err.status)
            return api_err.response(id_header)
        finally:
            if not streaming:
                self.metrics.in_flight.dec()

    async def _sse(
        self,
        endpoint: str,
        req: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        trace_id: str,
        streams: EngineStreams,
        chat: bool,
    ) -> AsyncIterator[str]:
        writer = ChunkWriter(
            request_id,
            self.info.model_name,
            self._decode_token,
            req.wants_logprobs,
            tool_calls=req.parses_tool_calls,
            tool_format=getattr(req, "tool_format", HERMES),
            echo=self._echo(req),
        )
        transcript = Transcript(len(streams.gens), req.n, keep_text=False)
        num_choices, num_finished = len(transcript.choices), 0
        status: int | str = "cancelled"
        try:
            if chat:
                for choice in range(num_choices):
                    yield writer.chat_role(choice)
            async for i, batch in streams:
                events = []  # one event per delta; a batch's events go out in one write
                for d in batch:
                    choice, offset = transcript.add(i, d)
                    num_finished += d.finished
                    if not (d.token_ids or d.finished):
                        continue
                    # Without include_usage the last chunk carries the usage; with it, a chunk of its own.
                    last = num_finished == num_choices and not req.include_usage
                    usage = transcript.usage() if last else None
                    events.append(
                        writer.chat(choice, d, usage) if chat else writer.completion(choice, d, offset, usage)
                    )
                if events:
                    yield "".join(events)
            if req.include_usage:
                yield writer.usage(transcript.usage(), chat)
            yield SSE_DONE
            status = 200
        except APIError as err:
            status = err.status
            yield err.sse()
            yield SSE_DONE
        except Exception as err:
            api_err = api_error(err, trace_id)
            status = api_err.status
            yield api_err.sse()
            yield SSE_DONE
        finally:
            await streams.close()
            self.metrics.in_flight.dec()
            self._finish(endpoint, status)

    async def completions(self, request: Request) -> Response:
        return await self._serve_http(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve_http(request, chat=True)

    async def get_models(self, request: Request) -> Response:
        try:
            self.api_keys.check(request.headers.get("authorization"))
        except APIError as err:
            return err.response()
        body = ModelList(data=[ModelCard(id=self.info.model_name, max_model_len=self.info.max_model_len)])
        return JSONResponse(body.model_dump())

    async def get_health(self, request: Request) -> Response:
        """Open without an API key (load balancers and probes ask it); a stopped engine's reason is
        logged, not shown."""
        if not self.core.healthy:
            detail = "this replica's engine is not running; it is being replaced"
            return JSONResponse({"status": "unavailable", "detail": detail}, 503)
        return JSONResponse(
            {
                "status": "ok",
                "model": self.info.model_name,
                "replica": self.replica_id,
                "engine_core_pid": self.core.core_pid,
                "frontend_pid": os.getpid(),  # which of the replica's frontend processes answered
            }
        )

    async def get_metrics(self, request: Request) -> Response:
        try:
            self.api_keys.check(request.headers.get("authorization"))
        except APIError as err:
            return err.response()
        self.metrics.update_replica(self.stats())
        siblings = await self.gather_metrics() if self.gather_metrics is not None else []
        return Response(self.metrics.render(siblings), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- gRPC (called by Serve's gRPC proxy by method name) ----------------------------------------
    def _grpc_requests(
        self, request: pb.GenerateRequest, grpc_context: Any, request_id: str
    ) -> tuple[list[EngineRequest], CompletionRequest | ChatCompletionRequest]:
        self.api_keys.check(grpc_service.authorization(grpc_context))
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise too_large(size, self.max_request_bytes)
        api_req = grpc_service.to_api_request(request)
        if isinstance(api_req, ChatCompletionRequest):
            return self._chat_requests(api_req, request_id), api_req
        return self._completion_requests(api_req, request_id), api_req

    @staticmethod
    def _grpc_request_id(request: pb.GenerateRequest) -> str:
        return f"chatcmpl-{uuid.uuid4().hex}" if request.messages else f"cmpl-{uuid.uuid4().hex}"

    async def _grpc_open(
        self, request: pb.GenerateRequest, grpc_context: Any, method: str
    ) -> tuple[EngineStreams, int, CompletionRequest | ChatCompletionRequest, str, str]:
        """Both gRPC methods' start: (streams, how many, the API request, request id, trace id); a
        request that fails its checks or cannot open ends the call with its status, counted under
        `method`."""
        arrival = time.perf_counter()
        request_id = self._grpc_request_id(request)
        trace_id = grpc_service.trace_id(grpc_context) or request_id
        try:
            requests, api_req = self._grpc_requests(request, grpc_context, request_id)
            streams = await self._open(requests, arrival, None, trace_id)
        except Exception as err:
            api_err = api_error(err, trace_id)
            self._finish(method, api_err.status)
            grpc_service.fail(grpc_context, api_err)
        return streams, len(requests), api_req, request_id, trace_id

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:  # noqa: N802
        streams, num_requests, api_req, request_id, trace_id = await self._grpc_open(
            request, grpc_context, "grpc"
        )
        try:
            transcript = Transcript(num_requests, api_req.n, keep_text=True)
            try:
                async for i, batch in streams:
                    for d in batch:
                        transcript.add(i, d)
            finally:
                await streams.close()
            self._finish("grpc", 200)
            tool_format = self._grpc_tool_format(api_req)
            return grpc_service.unary_response(
                request_id, self.info.model_name, transcript, tool_format, self._echo(api_req)
            )
        except Exception as err:
            api_err = api_error(err, trace_id)
            self._finish("grpc", api_err.status)
            grpc_service.fail(grpc_context, api_err)

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        streams, num_requests, api_req, request_id, trace_id = await self._grpc_open(
            request, grpc_context, "grpc_stream"
        )
        transcript = Transcript(num_requests, api_req.n, keep_text=False)
        replies = grpc_service.StreamReplies(
            request_id, self.info.model_name, self._grpc_tool_format(api_req), self._echo(api_req)
        )
        status: int | str = "cancelled"
        try:
            async for i, batch in streams:
                step = [(transcript.add(i, d)[0], d) for d in batch]
                yield replies.message(step)
            yield replies.usage(transcript)
            status = 200
        except Exception as err:
            api_err = api_error(err, trace_id)
            status = api_err.status
            grpc_service.fail(grpc_context, api_err)
        finally:
            await streams.close()
            self._finish("grpc_stream", status)
