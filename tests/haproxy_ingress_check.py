"""End to end behind Serve's real HAProxy: run by tests/test_ingress_routing.py in a process of its own.

Serve reads RAY_SERVE_ENABLE_HA_PROXY once, when `ray.serve` is first imported, and the Ray
processes inherit it from the process that starts the cluster, so this must be a fresh process
with the variables set before any import of Ray: `python haproxy_ingress_check.py TOKENIZER_DIR PORT`
with the environment `haproxy_env()` of the test. Two stand-in Engine replicas (FastAPI, no model)
answer with their own id and the replica the router pinned (the header HAProxy set from the
router's answer). Prints one JSON line of findings; the test judges them.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation.
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.config import RequestRouterConfig

from fuserve.cluster.ingress_routing import ROUTED_TO_HEADER, with_body_routing
from fuserve.configs import config_from_dict
from fuserve.router.length_aware_router import LengthAwareRouter
from fuserve.router.metrics import ROUTED_AT_HEADER
from fuserve.router.send_board import boards_base, sweep_stale_markers

api = FastAPI()


@serve.ingress(api)
class StandInEngine:
    """Says which replica answered, and which replica the ingress router told HAProxy to use; holds
    the request `hold_s` seconds if the body asks (so that requests overlap)."""

    def __init__(self) -> None:
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> dict[str, Any]:
        await asyncio.sleep(float((await request.json()).get("hold_s", 0.0)))
        return {
            "replica": self.replica,
            "routed_to": request.headers.get(ROUTED_TO_HEADER),
            "routed_at": request.headers.get(ROUTED_AT_HEADER),
        }

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"replica": self.replica}


def post(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}, timeout=10)
    return {"status": r.status_code, **(r.json() if r.status_code == 200 else {"text": r.text[:300]})}


def main(tokenizer_dir: str, port: int) -> dict[str, Any]:
    t0 = time.time()
    found: dict[str, Any] = {}
    config = config_from_dict(
        {"model": {"path": tokenizer_dir, "name": "tiny"}, "serve": {"ingress": "haproxy"}}
    )
    engine = serve.deployment(StandInEngine, name="Engine").options(
        num_replicas=2,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(request_router_class=LengthAwareRouter),
    )
    app = with_body_routing(engine.bind(), config)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="fuserve", route_prefix="/")
        found["started_s"] = round(time.time() - t0, 1)
        url = f"http://127.0.0.1:{port}"
        # HAProxy's config follows the replicas a moment later: until the router is in it, requests
        # are balanced without it (no routed_to header).
        deadline = time.time() + 20
        while True:
            first = post(url, "hello", 1)
            if first.get("routed_to") or time.time() > deadline:
                break
            time.sleep(0.25)
        found["first"] = first
        found["router_in_haproxy_s"] = round(time.time() - t0, 1)
        # One long request, then short ones: the router saw the bodies only if the short ones all
        # avoid the long one's replica (stats-only routing alternates them).
        found["big"] = post(url, "a long job " * 20, 30000)
        found["small"] = [post(url, f"short {i}", 1) for i in range(4)]
        found["health_status"] = httpx.get(f"{url}/health", timeout=10).status_code
        found["total_s"] = round(time.time() - t0, 1)
    finally:
        serve.shutdown()
        ray.shutdown()
        sweep_stale_markers(boards_base(), wait_s=2.0)  # the routers' send-board markers
    return found


if __name__ == "__main__":
    assert Path(sys.argv[1]).is_dir()
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))), flush=True)
