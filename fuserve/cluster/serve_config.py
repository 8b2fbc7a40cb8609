"""The Serve config (Ray's `ServeDeploySchema`) that runs a fuserve deployment on an existing cluster.

One builder serves both ways of deploying declaratively, so they cannot drift apart:
- `fuserve deploy CONFIG` PUTs it to the Serve REST API of a running cluster, with the fuserve
  config inline in the application's `args`;
- `fuserve k8s CONFIG` writes it into the RayService's `serveConfigV2`, with `args` naming the
  config file mounted from a ConfigMap.

Replicas live in the application's `deployments` override, not only in the fuserve config: Serve
treats a change of `args` as new code and replaces every replica (each reloads the model), but a
change of only `num_replicas` / `autoscaling_config` in the override as a light update that adds or
drains replicas while the others keep serving. So the inline config leaves its replica settings out
(`without_replicas`), and re-applying a config that changes only them scales the running app.
"""

from __future__ import annotations

from typing import Any, Literal

from fuserve.configs import FuserveConfig, ServeConfig
from fuserve.router.grpc_service import SERVICER_FUNCTION

APP_NAME = "fuserve"
IMPORT_PATH = "fuserve.cluster:app"
ENGINE_DEPLOYMENT = "Engine"  # the name build_app gives the engine deployment
TOKEN_POLICY = "fuserve.cluster.token_autoscaling:OutstandingTokensPolicy"
REQUESTS_POLICY = "fuserve.cluster.token_autoscaling:EngineRequestsPolicy"

ProxyLocation = Literal["EveryNode", "HeadOnly"]


def replica_override(serve_cfg: ServeConfig) -> dict[str, Any]:
    """The Engine deployment's entry in `deployments`: a fixed count, or Serve's autoscaling."""
    if serve_cfg.autoscaling is None:
        return {"name": ENGINE_DEPLOYMENT, "num_replicas": serve_cfg.num_replicas}
    return {
        "name": ENGINE_DEPLOYMENT,
        "num_replicas": "auto",  # Serve then takes autoscaling_config (and sets num_replicas None)
        "autoscaling_config": autoscaling_options(serve_cfg),
    }


def autoscaling_options(serve_cfg: ServeConfig) -> dict[str, Any]:
    """Serve's autoscaling_config; with `target_outstanding_tokens`, fuserve's policy on queued work;
    with frontend processes, Serve's rule on requests counted by the engine core, since Serve's own count
    misses the requests those processes take (cluster/token_autoscaling.py)."""
    a = serve_cfg.autoscaling
    assert a is not None
    options: dict[str, Any] = {
        "min_replicas": a.min_replicas,
        "initial_replicas": max(a.min_replicas, 1),
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
    }
    if a.target_outstanding_tokens is not None:
        options["policy"] = {
            "policy_function": TOKEN_POLICY,
            "policy_kwargs": {"target_outstanding_tokens": a.target_outstanding_tokens},
        }
    elif serve_cfg.frontend_processes > 1:
        options["policy"] = {
            "policy_function": REQUESTS_POLICY,
            "policy_kwargs": {"target_ongoing_requests": a.target_ongoing_requests},
        }
    return options


def without_replicas(config: FuserveConfig) -> dict[str, Any]:
    """The config as a plain dict for `args`, minus what the replica override carries; only fields
    that differ from the defaults, so the same deployment always gives the same `args`.

    API keys never travel in it (Serve shows an application's args to anyone who can read its config):
    a config that holds them is refused with where they belong instead."""
    if config.serve.api_keys:
        raise ValueError(
            "serve.api_keys would be sent to the cluster in the open, in the application's config; "
            "remove them from this config and set FUSERVE_API_KEYS in the environment of the cluster's "
            "nodes (on Kubernetes, from a Secret in the pods' env)"
        )
    data = config.model_dump(mode="json", exclude_defaults=True)
    serve = data.get("serve", {})
    serve.pop("num_replicas", None)
    serve.pop("autoscaling", None)
    if not serve:
        data.pop("serve", None)
    return data


def serve_deploy_config(
    config: FuserveConfig,
    config_arg: str | dict[str, Any],
    proxy_location: ProxyLocation = "EveryNode",
    host: str | None = None,
) -> dict[str, Any]:
    """`config_arg`: a path to the config file on the cluster's nodes, or the config inline;
    `host` overrides `serve.host` (KubeRay: pods are reached on their own IP, never on loopback)."""
    s = config.serve
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": host or s.host, "port": s.port},
        "grpc_options": {"port": s.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [
            {
                "name": APP_NAME,
                "import_path": IMPORT_PATH,
                "route_prefix": "/",
                "args": {"config": config_arg},
                "deployments": [replica_override(s)],
            }
        ],
    }
