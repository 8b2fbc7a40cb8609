"""benchmarks/bench_spec_channel.py still runs end to end (tiny draft, CPU): its rows have the shape the
GPU run will record. The numbers are not checked here (a shared CI box), only that they were measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_spec_channel.py"


def test_bench_spec_channel_smoke(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--rounds", "5", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    channel = [r for r in rows if r["bench"] == "spec_channel"]
    assert {(r["transport"], r["spin_ms"], r["client_spin"], r["gap_ms"], r["batch"]) for r in channel} == {
        (t, spin, client, gap, b)
        for t in ("unix", "ipc", "tcp")
        for spin, client in ((0.0, False), (50.0, False), (50.0, True))
        for gap in (0.0, 5.0)
        for b in (1, 8, 32, 64)
    }
    draft = [r for r in rows if r["bench"] == "spec_draft_round"]
    assert {(r["placement"], r["batch"]) for r in draft} == {("cpu", 1), ("cpu", 8)}
    assert all(r["ms_p50"] > 0 and r["device"] and r["commit"] and r["date"] for r in rows)
