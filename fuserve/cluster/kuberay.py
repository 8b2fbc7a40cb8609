"""KubeRay manifests from a fuserve config: `fuserve k8s CONFIG --image IMAGE [--out DIR]`.

Writes three files, each a list of Kubernetes objects, all derived from the one config so they
cannot drift from it (tests/test_k8s_manifests.py regenerates `k8s/` and compares):

- `rayservice.yaml`: a ConfigMap holding the config file and a RayService whose serveConfigV2 is
  `serve_config.serve_deploy_config` (the same Serve config `fuserve deploy` sends), importing
  `fuserve.cluster:app` with the mounted file as its `config`. Edit the replica count there (the
  `deployments` entry) and KubeRay applies it as a light update: replicas are added or drained,
  the others keep serving.
- `raycluster.yaml`: the same cluster as a plain RayCluster, for running `fuserve serve` or
  `fuserve deploy` by hand (development, benchmarks).
- `service.yaml`: an example Ingress in front of the RayService's serve Service, and a Service for
  the RayCluster's serving ports.

The cluster: a head that runs no engine (`num-cpus: 0`: Serve's controller and a proxy), and one
worker group sized from the config, one engine replica per pod with `tensor_parallel_size` GPUs
(a replica's STRICT_PACK placement group then always fits one pod), as many pods as replicas (or
the autoscaling range, with KubeRay's autoscaler on). GPU pods tolerate the NVIDIA taint and select
GPU nodes. Every container gets the environment the serving path needs before Ray starts
(`HAPROXY_ENV` with `serve.ingress: haproxy`), and Ray token auth is on (KubeRay makes the secret).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fuserve.cluster.serve_config import serve_deploy_config
from fuserve.configs import HAPROXY_ENV, FuserveConfig, load_config

RAY_VERSION = "2.60.0"
CONFIG_DIR = "/etc/fuserve"
MODELS_DIR = "/models"
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001
MANIFEST_FILES = ("rayservice.yaml", "raycluster.yaml", "service.yaml")
# Set by NVIDIA's GPU operator (GPU feature discovery) on nodes with a GPU; GPU node pools carry the
# `nvidia.com/gpu` NoSchedule taint (GKE, EKS and AKS do so by default).
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass
class K8sOptions:
    image: str  # has fuserve installed, FROM rayproject/ray:<RAY_VERSION>-py312-gpu
    name: str = "fuserve"
    models_claim: str = "models"  # a PVC holding the model folders, mounted at MODELS_DIR
    config_file: str = "config.yaml"  # the ConfigMap key, mounted at CONFIG_DIR/config_file
    config_text: str = ""
    gpu_node_selector: dict[str, str] = field(default_factory=lambda: dict(GPU_NODE_SELECTOR))


class _ManifestDumper(yaml.SafeDumper):
    """Readable manifests: multi-line strings as `|` blocks, no `&id001` anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str)


def _probe(path: str, port: str, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _container(
    name: str, opts: K8sOptions, resources: dict[str, Any], ports: list[tuple[str, int]], env: dict[str, str]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": opts.image,
        "resources": {"limits": resources, "requests": resources},
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        **({"env": [{"name": k, "value": v} for k, v in env.items()]} if env else {}),
        "volumeMounts": [
            {"name": "fuserve-config", "mountPath": CONFIG_DIR},
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},  # Ray's object store, NCCL, the plan ring
        ],
    }


def _pod_spec(container: dict[str, Any], opts: K8sOptions, gpus: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "fuserve-config", "configMap": {"name": f"{opts.name}-config"}},
            {"name": "models", "persistentVolumeClaim": {"claimName": opts.models_claim, "readOnly": True}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if gpus:
        spec["nodeSelector"] = dict(opts.gpu_node_selector)
        spec["tolerations"] = [dict(t) for t in GPU_TOLERATIONS]
    return spec


def node_env(config: FuserveConfig) -> dict[str, str]:
    """What every Ray node needs in its environment before Ray starts."""
    return dict(HAPROXY_ENV) if config.serve.ingress == "haproxy" else {}


def replica_range(config: FuserveConfig) -> tuple[int, int, int]:
    """(min, max, initial) worker pods: one per engine replica."""
    a = config.serve.autoscaling
    if a is None:
        n = config.serve.num_replicas
        return n, n, n
    return a.min_replicas, a.max_replicas, max(a.min_replicas, 1)


def ray_cluster_spec(config: FuserveConfig, opts: K8sOptions) -> dict[str, Any]:
    s, tp = config.serve, config.parallel.tensor_parallel_size
    gpus = tp if config.model.device != "cpu" else 0
    cpus = int(max(s.num_cpus_per_replica, 1)) + tp + 1  # the replica, its TP workers, headroom
    worker_res: dict[str, Any] = {"cpu": str(cpus), "memory": f"{16 * max(tp, 1)}Gi"}
    if gpus:
        worker_res["nvidia.com/gpu"] = gpus
    serving = [("serve", s.port), ("grpc", s.grpc_port)]
    env = node_env(config)
    head_ports = [("gcs", GCS_PORT), ("dashboard", DASHBOARD_PORT), ("client", CLIENT_PORT)] + serving
    head = _container("ray-head", opts, {"cpu": "4", "memory": "16Gi"}, head_ports, env)
    worker = _container("ray-worker", opts, worker_res, serving, env)
    # Ready when the app answers /health through this pod's proxy (the serve Service then sends it
    # traffic); alive while the pod's Serve proxy answers. The startup probe allows 30 min for the
    # model to load. The head keeps KubeRay's default probes: it holds no engine, and an unready
    # head would take the GCS out of its Service.
    worker["readinessProbe"] = _probe("/health", "serve", 5, 3)
    worker["livenessProbe"] = _probe("/-/healthz", "serve", 10, 6)
    worker["startupProbe"] = _probe("/-/healthz", "serve", 10, 180)
    lo, hi, count = replica_range(config)
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": s.autoscaling is not None,
        # KubeRay makes a Secret named after the RayCluster (key auth_token) and sets RAY_AUTH_TOKEN
        # in every container; clients joining the cluster need the same token (docs/operations.md).
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": _pod_spec(head, opts, gpus=0)},
        },
        "workerGroupSpecs": [
            {
                "groupName": "engine",
                "replicas": count,
                "minReplicas": lo,
                "maxReplicas": hi,
                "rayStartParams": {},
                "template": {"spec": _pod_spec(worker, opts, gpus)},
            }
        ],
    }


def config_map(opts: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{opts.name}-config"},
        "data": {opts.config_file: opts.config_text},
    }


def rayservice(config: FuserveConfig, opts: K8sOptions) -> dict[str, Any]:
    serve_config = serve_deploy_config(config, f"{CONFIG_DIR}/{opts.config_file}", host="0.0.0.0")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": opts.name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(config, opts),
        },
    }


def raycluster(config: FuserveConfig, opts: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": f"{opts.name}-dev"},
        "spec": ray_cluster_spec(config, opts),
    }


def serving_objects(config: FuserveConfig, opts: K8sOptions) -> list[dict[str, Any]]:
    """An Ingress for the RayService's `<name>-serve-svc` (KubeRay makes it; it selects the pods
    whose proxy is healthy) and a Service for the dev RayCluster's head, which has no such Service."""
    s = config.serve
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": opts.name},
        "spec": {
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {"name": f"{opts.name}-serve-svc", "port": {"number": s.port}}
                                },
                            }
                        ]
                    }
                }
            ]
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{opts.name}-dev-serve"},
        "spec": {
            "selector": {"ray.io/cluster": f"{opts.name}-dev", "ray.io/node-type": "head"},
            "ports": [
                {"name": "serve", "port": s.port, "targetPort": s.port},
                {"name": "grpc", "port": s.grpc_port, "targetPort": s.grpc_port},
            ],
        },
    }
    return [ingress, service]


def manifests(config: FuserveConfig, opts: K8sOptions) -> dict[str, list[dict[str, Any]]]:
    """File name -> the objects it holds."""
    return {
        "rayservice.yaml": [config_map(opts), rayservice(config, opts)],
        "raycluster.yaml": [config_map(opts), raycluster(config, opts)],
        "service.yaml": serving_objects(config, opts),
    }


def render(objects: list[dict[str, Any]], header: str) -> str:
    return header + yaml.dump_all(objects, Dumper=_ManifestDumper, sort_keys=False)


def write_manifests(config_path: str | Path, out: str | Path, opts: K8sOptions) -> list[Path]:
    """Writes MANIFEST_FILES under `out`; `opts.config_file/config_text` come from `config_path`."""
    path = Path(config_path)
    config = load_config(path)
    opts.config_file, opts.config_text = path.name, path.read_text()
    command = f"fuserve k8s {config_path} --image {opts.image}"
    command += "" if opts.name == "fuserve" else f" --name {opts.name}"
    command += "" if opts.models_claim == "models" else f" --models-claim {opts.models_claim}"
    header = f"# Generated by `{command}`; do not edit (tests/test_k8s_manifests.py).\n"
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, objects in manifests(config, opts).items():
        target = out_dir / file_name
        target.write_text(render(objects, header))
        written.append(target)
    return written
