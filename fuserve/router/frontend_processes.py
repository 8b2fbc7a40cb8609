"""A replica's further frontend processes: more cores for HTTP in front of one engine core.

One replica's frontend is one event loop: at 10-12k tokens/s it is ~0.7 of a core, and at 128-256
streams the wait for that loop (a request's transit into it, a step message's fan-out to every
stream) was what kept time to first token over its bound (benchmarks/NOTES.md, "Several frontend
processes per replica"). vLLM's answer is several API-server processes per engine core
(`--api-server-count`); this is the same behind Serve's HAProxy.

How: Serve binds the replica's own HTTP socket after the replica's `__init__` (direct ingress, one
ip:port per replica in HAProxy's config). Once it listens, the replica hands a duplicate of that
listening socket to `serve.frontend_processes` spawned processes; when they are ready, the replica's
own server stops accepting, so new connections are theirs; the ones HAProxy opened before are closed
after their next response (`Connection: close`), so HAProxy reopens them to the spawned processes.
Each new connection goes to whichever process
accepts it (one at a time: UV_TCP_SINGLE_ACCEPT; HAProxy reuses its connections, so the balance is
per connection). Each process runs uvicorn over the same routes (ingress.py) with its own `Frontend`
and its own ZMQ pair to the engine core, which sends each process only its own streams' outputs
(workers/output_routing.py). The replica's own process keeps the engine core, Serve's polls and gRPC.

What a further process does in the replica's place: it answers Serve's `/-/healthz` and `/-/routes`
as the replica would (from a flag the replica clears when it stops or fails, and its own channel to
the core); it hands each request's prefix keys to the replica, whose routing report carries them;
it stops accepting and drains its streams when the replica stops, and exits when the replica's
process is gone. Its requests are not in Serve's own request metrics or ongoing-request counts:
routing and autoscaling read the engine core's figures, which count every process's requests (with
autoscaling on `target_ongoing_requests`, the deployment gets fuserve's EngineRequestsPolicy,
cluster/token_autoscaling.py). A scrape of /metrics, whichever process takes it, sums every process's
request figures: the answering one asks the replica, which asks the others (`gather_metrics`,
merged_metrics.py); the engine's figures come once.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from fuserve.configs import FuserveConfig
from fuserve.core_messages import CoreReady
from fuserve.router.core_client import EngineCoreClient
from fuserve.workers.tokenizer import Tokenizer

logger = logging.getLogger("fuserve.router")

LISTEN_WAIT_S = 120.0  # for Serve to start the replica's HTTP server after __init__
METRICS_WAIT_S = 1.0  # for the other processes' request figures; one that does not answer is left out
ATTACH_TIMEOUT_S = 60.0
HEALTHY_MESSAGE = "success"  # what Serve's replica answers on /-/healthz
KEEP_ALIVE_S = 90  # Serve's own default for the replica's server (DEFAULT_UVICORN_KEEP_ALIVE_TIMEOUT_S)


class FrontendProcesses:
    """The replica's side: start the processes once Serve's server listens, watch them, stop them."""

    def __init__(
        self,
        config: FuserveConfig,
        core: EngineCoreClient,
        ready: CoreReady,
        replica_id: str,
        on_prefixes: Callable[[Any], None],
        app_name: str = "",
        tokenizer: Tokenizer | None = None,
        own_metrics: Callable[[], bytes] = lambda: b"",
    ) -> None:
        self.config = config
        self.core = core
        self.ready = ready
        self.replica_id = replica_id
        self.on_prefixes = on_prefixes
        self.app_name = app_name
        self.tokenizer = tokenizer  # sent to each process, which then never reads the model's files
        self.own_metrics = own_metrics  # the replica's own process's request figures
        self._snapshots: dict[int, tuple[asyncio.Future, list[bytes], int]] = {}
        self._next_key = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # where the pipes are read and written
        self._ready_conns: set[Connection] = set()
        self.error: str | None = None  # a process died: the replica fails its health check
        self._ctx = multiprocessing.get_context("spawn")
        self._healthy = self._ctx.Value("b", 1, lock=False)
        self.processes: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self._stopping = False
        self._task: asyncio.Task | None = None
        self.route_prefix = "/"
        self.port: int | None = None
        self._ready = 0

    def start_when_listening(self, find_socket: Callable[[], socket.socket | None] | None = None) -> None:
        if find_socket is None:
            from fuserve.cluster.ingress_routing import replica_listening_socket

            find_socket = replica_listening_socket
        self._task = asyncio.get_running_loop().create_task(self._start(find_socket))

    async def _start(self, find_socket: Callable[[], socket.socket | None]) -> None:
        deadline = time.monotonic() + LISTEN_WAIT_S
        while (sock := find_socket()) is None:
            if time.monotonic() > deadline or self._stopping:
                if not self._stopping:
                    logger.warning(
                        "serve.frontend_processes: no listening HTTP socket in this replica after %.0f s "
                        "(is serve.ingress haproxy?); serving with the replica's own process only",
                        LISTEN_WAIT_S,
                    )
                return
            await asyncio.sleep(0.1)
        host, self.port = sock.getsockname()[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # bound to every interface: loopback
        try:
            self.route_prefix = await own_route_prefix(host, self.port)
        except (OSError, ValueError) as err:
            sock.close()
            logger.warning("serve.frontend_processes: could not read this replica's /-/routes (%s)", err)
            return
        self.start(sock)

    def start(self, sock: socket.socket) -> None:
        """Spawns the processes on `sock` (a listening socket, duplicated into each; closed here)."""
        loop = self._loop = asyncio.get_running_loop()
        config_json = self.config.model_dump_json()
        core_pid = self.core.core_pid
        assert core_pid is not None
        try:
            for index in range(1, self.config.serve.frontend_processes + 1):
                mine, theirs = self._ctx.Pipe()
                spec = FrontendSpec(
                    config_json=config_json,
                    index=index,
                    core_dir=self.core.socket_dir,
                    ready=self.ready,
                    core_pid=core_pid,
                    replica_id=self.replica_id,
                    app_name=self.app_name,
                    route_prefix=self.route_prefix,
                    tokenizer=self.tokenizer,
                )
                proc = self._ctx.Process(
                    target=run_frontend,
                    args=(spec, sock, self._healthy, theirs),
                    name=f"fuserve-frontend-{index}",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self.processes.append((proc, mine))
                loop.add_reader(mine.fileno(), self._on_message, mine)
                loop.add_reader(proc.sentinel, self._on_exit, index, proc)
        finally:
            sock.close()
        logger.info("%d further frontend processes share this replica's port", len(self.processes))

    def _on_message(self, conn: Connection) -> None:
        try:
            kind, payload = recv_whole(conn)
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            return
        if kind == "prefixes":
            self.on_prefixes(payload)
        elif kind == "snapshot":
            self._on_snapshot(*payload)
        elif kind == "metrics?":  # a process answers a scrape: the figures of every other process
            asker = next(i for i, (_, c) in enumerate(self.processes) if c is conn)
            asyncio.get_running_loop().create_task(self._answer_metrics(conn, asker + 1, payload))
        elif kind == "ready":
            self._ready_conns.add(conn)
            self._ready += 1
            if self._ready == len(self.processes) and self.port is not None:
                # New connections are the spawned processes' from here: the replica's own server stops
                # accepting (the socket stays open in them). Its open connections stay: HAProxy may be
                # writing a request into an idle one right now, and closing it would fail that request.
                if not stop_accepting(self.port):
                    logger.warning(
                        "frontend_processes: the replica's own HTTP server was not found; it accepts too"
                    )
                HANDED_OVER.set()  # and its open connections close after their next response

    async def gather_metrics(self, asker: int = 0) -> list[bytes]:
        """Every process's request-side figures but the asker's (0: the replica's own process), from those
        that answer within METRICS_WAIT_S. The pipes are used from the loop that reads them only: Serve
        may run the replica's request handlers on another thread, and two threads writing one pipe
        interleave their messages."""
        loop = self._loop
        if loop is None:
            return []
        if asyncio.get_running_loop() is loop:
            return await self._gather(asker)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._gather(asker), loop))

    async def _gather(self, asker: int) -> list[bytes]:
        texts = [] if asker == 0 else [self.own_metrics()]
        conns = [
            c
            for i, (p, c) in enumerate(self.processes, start=1)
            if i != asker and c in self._ready_conns and p.is_alive()
        ]
        if not conns:
            return texts
        key, self._next_key = self._next_key, self._next_key + 1
        done = asyncio.get_running_loop().create_future()
        self._snapshots[key] = (done, texts, len(conns))
        for conn in conns:
            try:
                conn.send(("snapshot", key))
            except OSError:
                self._on_snapshot(key, None)
        try:
            await asyncio.wait_for(asyncio.shield(done), METRICS_WAIT_S)
        except TimeoutError:
            logger.warning(
                "/metrics: a frontend process did not send its figures within %.1f s", METRICS_WAIT_S
            )
        finally:
            self._snapshots.pop(key, None)
        return texts

    def _on_snapshot(self, key: int, text: bytes | None) -> None:
        entry = self._snapshots.get(key)
        if entry is None:  # late: that scrape was answered without it
            return
        done, texts, expected = entry
        if text is not None:
            texts.append(text)
        self._snapshots[key] = (done, texts, expected - 1)
        if expected == 1 and not done.done():
            done.set_result(None)

    async def _answer_metrics(self, conn: Connection, asker: int, key: int) -> None:
        texts = await self._gather(asker)
        try:
            conn.send(("metrics", (key, texts)))
        except OSError:
            pass

    def _on_exit(self, index: int, proc: multiprocessing.process.BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        self.core.detach(index)  # its requests' streams are gone with it: free their KV blocks
        if not self._stopping:
            proc.join(1)
            self.error = f"frontend process {index} (pid {proc.pid}) exited with code {proc.exitcode}"
            self._healthy.value = 0
            logger.error("%s; the replica reports itself unhealthy so that Serve replaces it", self.error)

    def stop(self, grace_s: float) -> None:
        """Each process stops accepting, lets its streams finish for up to `grace_s`, and exits."""
        self._stopping = True
        self._healthy.value = 0
        if self._task is not None:
            self._task.cancel()
        for _, conn in self.processes:
            try:
                conn.send(("drain", grace_s))
            except OSError:
                pass
        deadline = time.monotonic() + grace_s + 5
        for proc, conn in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()


def recv_whole(conn: Connection) -> Any:
    """One message from a pipe an event loop watches. The loop (uvloop's, at least) makes the descriptor
    non-blocking, and a message larger than one read (a process's metrics) would then fail half read
    with BlockingIOError, which reads like the other side being gone: the rest of the message is on
    its way, so it is waited for."""
    os.set_blocking(conn.fileno(), True)
    return conn.recv()


async def own_route_prefix(host: str, port: int) -> str:
    """The application's route prefix, as Serve's replica server answers `/-/routes` on its own socket
    (Serve keeps it on the replica object, out of the replica context user code can read)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /-/routes HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise ValueError(f"/-/routes answered {status!r}")
    if b"transfer-encoding: chunked" in head.lower():  # Serve's answer has no length: uvicorn chunks it
        body = _unchunk(body)
    routes = json.loads(body)
    if not isinstance(routes, dict) or len(routes) != 1:
        raise ValueError(f"/-/routes answered {routes!r}")
    return next(iter(routes))


def frontend_cpu_seconds(replica_pid: int, core_pid: int | None) -> float:
    """CPU seconds of the replica's process and its children but the engine core: its frontend
    processes (and multiprocessing's small resource tracker), read from /proc (Linux)."""
    pids = [replica_pid]
    for children in glob.glob(f"/proc/{replica_pid}/task/*/children"):
        try:
            with open(children) as f:
                pids += [int(p) for p in f.read().split() if int(p) != core_pid]
        except OSError:
            continue
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


# Set in the replica's own process once its spawned processes accept the new connections.
HANDED_OVER = threading.Event()


class CloseWhenHandedOver:
    """ASGI middleware: once the spawned processes take new connections, each response of the replica's
    own process tells HAProxy to close its connection after it (`Connection: close`), so HAProxy's next
    request opens a new one, which a spawned process accepts. Without it the connections HAProxy opened
    before the spawned processes were ready stayed with the replica's own process, reused for every
    request after: on an H100 one process took 100% of the requests at 16-128 streams (NOTES.md). The
    response itself completes (closing outright failed requests HAProxy was writing, twelfth session).
    In the spawned processes the event is never set: their responses are untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not HANDED_OVER.is_set():
            await self.app(scope, receive, send)
            return

        async def closing(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


def stop_accepting(port: int) -> bool:
    """Stops this process's uvicorn server on `port` accepting connections; those it has go on. Serve
    keeps its uvicorn server private, so it is found among the live objects."""
    import uvicorn

    from fuserve.gc_tuning import live_instances

    stopped = False
    for obj in live_instances(uvicorn.Server):
        for server in getattr(obj, "servers", []):
            if any(sock.getsockname()[1] == port for sock in server.sockets):
                server.close()  # closes this process's descriptor; the spawned processes hold their own
                stopped = True
    return stopped


def _unchunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


class _ServePaths:
    """Serve's own paths, answered as the replica answers them (replica.py `_direct_ingress_asgi`), and
    the application's route prefix, which the replica's server takes off before the app sees a path;
    everything else goes to the app."""

    def __init__(self, app: Any, healthy: Any, core: EngineCoreClient, spec: FrontendSpec) -> None:
        self.app, self.healthy, self.core, self.app_name = app, healthy, core, spec.app_name
        self.prefix = spec.route_prefix.rstrip("/")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in ("/-/healthz", "/-/routes"):
            if self.prefix and (path == self.prefix or path.startswith(self.prefix + "/")):
                scope["root_path"] = scope.get("root_path", "") + self.prefix
            await self.app(scope, receive, send)
            return
        ok = bool(self.healthy.value) and self.core.healthy
        if not ok:
            body, ctype = b"UNHEALTHY", b"text/plain; charset=utf-8"
        elif path == "/-/routes":
            body, ctype = json.dumps({self.prefix or "/": self.app_name}).encode(), b"application/json"
        else:
            body, ctype = HEALTHY_MESSAGE.encode(), b"text/plain; charset=utf-8"
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200 if ok else 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class FrontendSpec:
    """What a further frontend process needs to know to serve beside the replica."""

    config_json: str
    index: int
    core_dir: str  # the engine core's socket directory
    ready: CoreReady
    core_pid: int
    replica_id: str
    app_name: str
    route_prefix: str
    # the replica's, pickled: loading it again would import the model loader, and with it torch (~200
    # MB and 1-3 s a process), which nothing in a frontend process uses
    tokenizer: Tokenizer | None = None


def run_frontend(spec: FrontendSpec, sock: socket.socket, healthy: Any, conn: Connection) -> None:
    """The spawned process's entry point. Ctrl-C reaches the whole process group; the replica decides
    when this process ends (it drains first), so SIGINT is ignored here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # libuv accepts every pending connection at each wake-up: the first process awake would take a whole
    # burst; with this it takes one and yields, so the processes sharing the socket take turns
    os.environ["UV_TCP_SINGLE_ACCEPT"] = "1"
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # asyncio's own loop: slower, still correct
        runner = asyncio.run
    runner(_serve(spec, sock, healthy, conn))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips interpreter teardown, where torch's and triton's bindings report leaks to stderr


async def _serve(spec: FrontendSpec, sock: socket.socket, healthy: Any, conn: Connection) -> None:
    import importlib.util

    import uvicorn

    from fuserve.gc_tuning import quiet_gc
    from fuserve.router.frontend import Frontend
    from fuserve.router.ingress import app, serve_with

    config = FuserveConfig.model_validate_json(spec.config_json)
    tokenizer = spec.tokenizer
    attach = (spec.index, spec.core_dir, spec.ready, spec.core_pid)
    core = EngineCoreClient(config, tokenizer, spec.replica_id, attach_to=attach)
    await core.start(ATTACH_TIMEOUT_S)
    frontend = Frontend(config, tokenizer, core, spec.ready, spec.replica_id)
    frontend.on_prefixes = lambda keys: conn.send(("prefixes", keys))
    frontend.replica_pid = os.getppid()
    loop = asyncio.get_running_loop()
    scrapes: dict[int, asyncio.Future] = {}
    keys = itertools.count()

    async def gather_metrics() -> list[bytes]:
        """The other processes' request figures, through the replica (which adds its own)."""
        key = next(keys)
        scrapes[key] = loop.create_future()
        try:
            conn.send(("metrics?", key))
            return await asyncio.wait_for(scrapes[key], 2 * METRICS_WAIT_S)
        except (OSError, TimeoutError):
            return []
        finally:
            scrapes.pop(key, None)

    frontend.gather_metrics = gather_metrics
    serve_with(frontend)
    conn.send(("ready", None))  # uvicorn accepts on the shared socket from its first loop pass below
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    server = uvicorn.Server(
        uvicorn.Config(
            _ServePaths(app, healthy, core, spec),
            http=http,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

    def from_replica() -> None:
        try:
            kind, payload = recv_whole(conn)
        except (EOFError, OSError):  # the replica's process is gone: stop now
            kind, payload = "drain", 0.0
        if kind == "drain":
            loop.remove_reader(conn.fileno())
            server.config.timeout_graceful_shutdown = max(1, int(payload))
            server.should_exit = True
        elif kind == "snapshot":
            conn.send(("snapshot", (payload, frontend.metrics.request_text())))
        elif kind == "metrics":
            key, texts = payload
            scrape = scrapes.get(key)
            if scrape is not None and not scrape.done():
                scrape.set_result(texts)

    loop.add_reader(conn.fileno(), from_replica)
    quiet_gc()
    try:
        await server.serve(sockets=[sock])
    finally:
        core.shutdown()
