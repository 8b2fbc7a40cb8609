"""`fuserve serve`: start (or join) a Ray cluster, start Serve's HTTP and gRPC proxies, run the app.

Ctrl-C (or SIGTERM) deletes the application and, when this process started the cluster, stops
it; on a shared cluster (`--address`) other applications keep running.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from fuserve.cluster.app import build_app
from fuserve.configs import FuserveConfig
from fuserve.router.api_keys import ApiKeys
from fuserve.router.grpc_service import SERVICER_FUNCTION
from fuserve.router.send_board import boards_base, sweep_stale_markers

APP_NAME = "fuserve"


def start_proxies(config: FuserveConfig) -> None:
    """HTTP on serve.host:serve.port, gRPC on serve.grpc_port (both fixed when Serve first starts)."""
    s = config.serve
    serve.start(
        http_options={"host": s.host, "port": s.port},
        grpc_options=gRPCOptions(port=s.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )


def serve_until_stopped(config: FuserveConfig, address: str | None = None) -> None:
    started_cluster = address is None
    ray.init(address=address, include_dashboard=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_proxies(config)
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        s = config.serve
        print(
            f"fuserve: serving at http://{s.host}:{s.port}/v1 (OpenAI API; /health, /metrics) and gRPC "
            f"{s.host}:{s.grpc_port}; Ctrl-C stops",
            flush=True,
        )
        if not ApiKeys.from_config(s).enabled:
            print(
                f"fuserve: note: no API key is set, and Serve's gRPC proxy listens on every interface "
                f"(port {s.grpc_port}; Ray Serve 2.60 takes no host for it): set {s.api_keys_env} or "
                "serve.api_keys, or keep that port behind a firewall",
                flush=True,
            )
        stop.wait()
    finally:
        print("fuserve: stopping", flush=True)
        node_id = ray.get_runtime_context().get_node_id()
        try:
            serve.delete(APP_NAME)
            if started_cluster:
                serve.shutdown()
        finally:
            if started_cluster:
                ray.shutdown()
                end_haproxy(node_id)
                sweep_stale_markers(boards_base(), wait_s=2.0)  # the routers' empty send-board markers


def end_haproxy(node_id: str) -> None:
    """Serve's HAProxy outlives the Ray cluster that started it when its manager actor is killed at
    shutdown rather than stopped (Ray 2.60), holding its ports (8404, 9101, serve.port) for the next
    start. It is known by its config file, in a folder named after the node: end it here."""
    marker = f"/haproxy-serve/{node_id}/".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGTERM)
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            pass
