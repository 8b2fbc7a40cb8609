"""The kernels that only run on GPUs in production compile for Hopper (tests/hopper_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_tensor_parallel_and_sampling_kernels_compile_for_sm90() -> None:
    script = Path(__file__).with_name("hopper_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 29, done.stdout  # one line per kernel variant in the script
