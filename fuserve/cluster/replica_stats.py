"""Inside the cluster, for `fuserve status`: each node's resources and each Engine replica's own report.

    python -c "<this file>" ACTOR_NAME...

runs as a Ray job (submitted through the dashboard, so the client needs no Ray connection of its
own; the source travels in the entry point, so the job imports nothing of fuserve) and prints one
line, `REPORT_MARKER` + JSON. A replica's report is what its `record_routing_stats` returns: the
figures Serve's controller polls and broadcasts to every router (running and waiting sequences,
KV-cache use, outstanding tokens, admitted requests, the prefixes it holds), i.e. the router's view
of that replica.
"""

from __future__ import annotations

import json
import sys
from typing import Any

REPORT_MARKER = "FUSERVE_STATUS_REPORT "
SERVE_NAMESPACE = "serve"
CALL_TIMEOUT_S = 10.0


def nodes() -> list[dict[str, Any]]:
    import ray

    return [
        {
            "node_id": n["NodeID"],
            "ip": n["NodeManagerAddress"],
            "alive": bool(n["Alive"]),
            "is_head": "node:__internal_head__" in n.get("Resources", {}),
            "resources": {
                k: v
                for k, v in n.get("Resources", {}).items()
                if not k.startswith("node:") and "memory" not in k
            },
        }
        for n in ray.nodes()
    ]


def replica_reports(actor_names: list[str]) -> dict[str, dict[str, Any]]:
    """Actor name -> its report, or {"error": ...} for a replica that did not answer."""
    import ray

    refs = {}
    reports: dict[str, dict[str, Any]] = {}
    for name in actor_names:
        try:
            refs[name] = ray.get_actor(name, namespace=SERVE_NAMESPACE).record_routing_stats.remote()
        except ValueError as err:  # gone since the client listed it
            reports[name] = {"error": str(err)}
    for name, ref in refs.items():
        try:
            reports[name] = ray.get(ref, timeout=CALL_TIMEOUT_S)
        except Exception as err:  # a replica starting, draining or dead: say so, report the others
            reports[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
    return reports


def main(argv: list[str]) -> int:
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    report = {"nodes": nodes(), "replicas": replica_reports(argv)}
    print(REPORT_MARKER + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
