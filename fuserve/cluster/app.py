"""The Serve application: `build_app(config)` is the engine deployment, which is its own ingress.

    Serve's proxy --LengthAwareRouter picks a replica--> Engine replica (N of them): the frontend
        (FastAPI + gRPC, fuserve.router.ingress) and its engine-core child process

With `serve.ingress: haproxy` (Serve's HAProxy ingress) a router deployment attached to the app
(fuserve.cluster.ingress_routing) reads each request's body so the router sees its length and
prefix; HAProxy then forwards the request straight to that replica's own HTTP port.

`app` is a Serve application builder, so the same code runs under `fuserve serve`,
`serve run fuserve.cluster:app config=configs/tp2.yaml`, and KubeRay's serveConfigV2
(`import_path: fuserve.cluster:app` with `args: {config: ...}`); without a `config` argument it
reads the path from $FUSERVE_CONFIG, else serves the embedded default (SmolLM2 on CPU).
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from fuserve.cluster.deployment_options import engine_options
from fuserve.cluster.draft_deployment import DRAFT_DEPLOYMENT, DraftDeployment, draft_options
from fuserve.cluster.ingress_routing import haproxy_enabled, with_body_routing
from fuserve.configs import FuserveConfig, config_from_dict, load_config
from fuserve.router.api_keys import with_env_api_keys
from fuserve.router.ingress import EngineIngress

CONFIG_ENV = "FUSERVE_CONFIG"


def build_app(config: FuserveConfig, cluster_gpus: float | None = None) -> Application:
    """`cluster_gpus` decides `model.device: auto`; by default it is read from the Ray cluster."""
    config = with_env_api_keys(config)  # the replicas may run where this environment is not
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    engine = serve.deployment(EngineIngress, name="Engine").options(**engine_options(config, cluster_gpus))
    if config.speculative.deploys_draft:  # the draft model: a deployment of its own
        draft = serve.deployment(DraftDeployment, name=DRAFT_DEPLOYMENT)
        app = engine.bind(config, draft.options(**draft_options(config, cluster_gpus)).bind(config))
    else:
        app = engine.bind(config)
    if config.serve.ingress == "haproxy" or haproxy_enabled():  # Serve with HAProxy needs the router
        return with_body_routing(app, config)
    return app


def app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` come from `serve run ... config=PATH`, serveConfigV2, or
    `fuserve deploy`, which sends the config inline (a mapping), so no file need exist on the nodes."""
    unknown = set(args) - {"config"}
    if unknown:
        raise ValueError(
            f"unknown argument(s) {sorted(unknown)}; the only argument is config=PATH (a YAML file)"
        )
    config = args.get("config")
    if isinstance(config, dict):
        return build_app(config_from_dict(config, "the application's args"))
    return build_app(load_config(config or os.environ.get(CONFIG_ENV) or None))
