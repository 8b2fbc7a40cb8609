"""`fuserve k8s | deploy | status | scale`: the command line for clusters (added to fuserve.cli).

Outside `fuserve.cluster` so that building the parser imports neither Ray nor torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

ADDRESS_HELP = (
    "the Ray dashboard's address, e.g. http://head:8265 (default: $RAY_DASHBOARD_ADDRESS, else "
    "http://127.0.0.1:8265); with Ray token auth on, set RAY_AUTH_TOKEN"
)


def _reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A cluster's refusal is a message and exit status 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from fuserve.cluster.deploy import DeployError

        try:
            return command(args)
        except DeployError as err:
            print(f"fuserve: {err}", file=sys.stderr)
            return 1

    return run


def _k8s(args: argparse.Namespace) -> int:
    from fuserve.cluster.kuberay import K8sOptions, write_manifests

    opts = K8sOptions(image=args.image, name=args.name, models_claim=args.models_claim)
    for path in write_manifests(args.config, args.out, opts):
        print(f"fuserve: wrote {path}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from fuserve.cluster.deploy import apply, deploy_config, deployed_at, serve_client, wait_running
    from fuserve.configs import HAPROXY_ENV, load_config

    config = load_config(args.config)
    client = serve_client(args.address)
    if config.serve.host in ("127.0.0.1", "localhost"):
        print(
            f"fuserve: serve.host is {config.serve.host}: each node's proxy answers only on that node; "
            "set serve.host: 0.0.0.0 to serve other machines",
            file=sys.stderr,
        )
    if config.serve.ingress == "haproxy":
        print(
            "fuserve: serve.ingress is haproxy: every node must have started with "
            + " ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items())
            + " in its environment",
            file=sys.stderr,
        )
    since = deployed_at(client)
    apply(client, deploy_config(config, args.proxy_location))
    print(f"fuserve: applied {args.config}", flush=True)
    if args.timeout > 0:
        fixed = config.serve.num_replicas if config.serve.autoscaling is None else None
        wait_running(client, args.timeout, fixed, since)
        print("fuserve: running", flush=True)
    return 0


def _scale(args: argparse.Namespace) -> int:
    from fuserve.cluster.deploy import (
        apply,
        deployed_at,
        deployed_config,
        serve_client,
        wait_running,
        with_replicas,
    )

    client = serve_client(args.address)
    since = deployed_at(client)
    apply(client, with_replicas(deployed_config(client), args.num_replicas))
    print(f"fuserve: scaling to {args.num_replicas} replica(s)", flush=True)
    if args.timeout > 0:
        wait_running(client, args.timeout, args.num_replicas, since)
        print(f"fuserve: {args.num_replicas} replica(s) running", flush=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    from fuserve.cluster.status import as_json, format_status, gather

    st = gather(args.address, args.python)
    print(as_json(st) if args.json else format_status(st))
    return 0


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    k8s = sub.add_parser(
        "k8s",
        help="write KubeRay manifests (RayService, RayCluster, Service/Ingress) for a deployment",
        description="Write rayservice.yaml, raycluster.yaml and service.yaml for CONFIG into --out.",
    )
    k8s.add_argument("config", help="deployment YAML (its file goes into a ConfigMap)")
    k8s.add_argument(
        "--image", required=True, help="container image with fuserve installed (FROM rayproject/ray)"
    )
    k8s.add_argument("--out", default="k8s", help="output folder (default: k8s)")
    k8s.add_argument("--name", default="fuserve", help="RayService name (default: fuserve)")
    k8s.add_argument(
        "--models-claim", default="models", help="PVC holding the model folders, mounted at /models"
    )
    k8s.set_defaults(func=_k8s)

    dep = sub.add_parser(
        "deploy",
        help="deploy (or re-apply) a config to a running Ray cluster through its dashboard",
        description="Send CONFIG to the Serve REST API of a running cluster. Re-applying a config that "
        "changes only serve.num_replicas or serve.autoscaling scales the running app; any other "
        "change replaces the replicas one by one (Serve's rolling update).",
    )
    dep.add_argument("config", help="deployment YAML; model.path must exist on the cluster's nodes")
    dep.add_argument("--address", default=None, help=ADDRESS_HELP)
    dep.add_argument(
        "--proxy-location",
        choices=["EveryNode", "HeadOnly"],
        default="EveryNode",
        help="where Serve runs its HTTP/gRPC proxies (HeadOnly when nodes share one host's ports)",
    )
    dep.add_argument("--timeout", type=float, default=600.0, help="wait this long for RUNNING; 0: don't wait")
    dep.set_defaults(func=_reported(_deploy))

    scale = sub.add_parser(
        "scale", help="set the number of engine replicas of the deployed app (autoscaling off)"
    )
    scale.add_argument("num_replicas", type=int)
    scale.add_argument("--address", default=None, help=ADDRESS_HELP)
    scale.add_argument("--timeout", type=float, default=600.0, help="wait this long for them; 0: don't wait")
    scale.set_defaults(func=_reported(_scale))

    st = sub.add_parser("status", help="the cluster's nodes and each engine replica's load")
    st.add_argument("--address", default=None, help=ADDRESS_HELP)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--python", default="python", help="the cluster's Python, which runs the report job")
    st.set_defaults(func=_reported(_status))
