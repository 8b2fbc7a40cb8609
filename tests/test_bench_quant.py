"""benchmarks/bench_quant.py still runs end to end (tiny shapes on CPU; the numbers are not checked,
the rows' shape is): a broken script would cost GPU time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_quant.py"


def test_bench_quant_smoke(tmp_path: Path) -> None:
    out = tmp_path / "quant.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--int8-head", "int8-wo", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    decode = {
        (r["quantization"], r["kv_cache_dtype"], r["batch"]): r for r in rows if r["bench"] == "quant-decode"
    }
    kernels = {
        (r["quantization"], r["batch"], r["activations"]) for r in rows if r["bench"] == "quant-kernel"
    }
    schemes = ("none", "int8-wo", "fp8-wo", "fp8")
    # fp8 W8A8 at 16 rows: with the input quantized by its producer (fused) and by the layer itself
    w8a8 = {("fp8", 16, "fused"), ("fp8", 16, "unfused")}
    assert kernels == {(s, b, None) for s in schemes for b in (1, 2, 16)} - {("fp8", 16, None)} | w8a8
    runs = [(s, "auto") for s in schemes] + [("int8-wo+head", "auto"), ("none", "fp8"), ("fp8", "fp8")]
    assert set(decode) == {(s, kv, b) for s, kv in runs for b in (1, 2)}
    assert decode[("none", "auto", 1)]["ms_ratio_vs_bf16"] == 1.0
    # 8-bit weights: the decoder layers' bytes shrink (fp32 -> 1 byte in the smoke run)
    assert decode[("int8-wo", "auto", 1)]["step_gb"] < decode[("none", "auto", 1)]["step_gb"]
    # the same KV memory holds 4x the tokens in fp8 as in fp32 (the CPU smoke run's dtype)
    assert decode[("none", "fp8", 1)]["kv_tokens_ratio"] >= 3.9
    long = [r for r in rows if r["bench"] == "quant-long-context"]
    assert [r["kv_cache_dtype"] for r in long] == ["auto", "fp8"] and long[0]["prompt_len"] == 48
    assert all(r["device"] == "cpu" and r["model"] == "tiny" and r["commit"] for r in rows)
