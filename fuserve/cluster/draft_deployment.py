"""The draft model as its own Serve deployment: Serve places, health-checks and restarts it; no step
data goes through it.

    Draft replica (this class)  --spawns-->  draft server process (speculative/draft_server.py)
        address()       where that process listens (DraftAddress as a dict): asked by an engine
                        core at start-up and after its draft stopped answering (control path)
        check_health()  fails once the server process is gone, so Serve replaces the replica

Resources come from `speculative.placement`: a GPU of its own (num_gpus 1), a share of one (a fraction,
beside the target), or CPU. A draft replica serves every engine that finds it (each engine's sequences
are its own), so one per engine replica is the natural count; rounds of engines sharing one queue.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fuserve.configs import FuserveConfig
from fuserve.speculative.draft_server import DraftServerProcess, start_draft_server

DRAFT_DEPLOYMENT = "Draft"
DRAFT_START_TIMEOUT_S = 600.0  # loading a large draft and capturing its graphs
HEALTH_CHECK_PERIOD_S = 2.0


class DraftDeployment:
    def __init__(self, config: FuserveConfig) -> None:
        import ray

        self.server: DraftServerProcess = start_draft_server(
            config, ray.util.get_node_ip_address(), DRAFT_START_TIMEOUT_S
        )

    def address(self) -> dict[str, Any]:
        self.check_health()
        return msgspec.to_builtins(self.server.address)

    def check_health(self) -> None:
        if not self.server.alive():
            raise RuntimeError(
                f"the draft server process exited (code {self.server.process.exitcode}); "
                "its log is this replica's stderr"
            )

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(timeout_s=2)


def draft_gpus(config: FuserveConfig, cluster_gpus: float) -> float:
    placement = config.speculative.placement
    if placement.device == "cuda" or (placement.device == "auto" and cluster_gpus > 0):
        return placement.num_gpus
    return 0.0


def draft_options(config: FuserveConfig, cluster_gpus: float = 0.0) -> dict[str, Any]:
    serve_cfg = config.serve
    auto = serve_cfg.autoscaling
    return {
        "ray_actor_options": {
            "num_cpus": config.speculative.placement.num_cpus,
            "num_gpus": draft_gpus(config, cluster_gpus),
        },
        "num_replicas": serve_cfg.num_replicas if auto is None else max(1, auto.min_replicas),
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
