"""`fuserve deploy`, `scale` and `status` on a real Ray cluster with GPUs, timed: issue 21's GPU check.

The layout KubeRay gives (k8s/rayservice.yaml): a head with no engine (`num-cpus 0`-like: it gets 2
CPUs for Serve's controller, proxy and the status job, no GPU) and a worker node holding the GPUs,
both started with `ray start` and, for `--ingress haproxy`, fuserve.configs.HAPROXY_ENV in their
environment. Then, with two clients sending requests back to back the whole time:

    fuserve deploy CONFIG (1 replica)  -> time until RUNNING and the first answer
    fuserve scale 2                    -> time until 2 replicas RUN (a second GPU's model load)
    fuserve status                     -> both replicas, 1 GPU each, their load
    fuserve scale 1                    -> time until 1 replica runs
    every request answered 200 (none lost to the scaling)

One JSON row (bench "deploy") to OUT/deploy-<date>.json. On a CPU, `--tiny` runs the same steps
with a 2-layer random model and Serve's Python proxy (CI-sized; no GPU, no HAProxy's fixed ports).

    python benchmarks/bench_deploy.py --out $OUT                 # GPU: llama3-8b-dummy, HAProxy
    python benchmarks/bench_deploy.py --tiny --out /tmp/deploy   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's real multi-node cluster on one machine

from bench_decode import commit  # noqa: E402
from ports import free_port  # noqa: E402
from ray_nodes import RayNodes  # noqa: E402

from fuserve.configs import HAPROXY_ENV  # noqa: E402

TINY_MODEL = {
    "load_format": "dummy",
    "name": "tiny-dummy",
    "device": "cpu",
    "max_model_len": 512,
    "hf_config": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}


class Clients:
    """Threads sending completions (token-id prompts: dummy models have no tokenizer) back to back."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.ok, self.failures = 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        body = {"prompt": list(range(1, 65)), "max_tokens": self.max_tokens, "ignore_eos": True}
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/completions", json=body)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as err:
                    self.failures.append(repr(err))

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def fuserve(nodes: RayNodes, *args: str, timeout_s: float = 900) -> tuple[float, str]:
    t0 = time.perf_counter()
    env = {**nodes.env, "RAY_DASHBOARD_ADDRESS": nodes.dashboard}
    out = subprocess.run(
        [sys.executable, "-m", "fuserve.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(f"fuserve {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return time.perf_counter() - t0, out.stdout


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return "cpu"


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = yaml.safe_load(Path(args.config).read_text()) if not args.tiny else {"model": TINY_MODEL}
    port = free_port()
    config["serve"] = {
        **config.get("serve", {}),
        "host": "127.0.0.1",
        "port": port,
        "grpc_port": free_port(),
        "num_replicas": 1,
        "ingress": args.ingress,
    }
    config["serve"].pop("autoscaling", None)  # a fixed count, scaled by `fuserve scale`
    folder = Path(args.work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.ingress == "haproxy":
        env.update(HAPROXY_ENV)
    gpus = 0 if args.tiny else args.gpus
    nodes = RayNodes(env=env)
    row: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        nodes.start_head(num_cpus=2)
        nodes.add_node(num_cpus=args.worker_cpus, num_gpus=gpus, resources={"engine_node": 1})
        row["cluster_start_s"] = time.perf_counter() - t0
        row["deploy_s"], _ = fuserve(nodes, "deploy", str(path), "--proxy-location", "HeadOnly")
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=300)
        assert r.status_code == 200, r.text
        row["first_answer_s"] = time.perf_counter() - t0
        with Clients(url, args.clients, args.max_tokens) as clients:
            time.sleep(2)
            row["scale_up_s"], _ = fuserve(nodes, "scale", "2")
            _, status = fuserve(nodes, "status", "--json", "--python", sys.executable)
            row["status_text"] = fuserve(nodes, "status", "--python", sys.executable)[1]
            row["scale_down_s"], _ = fuserve(nodes, "scale", "1")
            time.sleep(2)
        report = json.loads(status)
        running = [r for r in report["replicas"] if r["state"] == "RUNNING"]
        row.update(
            replicas_seen=len(running),
            replica_gpus=[r["gpus"] for r in running],
            replica_nodes=len({r["node_id"] for r in running}),
            requests_ok=clients.ok,
            requests_failed=len(clients.failures),
            failures=clients.failures[:5],
        )
    finally:
        nodes.stop(timeout_s=10)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "llama3-8b-dummy.yaml"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a 2-layer random model")
    ap.add_argument("--ingress", choices=["haproxy", "python"], default=None)
    ap.add_argument("--gpus", type=int, default=2, help="GPUs of the worker node (2 replicas need 2)")
    ap.add_argument("--worker-cpus", type=int, default=12)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--work-dir", default="/tmp/fuserve-bench-deploy")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    args = ap.parse_args(argv)
    args.ingress = args.ingress or ("python" if args.tiny else "haproxy")
    if args.tiny:
        args.worker_cpus, args.max_tokens = 2, 8
    today = dt.date.today().isoformat()
    row = dict(
        bench="deploy",
        engine="fuserve",
        model="tiny-dummy" if args.tiny else Path(args.config).stem,
        device=device_name(),
        date=today,
        commit=commit(),
        ingress=args.ingress,
        **run(args),
    )
    print(row.pop("status_text"))
    print(json.dumps(row, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"deploy-{today}.json").write_text(json.dumps([row], indent=1) + "\n")
    ok = row["requests_failed"] == 0 and row["replicas_seen"] == 2 and row["replica_nodes"] >= 1
    print(f"{'PASS' if ok else 'FAIL'}: wrote {out / f'deploy-{today}.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
