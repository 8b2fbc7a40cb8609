"""`fuserve status`: the cluster's nodes and each Engine replica: its node, GPUs, running and waiting
sequences, KV-cache use, and what it reports to the router.

Two sources, both through the dashboard address only (as `fuserve deploy`, token auth included):
the Serve REST API says which replicas exist, their state and node; a short Ray job
(`fuserve.cluster.replica_stats`) asks each replica for its report and lists the nodes' resources.
"""

from __future__ import annotations

import inspect
import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from fuserve.cluster.deploy import DeployError, dashboard_address, serve_client
from fuserve.cluster.replica_stats import REPORT_MARKER
from fuserve.cluster.serve_config import APP_NAME, ENGINE_DEPLOYMENT

JOB_TIMEOUT_S = 60.0


@dataclass
class ReplicaStatus:
    replica_id: str
    state: str
    node_id: str
    node_ip: str
    gpus: float
    report: dict[str, Any] = field(default_factory=dict)  # record_routing_stats, or {"error": ...}


@dataclass
class ClusterStatus:
    app_status: str
    app_message: str
    target_replicas: int | None
    nodes: list[dict[str, Any]]
    replicas: list[ReplicaStatus]


def replica_gpus(deployment_config: dict[str, Any]) -> float:
    """GPUs one replica holds: its actor's, or its placement group's bundles' (tensor parallel)."""
    bundles = deployment_config.get("placement_group_bundles") or []
    if bundles:
        return float(sum(b.get("GPU", 0) for b in bundles))
    return float((deployment_config.get("ray_actor_options") or {}).get("num_gpus") or 0)


def gather(address: str | None, python: str = "python") -> ClusterStatus:
    client = serve_client(address)
    app = client.get_serve_details().get("applications", {}).get(APP_NAME)
    if not app:
        raise DeployError(f"no application '{APP_NAME}' on this cluster; run `fuserve deploy CONFIG` first")
    engine = app.get("deployments", {}).get(ENGINE_DEPLOYMENT, {})
    gpus = replica_gpus(engine.get("deployment_config") or {})
    replicas = [
        ReplicaStatus(r["replica_id"], r["state"], r.get("node_id") or "", r.get("node_ip") or "", gpus)
        for r in engine.get("replicas", [])
    ]
    names = {r["replica_id"]: r["actor_name"] for r in engine.get("replicas", []) if r.get("actor_name")}
    inside = run_report_job(address, list(names.values()), python)
    for r in replicas:
        r.report = inside["replicas"].get(names.get(r.replica_id, ""), {"error": "no actor"})
    return ClusterStatus(
        app.get("status", ""),
        app.get("message", ""),
        engine.get("target_num_replicas"),
        inside["nodes"],
        replicas,
    )


def run_report_job(address: str | None, actor_names: list[str], python: str) -> dict[str, Any]:
    """Runs replica_stats.py's source with `python -c`: the job then imports neither fuserve nor torch
    (seconds on a busy head) and needs only Ray on the cluster's Python."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from fuserve.cluster import replica_stats

    client = JobSubmissionClient(dashboard_address(address))
    entrypoint = shlex.join([python, "-c", inspect.getsource(replica_stats), *actor_names])
    job = client.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise DeployError(f"the status job {job} did not finish in {JOB_TIMEOUT_S:.0f} s")
        time.sleep(0.25)
    logs = client.get_job_logs(job)
    for line in logs.splitlines():
        if line.startswith(REPORT_MARKER):
            return json.loads(line[len(REPORT_MARKER) :])
    raise DeployError(
        f"the status job {job} ended {status} without a report (is `{python}` the Python with Ray on "
        f"the cluster? pass --python); its log ends:\n{logs[-2000:]}"
    )


def _resources(res: dict[str, float]) -> str:
    return " ".join(f"{k} {v:g}" for k, v in sorted(res.items()))


def format_status(st: ClusterStatus) -> str:
    lines = ["Nodes:"]
    for n in sorted(st.nodes, key=lambda n: (not n["is_head"], n["node_id"])):
        role = "head" if n["is_head"] else "worker"
        alive = "" if n["alive"] else "  (dead)"
        lines.append(f"  {n['node_id'][:12]}  {n['ip']:<15} {role:<6}  {_resources(n['resources'])}{alive}")
    target = "" if st.target_replicas is None else f", {st.target_replicas} replica(s) wanted"
    lines.append(
        f"Application {APP_NAME}: {st.app_status}{target}{' - ' + st.app_message if st.app_message else ''}"
    )
    header = ("REPLICA", "STATE", "NODE", "GPUS", "RUNNING", "WAITING", "KV USE", "ROUTER'S VIEW")
    rows = [header]
    for r in st.replicas:
        rep = r.report
        if "error" in rep:
            figures = ("-", "-", "-", f"no report: {rep['error']}")
        else:
            view = (
                f"{rep.get('outstanding_tokens', 0)} tokens outstanding, {rep.get('num_admitted', 0)} "
                f"admitted, {len(rep.get('prefix_keys', []))} prefixes"
            )
            figures = (
                str(rep.get("num_running", 0)),
                str(rep.get("num_waiting", 0)),
                f"{100 * float(rep.get('kv_cache_usage', 0.0)):.1f}%",
                view,
            )
        rows.append((r.replica_id[-12:], r.state, r.node_id[:12], f"{r.gpus:g}", *figures))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        lines.append(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        )
    return "\n".join(lines)


def as_json(st: ClusterStatus) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(st), indent=1)
