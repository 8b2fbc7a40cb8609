"""`fuserve serve` in a process of its own, as a user starts it, for tests that need the whole command
(its signals, its Ray cluster, Serve's HAProxy, which Serve configures once per process)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


class Served:
    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        path = folder / "deploy.yaml"
        path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{config['serve']['port']}"
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="fs", dir="/tmp"))  # Ray's socket paths must stay short
        env = {**os.environ, "RAY_TMPDIR": str(self.ray_tmp), "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        # to a file, not a pipe: a pipe read only after exit fills at 64 KB of logs (Ray forwards every
        # replica's access log line to the driver), and the server then blocks writing, SIGTERM or not
        self.log_path = folder / "serve.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fuserve.cli", "serve", str(path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

    def check_running(self) -> None:
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        """What the server has written so far (its last 20,000 characters)."""
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM, as an operator stops it; SIGKILL to the whole session if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
