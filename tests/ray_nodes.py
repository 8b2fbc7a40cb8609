"""A real multi-node Ray cluster on one machine, as an operator starts one: `ray start --head` and
`ray start --address` for each further node, every port chosen free, in a temp dir of its own.

The machine may be shared (other Ray clusters, other test runs), so nothing here touches what it did
not start: no `ray stop` (it stops every cluster of the user). The cluster's processes are known by
their temp dir, which every Ray process of ours names on its command line; `stop` ends them and
their children (an engine core is a replica's child) by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from ports import free_port

# This interpreter's `ray` (a venv's bin), else the one on PATH (a `pip install --target` with its bin/)
RAY = next(
    (str(p) for p in [Path(sys.executable).with_name("ray")] if p.exists()), shutil.which("ray") or "ray"
)


class RayNodes:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fsn", dir="/tmp"))  # socket paths must stay short
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": str(self.temp_dir),
            # the job `fuserve status` submits runs `python`: this interpreter
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        """Every fixed-by-default port, free now (workers take theirs from Ray's default range,
        below the ephemeral ports these come from)."""
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]

    def _start(self, args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, "start", "--disable-usage-stats", *self._ports(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        """On a shared machine a port found free can be taken before Ray binds it: one more try,
        on other ports, after ending what the first one started."""
        for attempt in (1, 2):
            out = self._start_head(num_cpus, resources)
            if out.returncode == 0:
                return
            print(f"ray start --head, try {attempt}, failed:\n{out.stdout}\n{out.stderr}", file=sys.stderr)
            self.stop(remove_temp_dir=attempt == 2)
            self.gcs_port, self.dashboard_port = free_port(), free_port()
        raise RuntimeError(f"ray start --head failed:\n{out.stdout}\n{out.stderr}")

    def _start_head(self, num_cpus: int, resources: dict[str, float] | None) -> subprocess.CompletedProcess:
        return self._start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps(resources or {})}",
            ]
        )

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None, num_gpus: int = 0) -> None:
        out = self._start(
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}",
                f"--num-gpus={num_gpus}",
                f"--resources={json.dumps(resources or {})}",
            ]
        )
        if out.returncode != 0:
            raise RuntimeError(f"ray start --address failed:\n{out.stdout}\n{out.stderr}")

    def processes(self) -> list[psutil.Process]:
        """Ours: every process naming our temp dir, and their descendants."""
        marker = str(self.temp_dir)
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in a for a in p.info["cmdline"] or []):
                    found[p.pid] = p
                    found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self, timeout_s: float = 3.0, remove_temp_dir: bool = True) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)  # Ray ends in ~1 s; an engine core may not
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        time.sleep(0.2)
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
