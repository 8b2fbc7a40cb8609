"""KubeRay manifests from a fuserve config: a ConfigMap holding the config and a RayService.

    python -m fuserve.cluster.kuberay configs/llama3-8b.yaml --image IMAGE > rayservice.yaml
    kubectl apply -f rayservice.yaml

The RayService's serveConfigV2 imports `fuserve.cluster:app` with `args: {config: ...}` pointing at
the mounted ConfigMap, and starts Serve's gRPC proxy with fuserve's servicer. Worker pods are sized
from the config: one engine replica per pod with `tensor_parallel_size` GPUs (so a replica's
STRICT_PACK placement group always fits one pod), as many pods as replicas (or the autoscaling
range, with KubeRay's in-tree autoscaler on). `k8s/rayservice.yaml` was generated this way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from fuserve.configs import HAPROXY_ENV, FuserveConfig, load_config
from fuserve.router.grpc_service import SERVICER_FUNCTION


class _ManifestDumper(yaml.SafeDumper):
    """Readable manifests: multi-line strings as `|` blocks, no `&id001` anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str)

RAY_VERSION = "2.60.0"
CONFIG_DIR = "/etc/fuserve"
MODELS_DIR = "/models"


def serve_config(config: FuserveConfig, config_file: str) -> dict[str, Any]:
    s = config.serve
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": s.port},
        "grpc_options": {"port": s.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [
            {
                "name": "fuserve",
                "import_path": "fuserve.cluster:app",
                "route_prefix": "/",
                "args": {"config": f"{CONFIG_DIR}/{config_file}"},
            }
        ],
    }


def _container(
    name: str, image: str, resources: dict[str, Any], ports: list[tuple[str, int]], env: dict[str, str]
) -> dict:
    return {
        "name": name,
        "image": image,
        "resources": {"limits": resources, "requests": resources},
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        **({"env": [{"name": k, "value": v} for k, v in env.items()]} if env else {}),
        "volumeMounts": [
            {"name": "fuserve-config", "mountPath": CONFIG_DIR},
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
        ],
    }


def _volumes(name: str, models_claim: str) -> list[dict]:
    return [
        {"name": "fuserve-config", "configMap": {"name": f"{name}-config"}},
        {"name": "models", "persistentVolumeClaim": {"claimName": models_claim, "readOnly": True}},
    ]


def rayservice_manifests(
    config: FuserveConfig, config_text: str, config_file: str, image: str, name: str, models_claim: str
) -> list[dict[str, Any]]:
    s, tp = config.serve, config.parallel.tensor_parallel_size
    gpus = tp if config.model.device != "cpu" else 0
    cpus = int(max(s.num_cpus_per_replica, 1)) + tp + 1  # the replica, its TP workers, headroom
    worker_res: dict[str, Any] = {"cpu": str(cpus), "memory": f"{16 * max(tp, 1)}Gi"}
    if gpus:
        worker_res["nvidia.com/gpu"] = gpus
    if s.autoscaling is not None:
        lo, hi, count = (
            s.autoscaling.min_replicas,
            s.autoscaling.max_replicas,
            max(s.autoscaling.min_replicas, 1),
        )
    else:
        lo = hi = count = s.num_replicas
    ports = [("serve", s.port), ("grpc", s.grpc_port)]
    env = dict(HAPROXY_ENV) if s.ingress == "haproxy" else {}
    head = _container(
        "ray-head", image, {"cpu": "4", "memory": "16Gi"}, [("gcs", 6379), ("dashboard", 8265)] + ports, env
    )
    worker = _container("ray-worker", image, worker_res, ports, env)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config"},
        "data": {config_file: config_text},
    }
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(config, config_file), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": s.autoscaling is not None,
                "headGroupSpec": {
                    # No engine on the head: it runs the controller and a proxy.
                    "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [head], "volumes": _volumes(name, models_claim)}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "engine",
                        "replicas": count,
                        "minReplicas": lo,
                        "maxReplicas": hi,
                        "rayStartParams": {},
                        "template": {
                            "spec": {"containers": [worker], "volumes": _volumes(name, models_claim)}
                        },
                    }
                ],
            },
        },
    }
    return [config_map, service]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fuserve.cluster.kuberay", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("config", help="deployment YAML")
    p.add_argument(
        "--image", required=True, help="container image with fuserve installed (FROM rayproject/ray)"
    )
    p.add_argument("--name", default="fuserve", help="RayService name")
    p.add_argument(
        "--models-claim", default="models", help=f"PVC holding model folders, mounted at {MODELS_DIR}"
    )
    args = p.parse_args(argv)
    path = Path(args.config)
    config = load_config(path)
    docs = rayservice_manifests(config, path.read_text(), path.name, args.image, args.name, args.models_claim)
    print(f"# Generated by `python -m fuserve.cluster.kuberay {args.config} --image {args.image}`.")
    print(yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
