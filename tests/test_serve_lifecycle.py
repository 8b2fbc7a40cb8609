"""The replica's two processes over their lifetime: a dying engine core, and a drained shutdown.

- The engine-core process killed (SIGKILL) mid-stream: the client's stream ends with an error event
  within seconds (503, no PID or exit code in it), /metrics says the engine is down, Serve replaces
  the replica, the next request succeeds, no engine process is left.
- SIGTERM to `fuserve serve` with streams in flight: they finish within the drain period, the
  command exits soon after, and neither its Ray processes nor its engine core outlive it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest
from checkpoints import make_checkpoint
from ports import free_port
from served import Served

if TYPE_CHECKING:
    from conftest import ServeCluster

MAX_MODEL_LEN = 1024


def _tiny_model(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "tiny", "llama3", max_position_embeddings=MAX_MODEL_LEN, vocab_size=260)


def _stream(url: str, max_tokens: int, first_token: threading.Event, out: dict) -> None:
    """One streaming completion; records its events, how it ended and when."""
    body = {"prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    events: list[str] = []
    try:
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: ") :])
                        first_token.set()
    except httpx.HTTPError as err:
        out["transport_error"] = repr(err)
    out["events"] = events
    out["ended_at"] = time.monotonic()
    first_token.set()


def _finish_reasons(events: list[str]) -> list[str]:
    reasons = []
    for e in events:
        choices = json.loads(e).get("choices", []) if e != "[DONE]" else []
        reasons += [c["finish_reason"] for c in choices if c.get("finish_reason")]
    return reasons


def test_killed_engine_core_ends_streams_and_the_replica_is_replaced(
    serve_cluster: ServeCluster, tmp_path: Path
) -> None:
    from ray import serve

    from fuserve.cluster import build_app
    from fuserve.configs import config_from_dict

    config = config_from_dict(
        {
            "model": {"path": str(_tiny_model(tmp_path)), "name": "tiny", "max_model_len": MAX_MODEL_LEN},
            "cache": {"num_blocks": 256},
        }
    )
    serve.run(build_app(config), name="mortal", route_prefix="/mortal")
    url = f"{serve_cluster.url}/mortal"
    try:
        health = httpx.get(f"{url}/health", timeout=30).json()
        pid, dead_replica = health["engine_core_pid"], health["replica"]
        started, result = threading.Event(), {}
        streamer = threading.Thread(target=_stream, args=(url, 900, started, result))
        streamer.start()
        assert started.wait(60), "no token arrived"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        streamer.join(30)
        assert not streamer.is_alive()
        assert result["ended_at"] - killed_at < 5.0, result["ended_at"] - killed_at
        errors = [json.loads(e)["error"] for e in result["events"] if e != "[DONE]" and "error" in e]
        assert errors and errors[0]["type"] == "service_unavailable", result["events"][-3:]
        assert not re.search(rf"\b{pid}\b|pid|exit", errors[0]["message"]), errors[0]
        assert "length" not in _finish_reasons(result["events"]), "the stream claims it finished"
        # a request the dead replica still gets: 503 and a request id, no PID or exit code
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "now?", "max_tokens": 2}, timeout=30)
        if r.status_code != 200:  # unless Serve has already replaced it
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
            message = r.json()["error"]["message"]
            assert not re.search(rf"\b{pid}\b|pid|exit", message) and r.headers["x-request-id"] in message
        # until Serve replaces it, the lone replica's /metrics says its engine is down and runs nothing
        text = httpx.get(f"{url}/metrics", timeout=10).text
        if f'replica="{dead_replica}"' in text:
            assert f'fuserve_engine_healthy{{replica="{dead_replica}"}} 0.0' in text
            assert f'fuserve_engine_num_requests_running{{replica="{dead_replica}"}} 0.0' in text

        deadline, answer = time.monotonic() + 90, None
        while time.monotonic() < deadline:  # Serve's health check notices, then starts a new replica
            try:
                r = httpx.post(f"{url}/v1/completions", json={"prompt": "again", "max_tokens": 3}, timeout=30)
                if r.status_code == 200:
                    answer = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert answer is not None, "the replica was not replaced"
        assert answer["usage"]["completion_tokens"] >= 1
        new_pid = httpx.get(f"{url}/health", timeout=30).json()["engine_core_pid"]
        assert new_pid != pid
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        serve.delete("mortal")


@pytest.mark.slow
def test_sigterm_drains_streams_and_leaves_no_process(tmp_path: Path) -> None:
    drain_s = 20
    http_port, grpc_port = free_port(), free_port()
    config = {
        "model": {"path": str(_tiny_model(tmp_path)), "name": "tiny", "max_model_len": MAX_MODEL_LEN},
        "cache": {"num_blocks": 256},
        "serve": {"port": http_port, "grpc_port": grpc_port, "drain_timeout_s": drain_s},
    }
    server = Served(config, tmp_path)
    proc, url = server.proc, server.url
    try:
        deadline, core_pid = time.monotonic() + 120, None
        while time.monotonic() < deadline and core_pid is None:
            server.check_running()
            try:
                core_pid = httpx.get(f"{url}/health", timeout=5).json().get("engine_core_pid")
            except (httpx.HTTPError, ValueError):
                time.sleep(1)
        assert core_pid is not None, "the server did not come up"
        family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {core_pid}

        results = [{} for _ in range(3)]
        firsts = [threading.Event() for _ in range(3)]
        streams = [threading.Thread(target=_stream, args=(url, 120, firsts[i], results[i])) for i in range(3)]
        for t in streams:
            t.start()
        assert all(f.wait(60) for f in firsts), "streams did not start"
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=drain_s + 30)
        exit_s = time.monotonic() - sent_at
        for t in streams:
            t.join(10)
        for r in results:
            assert r["events"] and r["events"][-1] == "[DONE]", r["events"][-2:]
            assert _finish_reasons(r["events"]) == ["length"], r["events"][-2:]
        assert code == 0, server.output()
        assert exit_s < drain_s + 10, exit_s
        time.sleep(1)
        alive = [p for p in family if psutil.pid_exists(p)]
        left = [p for p in alive if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not left, [psutil.Process(p).cmdline()[:3] for p in left]
    finally:
        server.stop(timeout_s=0)
