"""`fuserve deploy`, `status` and `scale` against a real two-node Ray cluster on this machine.

The cluster is what an operator runs: `ray start --head` (with the dashboard, whose Serve REST API
`fuserve deploy` uses) and a second `ray start --address` node with a resource of its own. Each node
offers one CPU and a replica takes one, so two replicas must sit on different nodes. A tiny real
checkpoint keeps a replica's start to seconds. One module-scoped cluster serves the tests in order:

1. `fuserve deploy` (the real command, in a process of its own) -> requests over HTTP succeed;
2. every metric the Grafana dashboard (k8s/grafana-dashboard.json) queries is in a live /metrics;
3. the config autoscales on outstanding tokens: load makes Serve ask for a second replica;
4. while two client threads keep sending requests: re-applying the config with 1 replica, then 2,
   then 1, changes the app in place; no request fails; `fuserve status` in between shows both
   nodes and a replica on each, with its report; `fuserve scale` asks Serve for a new count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from checkpoints import make_checkpoint
from ports import free_port
from ray_nodes import RayNodes

ROOT = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 512


@dataclass
class Deployed:
    nodes: RayNodes
    config: dict
    folder: Path
    url: str

    def fuserve(self, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
        """The `fuserve` command as a user runs it, pointed at this cluster's dashboard."""
        env = {**self.nodes.env, "RAY_DASHBOARD_ADDRESS": self.nodes.dashboard}
        out = subprocess.run(
            [sys.executable, "-m", "fuserve.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert out.returncode == 0, f"fuserve {' '.join(args)}: {out.stdout}\n{out.stderr}"
        return out

    def engine(self) -> dict:
        """The Engine deployment as the Serve REST API describes it."""
        details = httpx.get(f"{self.nodes.dashboard}/api/serve/applications/", timeout=10).json()
        return details["applications"]["fuserve"]["deployments"]["Engine"]

    def deploy(self, serve: dict) -> None:
        """`fuserve deploy` of the config with these `serve` settings."""
        self.config["serve"] = {**self.config["serve"], **serve}
        path = self.folder / "deploy.yaml"
        path.write_text(yaml.safe_dump(self.config))
        self.fuserve("deploy", str(path), "--proxy-location", "HeadOnly", "--timeout", "150")

    def apply(self, num_replicas: int) -> None:
        """Re-applies the config with `num_replicas`; returns once that many replicas are RUNNING."""
        self.deploy({"num_replicas": num_replicas, "autoscaling": None})
        self.wait_for(lambda e: sum(r["state"] == "RUNNING" for r in e["replicas"]) == num_replicas)

    def wait_for(self, done: Callable[[dict], bool], timeout_s: float = 150) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(engine := self.engine()):
            assert time.monotonic() < deadline, engine
            time.sleep(0.5)


@dataclass
class RequestStream:
    """Client threads sending short completions back to back; every failure is kept."""

    url: str
    max_tokens: int = 8
    done: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {"prompt": "hello", "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0}
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/completions", json=body)
                    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != self.max_tokens:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        self.done += 1
                except httpx.HTTPError as err:
                    self.failures.append(repr(err))


@contextmanager
def request_stream(url: str, clients: int = 2, max_tokens: int = 8) -> Iterator[RequestStream]:
    """`clients` threads send requests back to back until the block ends."""
    stream = RequestStream(url, max_tokens)
    threads = [threading.Thread(target=stream.run) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield stream
    finally:
        stream.stop.set()
        for t in threads:
            t.join(60)


AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    # Serve averages each replica's reports over 30 s: a lone request leaves the mean well under one
    # token (one replica), two clients' 32-token requests hold several (two replicas).
    "target_outstanding_tokens": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 0,
}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    folder = tmp_path_factory.mktemp("deploy")
    model = make_checkpoint(folder / "tiny", "llama3", max_position_embeddings=MAX_MODEL_LEN, vocab_size=260)
    port = free_port()
    config = {
        "model": {"path": str(model), "name": "tiny", "max_model_len": MAX_MODEL_LEN, "device": "cpu"},
        "cache": {"num_blocks": 128},
        "serve": {"host": "127.0.0.1", "port": port, "grpc_port": free_port(), "drain_timeout_s": 20},
    }
    nodes = RayNodes(
        env={
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            # replicas report autoscaling figures every second, not every 10 s: a test's patience
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
        }
    )
    try:
        nodes.start_head(num_cpus=1)
        nodes.add_node(num_cpus=1, resources={"fuserve_worker": 1})
        d = Deployed(nodes, config, folder, f"http://127.0.0.1:{port}")
        # Autoscaling from the start: Ray 2.60 starts a replica's report pusher only when the
        # replica starts with autoscaling on (token_autoscaling.py).
        d.deploy({"autoscaling": AUTOSCALING})
        d.wait_for(lambda e: [r["state"] for r in e["replicas"]] == ["RUNNING"])
        yield d
    finally:
        nodes.stop()


def test_deploy_serves_over_http(deployed: Deployed) -> None:
    r = httpx.post(
        f"{deployed.url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{deployed.url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"


def test_every_metric_the_grafana_dashboard_queries_is_served(deployed: Deployed) -> None:
    dashboard = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\bfuserve_[a-z0-9_]+", e)}
    assert len(queried) >= 15
    body = {"prompt": "metrics", "max_tokens": 4, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{deployed.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        r.read()  # streamed, so TTFT and ITL are observed
    text = httpx.get(f"{deployed.url}/metrics", timeout=10).text
    served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    assert queried <= served, sorted(queried - served)


def test_autoscaling_on_outstanding_tokens_reaches_the_running_app(deployed: Deployed) -> None:
    """The deployed config autoscales on outstanding tokens (AUTOSCALING): idle, one replica; under
    a stream of requests the replicas' reported tokens make Serve ask for a second. Two requests in
    flight are far below target_ongoing_requests (16), so only the token policy can ask for it."""
    policy = deployed.engine()["deployment_config"]["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "fuserve.cluster.token_autoscaling:OutstandingTokensPolicy"
    assert deployed.engine()["target_num_replicas"] == 1
    with request_stream(deployed.url, max_tokens=32) as stream:
        deployed.wait_for(lambda e: e["target_num_replicas"] == 2, timeout_s=60)
    assert not stream.failures, stream.failures[:5]


def test_replicas_1_2_1_by_reapplying_the_config_while_serving(deployed: Deployed) -> None:
    from fuserve.cluster.status import ClusterStatus, ReplicaStatus, format_status

    with request_stream(deployed.url) as stream:
        deployed.apply(1)  # autoscaling off, one replica
        served_with_one = stream.done
        deployed.apply(2)
        status = json.loads(deployed.fuserve("status", "--json").stdout)
        served_during_scale_up = stream.done
        deployed.apply(1)
        time.sleep(1.0)  # requests keep going to the one left
    assert not stream.failures, stream.failures[:5]
    assert 0 < served_with_one < served_during_scale_up < stream.done

    # `fuserve status` with two replicas: both nodes, one replica on each, each with its report.
    nodes = {n["node_id"]: n for n in status["nodes"] if n["alive"]}
    assert len(nodes) == 2
    assert sorted(n["is_head"] for n in nodes.values()) == [False, True]
    (worker,) = [n for n in nodes.values() if not n["is_head"]]
    assert worker["resources"]["fuserve_worker"] == 1
    running = [r for r in status["replicas"] if r["state"] == "RUNNING"]
    assert len(running) == 2 and {r["node_id"] for r in running} == set(nodes)
    for r in running:
        assert {"num_running", "num_waiting", "kv_cache_usage", "outstanding_tokens"} <= set(r["report"])
        assert r["gpus"] == 0
    text = format_status(
        ClusterStatus(**{**status, "replicas": [ReplicaStatus(**r) for r in status["replicas"]]})
    )
    assert all(node_id[:12] in text for node_id in nodes), text


def test_scale_sets_the_replica_count_of_the_deployed_app(deployed: Deployed) -> None:
    """`fuserve scale N` re-applies the deployed Serve config with N replicas (no wait: the count
    Serve now aims for is the check; the previous test saw replicas come and go)."""
    deployed.fuserve("scale", "2", "--timeout", "0")
    details = httpx.get(f"{deployed.nodes.dashboard}/api/serve/applications/", timeout=10).json()
    app = details["applications"]["fuserve"]
    assert app["deployments"]["Engine"]["target_num_replicas"] == 2
    assert app["deployed_app_config"]["args"]["config"]["model"]["name"] == "tiny"  # same app, same args
