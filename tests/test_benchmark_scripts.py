"""The benchmark scripts still run: they are timed only on the GPU machine, where a broken script costs
device time. Tiny shapes on CPU; the numbers are not checked, the rows' shape is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_bench_tp_smoke(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    _run([str(BENCHMARKS / "bench_tp.py"), "--smoke", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    decode = [r for r in rows if r["bench"] == "tp-decode"]
    assert {(r["engine"], r["batch"]) for r in decode} == {
        ("fuserve-tp1", 1), ("fuserve-tp1", 2), ("fuserve-tp2-gloo", 1), ("fuserve-tp2-gloo", 2)
    }  # fmt: skip
    assert {r["plan_transport"] for r in decode if r["tp"] == 2} == {"shm"}
    assert {r["bench"] for r in rows} >= {"allreduce", "plan-broadcast"}


def test_bench_plan_transport(tmp_path: Path) -> None:
    _run([str(BENCHMARKS / "bench_plan_transport.py"), "--reps", "10", "--out", str(tmp_path)], tmp_path)
    (result,) = tmp_path.glob("plan-transport-*-cpu.json")
    rows = json.loads(result.read_text())["rows"]
    assert len(rows) == 12 and {r["transport"] for r in rows} == {"gloo", "shm"}
    assert all(r["delivered_us"] > 0 and r["send_us"] > 0 for r in rows)


def test_bench_sampler(tmp_path: Path) -> None:
    out = tmp_path / "sampler.json"
    args = ["--vocab", "512", "--batches", "1,4", "--reps", "2", "--out", str(out)]
    _run([str(BENCHMARKS / "bench_sampler.py"), *args], tmp_path)
    rows = json.loads(out.read_text())
    assert len(rows) == 12 and all(r["fuserve_ms"] > 0 and r["hf_style_ms"] > 0 for r in rows)
