"""`fuserve deploy CONFIG` and `fuserve scale N`: a fuserve app on a running Ray cluster, through the
Serve REST API on the cluster's dashboard (`PUT /api/serve/applications/`, as `serve deploy` does).

Why the REST API rather than a driver (`ray.init` + `serve.run`) or a Ray job: it needs only the
dashboard's HTTP address (reachable through `kubectl port-forward`), carries Ray's token (the
client adds `Authorization` from RAY_AUTH_TOKEN or the token file when auth is on), and is
declarative: Serve's controller keeps the config and re-applying one is an update, not a restart.
The fuserve config travels inline, so no file need exist on the cluster's nodes (the model
path must). `serve.ingress: haproxy` still needs `HAPROXY_ENV` in every node's environment before
Ray starts, which no REST call can set: `fuserve deploy` reminds of it (docs/operations.md).

Scaling: the replica count is the Engine deployment's override in the Serve config (see
serve_config.py), so re-applying a config that changes only `serve.num_replicas` or
`serve.autoscaling`, or `fuserve scale N`, adds or drains replicas while the others keep serving.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

from fuserve.cluster.serve_config import (
    APP_NAME,
    ENGINE_DEPLOYMENT,
    ProxyLocation,
    serve_deploy_config,
    without_replicas,
)
from fuserve.configs import FuserveConfig

DASHBOARD_ENV = "RAY_DASHBOARD_ADDRESS"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class DeployError(RuntimeError):
    """The cluster refused or failed the deployment; the message says what to do."""


def dashboard_address(address: str | None) -> str:
    """`--address`, else $RAY_DASHBOARD_ADDRESS, else the local dashboard; `host:port` gets http://."""
    address = address or os.environ.get(DASHBOARD_ENV) or DEFAULT_DASHBOARD
    return address if "://" in address else f"http://{address}"


def serve_client(address: str | None) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    url = dashboard_address(address)
    try:
        return ServeSubmissionClient(url)
    except Exception as err:  # ConnectionError, or Ray's RuntimeError naming the HTTP failure
        raise DeployError(
            f"cannot reach the Ray dashboard at {url} ({err}); pass --address http://HEAD:8265 (or set "
            f"{DASHBOARD_ENV}); with Ray token auth on, set RAY_AUTH_TOKEN to the cluster's token"
        ) from None


def deploy_config(config: FuserveConfig, proxy_location: ProxyLocation = "EveryNode") -> dict[str, Any]:
    return serve_deploy_config(config, without_replicas(config), proxy_location)


def apply(client: Any, serve_config: dict[str, Any]) -> None:
    try:
        client.deploy_applications(serve_config)
    except RuntimeError as err:
        raise DeployError(f"the cluster refused the Serve config: {err}") from None


def deployed_config(client: Any) -> dict[str, Any]:
    """The Serve config the cluster runs now (the one `fuserve deploy` sent)."""
    details = client.get_serve_details()
    app = details.get("applications", {}).get(APP_NAME)
    if not app or not app.get("deployed_app_config"):
        raise DeployError(f"no application '{APP_NAME}' on this cluster; run `fuserve deploy CONFIG` first")
    return {
        "proxy_location": details.get("proxy_location") or "EveryNode",
        "http_options": _options(details.get("http_options"), ("host", "port")),
        "grpc_options": _options(details.get("grpc_options"), ("port", "grpc_servicer_functions")),
        "applications": [app["deployed_app_config"]],
    }


def _options(options: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: options[k] for k in keys if options and options.get(k) is not None}


def with_replicas(serve_config: dict[str, Any], num_replicas: int) -> dict[str, Any]:
    """The same Serve config with a fixed Engine replica count (autoscaling off)."""
    out = copy.deepcopy(serve_config)
    app = out["applications"][0]
    others = [d for d in app.get("deployments", []) if d.get("name") != ENGINE_DEPLOYMENT]
    app["deployments"] = others + [{"name": ENGINE_DEPLOYMENT, "num_replicas": num_replicas}]
    return out


def deployed_at(client: Any) -> float | None:
    """When the cluster last took a config for the app (None: no app yet)."""
    app = client.get_serve_details().get("applications", {}).get(APP_NAME)
    return app.get("last_deployed_time_s") if app else None


def wait_running(
    client: Any, timeout_s: float, num_replicas: int | None = None, since: float | None = None
) -> dict[str, Any]:
    """Until the app took a config newer than `since` (`deployed_at` before applying it) and is
    RUNNING, with `num_replicas` Engine replicas RUNNING when given."""
    deadline = time.monotonic() + timeout_s
    status, message = "UNKNOWN", ""
    while time.monotonic() < deadline:
        app = client.get_serve_details().get("applications", {}).get(APP_NAME) or {}
        status, message = app.get("status", "NOT_STARTED"), app.get("message", "")
        taken = since is None or (app.get("last_deployed_time_s") or 0.0) > since
        if taken and status == "DEPLOY_FAILED":
            raise DeployError(f"the deployment failed on the cluster: {message}")
        if taken and status == "RUNNING" and (num_replicas is None or _running(app) == num_replicas):
            return app
        time.sleep(0.5)
    raise DeployError(
        f"'{APP_NAME}' not running after {timeout_s:.0f} s (status {status}: {message or 'no message'}); "
        "`fuserve status` shows its replicas, the dashboard their logs"
    )


def _running(app: dict[str, Any]) -> int:
    engine = app.get("deployments", {}).get(ENGINE_DEPLOYMENT, {})
    return sum(r.get("state") == "RUNNING" for r in engine.get("replicas", []))
