"""The Serve application: `build_app(config)` binds the ingress to the engine deployment.

    Ingress (FastAPI + gRPC, 1 replica) --DeploymentHandle, LengthAwareRouter--> Engine (N replicas)

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

from fuserve.cluster.deployment_options import engine_options, ingress_options
from fuserve.cluster.engine_server import EngineServer
from fuserve.configs import FuserveConfig, load_config
from fuserve.router.ingress import Ingress

CONFIG_ENV = "FUSERVE_CONFIG"


def build_app(config: FuserveConfig, cluster_gpus: float | None = None) -> Application:
    """`cluster_gpus` decides `model.device: auto`; by default it is read from the Ray cluster."""
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    engine = serve.deployment(EngineServer, name="Engine").options(**engine_options(config, cluster_gpus))
    return Ingress.options(name="Ingress", **ingress_options(config)).bind(config, engine.bind(config))


def app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` come from `serve run ... config=PATH` or serveConfigV2."""
    unknown = set(args) - {"config"}
    if unknown:
        raise ValueError(
            f"unknown argument(s) {sorted(unknown)}; the only argument is config=PATH (a YAML file)"
        )
    path = args.get("config") or os.environ.get(CONFIG_ENV) or None
    return build_app(load_config(path))
