"""Shared set-up for the Ray Serve tests: a local Ray cluster with Serve, once per test module.

Starting Ray and Serve costs ~10 s on the CI box, so `serve_cluster` is module-scoped: a serve test
module starts one, its tests share the applications deployed on it, and it is shut down when the
module ends so later modules start clean. Both proxies run: HTTP and gRPC (fuserve's servicer).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from haproxy_processes import end_haproxy, haproxy_left_after
from ports import free_port

from fuserve.router.send_board import boards_base, sweep_stale_markers

# Ray 2.60 turns token auth on by default; a throwaway local test cluster does not need it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module", autouse=True)
def no_haproxy_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """An HAProxy left by a module is reported under that module's name and ended, so that the next
    module's app can take its ports (haproxy_processes.py). Costs nothing where none runs."""
    module = request.module.__name__
    end_haproxy(f"an HAProxy was running before {module} started")
    yield
    if haproxy_left_after(30):  # a loaded box may take a few seconds to reap it
        end_haproxy(f"{module} left an HAProxy running 30 s after its last test")


@dataclass
class ServeCluster:
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="module")
def serve_cluster() -> Iterator[ServeCluster]:
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from fuserve.router.grpc_service import SERVICER_FUNCTION

    cluster = ServeCluster(free_port(), free_port())
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": cluster.http_port},
        grpc_options=gRPCOptions(port=cluster.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        sweep_stale_markers(boards_base(), wait_s=2.0)  # as `fuserve serve` does when it stops
