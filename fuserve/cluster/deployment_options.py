"""Serve deployment options from a fuserve config: replicas, autoscaling, resources, router.

One engine replica holds one copy of the model on `tensor_parallel_size` devices:
- TP = 1: the replica actor itself asks for the GPU (none on CPU).
- TP > 1: a placement group per replica with one bundle per GPU (`parallel.placement.rank_bundles`).
  The replica runs in bundle 0 as rank 0 and starts the tensor-parallel workers in the others, so
  a replica is only placed when all its GPUs are free together (STRICT_PACK by default: one node).
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import RequestRouterConfig

from fuserve.cluster.serve_config import autoscaling_options
from fuserve.configs import FuserveConfig, ServeConfig
from fuserve.parallel.placement import rank_bundles
from fuserve.router.frontend import admission_limit
from fuserve.router.length_aware_router import LengthAwareRouter

ROUTING_STATS_PERIOD_S = 0.25  # replicas report outstanding tokens this often
HEALTH_CHECK_PERIOD_S = 2.0  # a replica whose engine core died is replaced within about this long
# Serve runs a replica's user code on a second event loop in its own thread, and the handle routers on
# a third, by default: every SSE chunk and every routing call then crosses threads (and the GIL). In
# the replicas only (in a driver the second flag breaks synchronous handle calls) they share one loop.
# Their access log is written in batches, not one write per request.
SAME_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def serve_limit(serve_cfg: ServeConfig) -> int:
    limit = admission_limit(serve_cfg)
    return 4 * serve_cfg.max_ongoing_requests if limit is None else limit + 64


def gpus_per_worker(config: FuserveConfig, cluster_gpus: float) -> int:
    """1 when the model runs on a GPU, 0 on CPU. `auto` means GPU when the cluster has any."""
    device = config.model.device
    if device == "cuda" or (device == "auto" and cluster_gpus > 0):
        return 1
    return 0


def engine_options(config: FuserveConfig, cluster_gpus: float = 0.0) -> dict[str, Any]:
    serve_cfg, tp = config.serve, config.parallel.tensor_parallel_size
    gpu = gpus_per_worker(config, cluster_gpus)
    actor: dict[str, Any] = {
        "num_cpus": serve_cfg.num_cpus_per_replica,
        "num_gpus": gpu,
        "runtime_env": {"env_vars": dict(SAME_LOOP_ENV)},
    }
    opts: dict[str, Any] = {
        "ray_actor_options": actor,
        # The replica does its own admission control (EngineClient: an OpenAI-shaped 429 at once).
        # Serve's limits only keep a proxy from piling more onto one replica than it would admit;
        # a proxy-side queue limit would answer Serve's own plain 503 before the replica could.
        "max_ongoing_requests": serve_limit(serve_cfg),
        "max_queued_requests": -1,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": serve_cfg.drain_timeout_s,
    }
    if tp > 1:
        bundles = rank_bundles(tp, use_gpu=bool(gpu))  # the TP worker group's own contract
        bundles[0]["CPU"] = max(bundles[0]["CPU"], serve_cfg.num_cpus_per_replica)  # the replica is rank 0
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = config.parallel.placement_strategy
    if serve_cfg.autoscaling is not None:
        opts["autoscaling_config"] = autoscaling_options(serve_cfg)
    else:
        opts["num_replicas"] = serve_cfg.num_replicas
    if serve_cfg.router in ("length_aware", "prefix_affinity"):
        kwargs: dict[str, Any] = {
            "policy": "ttft" if serve_cfg.router == "length_aware" else "prefix_affinity"
        }
        if serve_cfg.router == "prefix_affinity" and serve_cfg.prefix_affinity_imbalance is not None:
            kwargs["imbalanced_threshold"] = serve_cfg.prefix_affinity_imbalance
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class=LengthAwareRouter,
            request_router_kwargs=kwargs,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        )
    else:  # Serve's default: power of two choices on request counts
        opts["request_router_config"] = RequestRouterConfig(
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        )
    return opts
