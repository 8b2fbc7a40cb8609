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

from fuserve.configs import FuserveConfig
from fuserve.parallel.placement import rank_bundles
from fuserve.router.length_aware_router import LengthAwareRouter

ROUTING_STATS_PERIOD_S = 0.5  # replicas report outstanding tokens this often


def gpus_per_worker(config: FuserveConfig, cluster_gpus: float) -> int:
    """1 when the model runs on a GPU, 0 on CPU. `auto` means GPU when the cluster has any."""
    device = config.model.device
    if device == "cuda" or (device == "auto" and cluster_gpus > 0):
        return 1
    return 0


def engine_options(config: FuserveConfig, cluster_gpus: float = 0.0) -> dict[str, Any]:
    serve_cfg, tp = config.serve, config.parallel.tensor_parallel_size
    gpu = gpus_per_worker(config, cluster_gpus)
    actor: dict[str, Any] = {"num_cpus": serve_cfg.num_cpus_per_replica, "num_gpus": gpu}
    opts: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": serve_cfg.max_ongoing_requests,
        "max_queued_requests": serve_cfg.max_queued_requests,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
    }
    if tp > 1:
        bundles = rank_bundles(tp, use_gpu=bool(gpu))  # the TP worker group's own contract
        bundles[0]["CPU"] = max(bundles[0]["CPU"], serve_cfg.num_cpus_per_replica)  # the replica is rank 0
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = config.parallel.placement_strategy
    if serve_cfg.autoscaling is not None:
        a = serve_cfg.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = serve_cfg.num_replicas
    if serve_cfg.router == "length_aware":
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class=LengthAwareRouter,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        )
    else:  # Serve's default: power of two choices on request counts
        opts["request_router_config"] = RequestRouterConfig(
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        )
    return opts


def ingress_options(config: FuserveConfig) -> dict[str, Any]:
    """The ingress only parses, tokenizes and forwards: no GPU, a fraction of a CPU.

    It accepts well beyond what the engines take (their slots plus their queue), so that the
    excess reaches the engine handle and comes back at once as an OpenAI-shaped 429, rather than
    waiting unseen in the HTTP proxy's queue."""
    s = config.serve
    most_replicas = s.autoscaling.max_replicas if s.autoscaling else s.num_replicas
    engines = s.max_ongoing_requests * most_replicas + max(s.max_queued_requests, 0)
    return {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 2 * engines + 64}
