"""One replica with two frontend processes behind Serve's HAProxy (`serve.frontend_processes: 2`): they
share the replica's port and its engine core, and once they are up the replica's own process accepts no
new connection.

- Concurrent streams are served by the spawned processes (the replica's own closes the connections it
  had before they were ready after their next response), and each stream gets exactly the tokens it
  would get alone (greedy: all equal); the engine core sends each process only its own streams (two
  processes on one core: test_engine_core.py). How HAProxy's connections spread over the processes is
  a matter of load, measured on the GPU machine, not asserted here.
- A further frontend process killed: its requests are aborted in the core (blocks freed), the
  replica reports itself unhealthy, and Serve replaces it; requests succeed again.
- `fuserve serve` stopped: no frontend process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from checkpoints import make_checkpoint
from haproxy_processes import haproxy_left_after
from ports import free_port
from served import Served

TIMEOUT = httpx.Timeout(60.0)
NUM_FRONTENDS = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, set[int]]]:
    running = haproxy_left_after(0)
    assert not running, f"an HAProxy from another run holds its ports: {running}"
    tmp = tmp_path_factory.mktemp("frontends")
    folder = make_checkpoint(tmp / "tiny", "llama3", max_position_embeddings=512, vocab_size=260)
    config = {
        "model": {"path": str(folder), "name": "tiny", "max_model_len": 512},
        "cache": {"num_blocks": 256},
        "serve": {
            "port": free_port(),
            "grpc_port": free_port(),
            "ingress": "haproxy",
            "frontend_processes": NUM_FRONTENDS,
            "drain_timeout_s": 5,
        },
    }
    server = Served(config, tmp)
    pids: set[int] = set()  # every frontend process seen, checked gone at the end
    try:
        deadline, spawned = time.monotonic() + 150, set()
        while time.monotonic() < deadline and not spawned:
            server.check_running()
            pids |= asyncio.run(health_pids(server.url, 8))
            spawned = {p for p in pids if p != replica_pid(server.url)}
            time.sleep(0.3)
        assert spawned, f"only the replica's own process answered: {pids}"
        yield server.url, pids
    finally:
        server.stop()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.5)
        left = [p for p in pids if alive(p)]
        assert not left, f"frontend processes outlived `fuserve serve`: {left}"


def replica_pid(url: str) -> int:
    """The replica's own process: the one that spawned the engine core."""
    core_pid = httpx.get(f"{url}/health", timeout=10).json()["engine_core_pid"]
    return psutil.Process(core_pid).ppid()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def health_pids(url: str, n: int) -> set[int]:
    """The frontend processes that answered `n` concurrent /health calls (each on its own connection)."""

    async def one() -> int | None:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                r = await client.get("/health")
            return r.json()["frontend_pid"] if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    return {p for p in await asyncio.gather(*(one() for _ in range(n))) if p is not None}


async def stream(client: httpx.AsyncClient, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def test_concurrent_streams_spread_over_processes_and_keep_their_tokens(served: tuple[str, set[int]]) -> None:
    url, pids = served

    async def main() -> list[str]:
        clients = [httpx.AsyncClient(base_url=url, timeout=TIMEOUT) for _ in range(12)]
        try:  # 12 connections, 2 streams each at once
            return await asyncio.gather(*(stream(c, "hello there") for c in clients for _ in range(2)))
        finally:
            for c in clients:
                await c.aclose()

    texts = asyncio.run(main())
    assert len(set(texts)) == 1 and texts[0], texts
    answering = asyncio.run(health_pids(url, 16))
    pids |= answering
    spawned = answering - {replica_pid(url)}
    assert spawned, answering
    # the replica's tokenizer came with the process: it never loaded the model's files, nor torch
    torch_in = [p for p in spawned if "libtorch" in Path(f"/proc/{p}/maps").read_text()]
    assert not torch_in, f"frontend processes {torch_in} imported torch"

    async def scrapes() -> list[float]:  # each on its own connection: any process may answer
        async def one() -> float:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                text = (await client.get("/metrics")).text
            return sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith('fuserve_requests_total{endpoint="completions"') and 'status="200"' in line
            )

        return list(await asyncio.gather(*(one() for _ in range(8))))

    # every process's requests in every answer, whichever process served the 24 streams
    counts = set(asyncio.run(scrapes()))
    assert len(counts) == 1 and counts.pop() >= 24, counts
    # and each process's own share under its `process` label: how HAProxy's connections fell on them
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    per_process = {
        line.split('process="')[1].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("fuserve_frontend_process_requests_total{")
    }
    assert len(per_process) >= 2 and sum(per_process.values()) >= 24, per_process


def test_the_engine_core_counts_every_processes_requests(served: tuple[str, set[int]]) -> None:
    """Serve counts none of the requests the spawned processes take, so autoscaling on requests reads
    the engine core's count (EngineRequestsPolicy), which /metrics shows from whichever process answers."""
    url, _ = served
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 480, "ignore_eos": True, "stream": True}

    async def main() -> list[float]:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=TIMEOUT))
                for _ in range(6)
            ]
            readers = []  # kept: a reader left to the collector closes its stream, which aborts it
            for client in clients:  # six streams open at once, each past its first token
                r = await stack.enter_async_context(client.stream("POST", "/v1/completions", json=body))
                assert r.status_code == 200, await r.aread()
                readers.append(r.aiter_lines())
                async for line in readers[-1]:
                    if line.startswith("data: {"):
                        break
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as probe:
                text = (await probe.get("/metrics")).text
            return [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("fuserve_engine_requests{")
            ]

    assert asyncio.run(main()) == [6.0]


def test_a_killed_frontend_process_gets_the_replica_replaced(served: tuple[str, set[int]]) -> None:
    url, pids = served
    first = httpx.get(f"{url}/health", timeout=10).json()
    core_pid = first["engine_core_pid"]
    own = replica_pid(url)
    others = [p for p in asyncio.run(health_pids(url, 16)) if p != own]
    assert others, "no further frontend process answered"
    os.kill(others[0], signal.SIGKILL)
    deadline, replaced = time.monotonic() + 90, False
    while time.monotonic() < deadline and not replaced:  # Serve's health check, then a new replica
        time.sleep(1)
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            replaced = r.status_code == 200 and r.json()["engine_core_pid"] != core_pid
        except (httpx.HTTPError, ValueError):
            pass
    assert replaced, "the replica was not replaced after one of its frontend processes died"
    # the old engine core exits when its next poll finds its replica gone, which under load can come
    # after Serve's new replica answers (a CI run on 2026-11-29 saw it alive at that instant)
    deadline = time.monotonic() + 30
    while alive(core_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(core_pid), "the dead replica's engine core outlived it"

    async def after() -> str:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            return await stream(client, "hello there")

    assert asyncio.run(after())
    pids |= asyncio.run(health_pids(url, 16))


def test_frontend_cpu_counts_the_replicas_children_but_the_engine_core() -> None:
    """/metrics' frontend CPU with several processes: the replica's own and its children's, whichever
    process answers, without the engine core's. Measured in a process of its own, whose only children
    are the two made here (this test process has others: the served app of this module)."""
    import subprocess
    import sys

    script = """
import os, subprocess, sys, time
import psutil
from fuserve.router.frontend_processes import frontend_cpu_seconds
burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass\\ntime.sleep(30)"
frontend, core = (subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2))
def cpu(pid):
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system
deadline = time.monotonic() + 30
while time.monotonic() < deadline and (cpu(frontend.pid) < 0.4 or cpu(core.pid) < 0.4):
    time.sleep(0.1)
mine = cpu(os.getpid())
total = frontend_cpu_seconds(os.getpid(), core.pid)
print(mine, total, cpu(frontend.pid))
for p in (frontend, core):
    p.kill()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mine, total, frontend = map(float, out.stdout.split())
    assert mine + 0.35 <= total <= mine + frontend + 0.2, (mine, total, frontend)


def test_the_replicas_own_responses_close_their_connection_once_handed_over() -> None:
    """Once the spawned processes take new connections, the replica's own process answers with
    `Connection: close` (replacing any connection header), so HAProxy reopens the connection to a
    spawned process; before that, and in every spawned process, responses are untouched."""
    import asyncio

    from fuserve.router.frontend_processes import HANDED_OVER, CloseWhenHandedOver

    async def app(scope: dict, receive: object, send: object) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"Connection", b"keep-alive")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    def headers_sent() -> list[list[tuple[bytes, bytes]]]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(CloseWhenHandedOver(app)({"type": "http"}, None, send))
        assert sent[1]["body"] == b"ok"
        return sent[0]["headers"]

    HANDED_OVER.clear()
    try:
        assert headers_sent() == [(b"Connection", b"keep-alive")]
        HANDED_OVER.set()
        assert headers_sent() == [(b"connection", b"close")]
    finally:
        HANDED_OVER.clear()
