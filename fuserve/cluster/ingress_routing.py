"""Body-aware routing behind Serve's HAProxy ingress: the one place that touches Ray's private hooks.

Behind HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`) each Engine replica serves HTTP on its own port and
HAProxy forwards client connections straight to it: no Python proxy, no Ray message per token.
HAProxy load-balances on its own and bypasses the Engine deployment's `LengthAwareRouter`, unless
an *ingress request router* is attached to the application; then, for every POST, HAProxy's Lua
action asks that router which replica should take the request:

    client --POST /v1/chat/completions--> HAProxy --Lua: POST /internal/route, the client's body-->
        EngineRouter replica (this module): tokenize -> RoutingHint -> engine.choose_replica(hint)
        <-- 200 {"replica_id": "SERVE_REPLICA::app#Engine#abc"} --
    HAProxy --the original request, pinned to that replica's server--> Engine replica (FastAPI)

The choice is the Engine deployment's own `LengthAwareRouter` (its `request_router_config`),
running inside this router's `DeploymentHandle` with the replica stats Serve broadcasts, so the
policy and its accounting are the same code as behind the Python proxy; only the input differs (a
`RoutingHint` built from the body instead of a blind pickled ASGI request).

How Ray 2.60 does it (read from its source; all of it internal or alpha, hence this one module,
`ray[serve]>=2.60,<2.61` in pyproject.toml and tests/test_ingress_routing.py):

- `Application._with_ingress_request_router(router_app)` (ray/serve/deployment.py) attaches a
  router that must build into exactly one deployment of its own; it may take the Engine
  application as an argument (it becomes a handle). `build_app` refuses it unless the *driver's*
  `RAY_SERVE_ENABLE_HA_PROXY` is 1, and, with HAProxy on, refuses a custom request router on the
  ingress deployment when no ingress router is attached (serve/_private/build_app.py).
- Serve places `RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE` (fuserve sets 4) router replicas on every
  proxy node, starts an HTTP server in each (direct ingress port, 30000-31000), and HAProxy's Lua
  (serve/_private/ingress_request_router.lua.tmpl) calls `POST /internal/route` on those of its
  own node (round robin), else on one elsewhere. It waits for the body and the answer up to
  `RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S` (5 s). The body is the client's request
  body only with `RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1` (else empty), cut at
  `RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE` (8 MiB) with an `X-Body-Truncated` header.
  The path of the client's request is not sent, so the body's fields tell chat from completion.
- The answer must be HTTP 200 with a flat JSON object whose `replica_id` is the replica's full id
  (`ReplicaID.to_full_id_str()`, the replica actor's name, which is how HAProxy's config names
  the server); anything else makes HAProxy answer the client 503. Only POSTs are routed this
  way; GETs (/v1/models, /health, /metrics) are balanced by HAProxy alone (leastconn).
- The answer may carry `request_headers`, a flat map HAProxy sets on the forwarded request;
  client-sent headers starting `x-serve-router-` are deleted first, so the replica can trust them.
  We send `x-serve-router-fuserve-replica` = the chosen replica: a replica that finds another id
  there was reached some other way (HAProxy's retry or fallback), and tests see the pin worked.
- `DeploymentHandle.choose_replica(*args, _reserve=False)` runs the deployment's request router on
  `args` without dispatching anything and without reserving a slot on the replica (the request
  goes out through HAProxy, not through this handle); the replica is `selection._replica`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import RunningReplica

from fuserve.cluster.deployment_options import SAME_LOOP_ENV
from fuserve.configs import FuserveConfig
from fuserve.router.engine_messages import ModelInfo
from fuserve.router.errors import APIError
from fuserve.router.metrics import ROUTED_AT_HEADER
from fuserve.router.prompts import encode_chat, encode_prompt, resolve_max_tokens
from fuserve.router.protocol import ChatCompletionRequest, CompletionRequest
from fuserve.router.routing_policy import RoutingHint, prefix_keys
from fuserve.router.routing_timing import REQUEST_SECONDS, routing_metrics_text
from fuserve.router.tool_call_format import choose_tool_call_format
from fuserve.workers.models.loader import generation_config, load_tokenizer, resolve_source
from fuserve.workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROUTER_NAME = "EngineRouter"
ROUTE_PATH = "/internal/route"  # fixed in Ray's Lua template
TRUNCATED_HEADER = "x-body-truncated"  # set by the Lua when the body was cut at the buffer size
_TRUNCATED_NAME = TRUNCATED_HEADER.encode()  # as ASGI scopes carry header names
# Serve strips client-sent headers with this prefix (SERVE_INGRESS_ROUTER_HEADER_PREFIX) before the
# Lua sets the router's: the replica can trust it.
ROUTED_TO_HEADER = "x-serve-router-fuserve-replica"
# Serve's SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER: with "?1" the replica gets the server's own
# `receive` and the request runs in the connection's task (no receive proxy, no call task)
DISCONNECT_DISABLED_HEADER = "x-request-disconnect-disabled"
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
FORWARD_BODY_ENV = "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"
ROUTER_MAX_ONGOING = 1000  # the router is on every request's path: it must never be what queues
TOKENIZE_IN_THREAD_BYTES = 16 * 1024  # longer bodies are tokenized off the event loop


# ---- Ray's private hooks, each wrapped once --------------------------------------------------------
def haproxy_enabled() -> bool:
    """Whether Serve in *this* process runs with HAProxy. Serve reads the variable once, when
    `ray.serve` is first imported, so setting it later in `os.environ` changes nothing here."""
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_ENABLE_HA_PROXY)


def body_forwarded() -> bool:
    """Whether HAProxy sends the request body to /internal/route (as this process's Serve reads
    it; what counts is the value on the nodes that run HAProxy)."""
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY)


def attach_ingress_router(app: Application, router: Application) -> Application:
    """`Application._with_ingress_request_router`: internal and unstable in Ray 2.60."""
    return app._with_ingress_request_router(router)


def start_handle(handle: DeploymentHandle) -> None:
    """Starts the handle's router now, so that it has the replicas (and their stats) by the time
    the first request arrives instead of waiting for them then. `_init` is private."""
    handle._init()


async def pick_replica(handle: DeploymentHandle, hint: RoutingHint | None) -> str:
    """The full id of the replica the deployment's request router chooses for `hint`.

    No hint: `choose_replica()` with no arguments, which the length-aware router ranks by replica
    stats alone. `_reserve=False` and `selection._replica` are private."""
    args = () if hint is None else (hint,)
    async with handle.choose_replica(*args, _reserve=False) as selection:
        replica: RunningReplica = selection._replica
        return replica.replica_id.to_full_id_str()


def direct_ingress_http_ports() -> range:
    """The ports Serve gives replicas' own HTTP servers behind HAProxy (RAY_SERVE_DIRECT_INGRESS_*)."""
    from ray.serve._private import constants

    return range(
        constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT + 1
    )


def replica_listening_socket(ports: range | None = None) -> socket.socket | None:
    """A duplicate of this replica process's listening HTTP socket (the one Serve binds for direct
    ingress, after the replica's `__init__`, without SO_REUSEPORT), or None while there is none.
    Found among the process's own descriptors: a listening TCP socket on a port of Serve's
    direct-ingress range (Ray keeps the server object private). Linux only (/proc)."""
    ports = ports if ports is not None else direct_ingress_http_ports()
    found = []
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    seen = set()  # one socket may sit behind several descriptors (and the dups made here take numbers)
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            if not link.startswith("socket:") or link in seen:
                continue
            seen.add(link)
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            inet = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
            if listening and inet and sock.getsockname()[1] in ports:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    if len(found) != 1:  # none yet, or more than one: not knowing which is Serve's, take none
        for sock in found:
            sock.close()
        return None
    return found[0]


def route_answer(replica_id: str) -> dict[str, Any]:
    """What the Lua expects: a JSON object it reads with pattern matches, not a parser: `replica_id`
    a plain string (actor names hold no quote), `request_headers` a flat map of strings. The replica
    watches for the client leaving itself (router/sse_response.py), so Serve is told not to."""
    headers = {
        ROUTED_TO_HEADER: replica_id,
        ROUTED_AT_HEADER: f"{time.time():.6f}",
        DISCONNECT_DISABLED_HEADER: "?1",
    }
    return {"replica_id": replica_id, "request_headers": headers}


# ---- from a body to a RoutingHint ------------------------------------------------------------------
class HintBuilder:
    """Tokenizes an OpenAI request body as the Engine's frontend will, to estimate its cost.

    Built from the config alone (no call to the Engine), so the router starts independently of the
    replicas. The estimate matches the frontend's for valid requests: n * (prompt + max_tokens),
    with max_tokens unset taken as the room left in the context, capped by generation_config's
    max_new_tokens. A body the frontend would refuse gives no hint (stats-only routing), so the
    replica it lands on answers the 400 itself: a non-200 here would make HAProxy answer 503."""

    def __init__(self, config: FuserveConfig) -> None:
        source = resolve_source(config.model)
        self.tokenizer: Tokenizer | None = load_tokenizer(source) if source.kind != "dummy" else None
        template = self.tokenizer.chat_template if self.tokenizer else None
        self.tool_format = choose_tool_call_format(template, config.model.tool_call_format)
        max_position = int(source.hf_config.get("max_position_embeddings", 4096))
        self.block_size = config.cache.block_size
        self.info = ModelInfo(
            model_name=source.name,
            max_model_len=min(config.model.max_model_len or max_position, max_position),
            block_size=self.block_size,
            has_tokenizer=self.tokenizer is not None,
            default_max_tokens=generation_config(source, config.model).max_new_tokens,
        )

    def __call__(self, body: bytes) -> RoutingHint | None:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        try:
            if "messages" in data:
                return self._chat(ChatCompletionRequest.model_validate(data))
            if "prompt" in data:
                fast = self._plain_completion(data)
                return fast if fast is not None else self._completion(CompletionRequest.model_validate(data))
        except (ValueError, APIError):  # pydantic's ValidationError is a ValueError
            return None
        return None

    def _hint(self, prompts: list[list[int]], n: int, max_tokens: int | None) -> RoutingHint:
        """The whole HTTP request goes to one replica: its work is all its prompts' work."""
        work = 0
        outputs = []
        for ids in prompts:  # the parameter names only matter in the 400s, which are dropped here
            outputs.append(resolve_max_tokens(len(ids), max_tokens, self.info, "", ""))
            work += n * (len(ids) + outputs[-1])
        keys = prefix_keys(prompts[0], self.block_size)
        return RoutingHint(work, keys, self.block_size, len(prompts[0]), outputs[0])

    def _chat(self, req: ChatCompletionRequest) -> RoutingHint:
        req.use_tool_format(self.tool_format)  # the prompt the frontend renders, tools included
        ids = encode_chat(self.tokenizer, req.conversation(), req.add_generation_prompt, req.template_tools())
        return self._hint([ids], req.n, req.requested_max_tokens)

    def _plain_completion(self, data: dict[str, Any]) -> RoutingHint | None:
        """The common completion body (one prompt, as text or token ids; n and max_tokens plain
        ints) read without building the pydantic model, whose validation of a long token-id list was
        most of a routing call (~0.9 ms for 4,000 ids): every client request waits for it. Anything
        else returns None and takes the full model. A body the frontend will refuse may get a hint
        here: it only places the request, and its replica answers the 400."""
        prompt, n = data["prompt"], data.get("n", 1)
        max_tokens = data.get("max_tokens", CompletionRequest.model_fields["max_tokens"].default)
        if (
            type(n) is not int
            or n < 1
            or not (max_tokens is None or (type(max_tokens) is int and max_tokens >= 1))
        ):
            return None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                return None
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and type(prompt[0]) is int:
            ids = prompt
        else:
            return None
        return self._hint([ids], n, max_tokens)

    def _completion(self, req: CompletionRequest) -> RoutingHint:
        prompts = [encode_prompt(self.tokenizer, p, "prompt") for p in req.prompts()]
        return self._hint(prompts, req.n, req.max_tokens)


# ---- the router deployment -------------------------------------------------------------------------
Choose = Callable[[bytes, bool], Awaitable[dict[str, Any]]]
_JSON = [(b"content-type", b"application/json")]
_PROMETHEUS = [(b"content-type", CONTENT_TYPE_LATEST.encode())]


class RouteEndpoint:
    """POST /internal/route, GET /health and GET /metrics (the routing calls' cost) as a bare ASGI app.

    Every client request waits for this answer, and one router per node answers them all: FastAPI's
    routing, validation and response encoding were about half of a routing call's CPU (py-spy,
    2026-11-26), for two fixed paths and a flat JSON answer."""

    def __init__(self, choose: Choose) -> None:
        self.choose = choose

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":  # Serve runs the app's lifespan: nothing to start or stop
            while True:
                kind = (await receive())["type"]
                await send({"type": f"{kind}.complete"})
                if kind == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "POST" and path.endswith(ROUTE_PATH):  # behind a route prefix in tests
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            truncated = any(name == _TRUNCATED_NAME for name, _ in scope.get("headers", ()))
            try:
                status, answer = 200, await self.choose(b"".join(chunks), truncated)
            except Exception as err:  # no replica (yet), Engine deleted...: HAProxy answers the client 503
                status, answer = 503, {"detail": f"no Engine replica could be chosen: {err}"}
        elif method == "GET" and path.endswith("/health"):
            status, answer = 200, {"status": "ok"}
        elif method == "GET" and path.endswith("/metrics"):  # the routing calls' cost, routing_timing.py
            await send({"type": "http.response.start", "status": 200, "headers": _PROMETHEUS})
            await send({"type": "http.response.body", "body": routing_metrics_text()})
            return
        else:
            status, answer = 404, {"detail": f"{method} {path} is not served here"}
        body = json.dumps(answer, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status, "headers": _JSON})
        await send({"type": "http.response.body", "body": body})


@serve.ingress()
class EngineRouter:
    """Answers HAProxy's /internal/route: which Engine replica takes this request body.

    `choose` is the whole decision and is a plain method, so it can be called through a handle
    (tests) as well as over HTTP (HAProxy, through RouteEndpoint)."""

    def __init__(self, config: FuserveConfig, engine: DeploymentHandle) -> None:
        # With Serve's pow2 router a hint is ignored, so do not pay for tokenizing.
        self.hints = HintBuilder(config) if config.serve.router != "pow2" else None
        self.engine = engine
        start_handle(engine)

    async def choose(self, body: bytes, truncated: bool = False) -> dict[str, Any]:
        """A cut body is not valid JSON; it routes on stats alone rather than on half a prompt."""
        with REQUEST_SECONDS.time():
            hint = None
            if self.hints is not None and body and not truncated:
                if len(body) > TOKENIZE_IN_THREAD_BYTES:
                    hint = await asyncio.to_thread(self.hints, body)
                else:
                    hint = self.hints(body)
            return route_answer(await pick_replica(self.engine, hint))

    def routing_metrics(self) -> bytes:
        """The routing histograms of this replica's process (GET /metrics serves the same), for a handle:
        benchmarks read them without finding the replica's direct-ingress port."""
        return routing_metrics_text()

    def __serve_build_asgi_app__(self) -> RouteEndpoint:
        """Serve's late-bound ingress: the app is built after __init__, so it can call `choose`."""
        return RouteEndpoint(self.choose)


def router_options() -> dict[str, Any]:
    """No CPU reserved: Serve pins one router to every proxy node, which may have no CPU to give."""
    return {
        "name": ROUTER_NAME,
        "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": dict(SAME_LOOP_ENV)}},
        "max_ongoing_requests": ROUTER_MAX_ONGOING,
    }


def with_body_routing(app: Application, config: FuserveConfig) -> Application:
    """`app` (the Engine deployment, bound: it must be the application's ingress) with the HAProxy
    router attached, which routes every POST by the replica `LengthAwareRouter` chooses for its body.

    Raises at once, with what to set, where Serve would only refuse later (at `serve.run`)."""
    if not haproxy_enabled():
        raise RuntimeError(
            f"ingress 'haproxy' needs {HA_PROXY_ENV}=1 in the environment of this process before it "
            "imports ray.serve, and on every Ray node (it is read when Serve starts)"
        )
    if not body_forwarded():
        logger.warning(
            "%s is not 1 here: unless it is set on the nodes that run HAProxy, the router gets empty "
            "bodies and routes on replica stats alone (no prompt length, no prefix affinity)",
            FORWARD_BODY_ENV,
        )
    router = serve.deployment(EngineRouter).options(**router_options()).bind(config, app)
    return attach_ingress_router(app, router)
