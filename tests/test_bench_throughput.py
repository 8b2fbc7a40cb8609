"""benchmarks/bench_throughput.py end to end on the CPU (tiny model), through `fuserve bench throughput`
as a user runs it: every scheme and shape gets a row, the batch limit comes from the KV pool, whole runs
count every token, and a run cut by its time budget stops counting there and still ends cleanly. The
rates themselves are not checked (a shared CPU); their arithmetic is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fuserve import cli


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny matrices: on a busy 2-core box torch's thread pool costs 5-10x more than the math."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path: Path, name: str, *args: str) -> list[dict]:
    out = tmp_path / f"{name}.json"
    assert cli.main(["bench", "throughput", "--smoke", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_whole_runs_every_scheme_and_shape(tmp_path: Path) -> None:
    rows = _run(tmp_path, "whole", "--schemes", "none,fp8,int8-wo", "--shapes", "8/8,24/24")
    assert [(r["quantization"], r["input_len"], r["output_len"]) for r in rows] == [
        (s, i, i) for s in ("none", "fp8", "int8-wo") for i in (8, 24)
    ]
    for r in rows:
        # 24 blocks of 16 tokens: 8/8 takes 1 block a sequence (capped by max_num_seqs 16), 24/24 takes 3
        assert r["kv_tokens"] == 384
        assert r["batch_limit"] == (16 if r["input_len"] == 8 else 8)
        assert r["num_requests"] == 3 * r["batch_limit"] == r["completed_requests"] == r["started_requests"]
        assert not r["cut_by_budget"] and r["num_preemptions"] == 0
        assert r["output_tokens"] == r["num_requests"] * r["output_len"]
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
        assert r["total_tok_s"] == pytest.approx(2 * r["output_tok_s"])  # input = output length
        assert r["request_per_s"] == pytest.approx(r["num_requests"] / r["elapsed_s"])
        assert 0 < r["mean_running"] <= r["batch_limit"] and 0 < r["mean_batch"] <= r["batch_limit"]
        assert r["trtllm_fp8_output_tok_s"] is None and r["ratio_vs_trtllm_fp8"] is None
        assert r["device"] == "cpu" and r["model"] == "tiny" and r["commit"] and r["date"]
        assert 0 <= r["device_wait_s"] <= r["elapsed_s"] and r["host_cpu_s"] > 0
        assert r["host_python_ms"] > 0 and r["host_cpu"]


def test_a_run_cut_by_its_budget(tmp_path: Path) -> None:
    """Budget 0: one step is counted, the rest are aborted; the row sits beside TensorRT-LLM's figure."""
    (r,) = _run(tmp_path, "cut", "--schemes", "none", "--shapes", "128/128", "--time-budget-s", "0")
    assert r["batch_limit"] == 1  # 16 blocks a sequence, 24 in the pool
    assert r["cut_by_budget"] and r["num_steps"] == 1 and r["completed_requests"] == 0
    assert 0 < r["output_tokens"] <= r["batch_limit"]
    assert r["trtllm_fp8_output_tok_s"] == 28312
    assert r["ratio_vs_trtllm_fp8"] == pytest.approx(r["output_tok_s"] / 28312)


def test_profile_window_counts_overlapping_kernels_once() -> None:
    """The profile's GPU-busy time is the union of kernel intervals: kernels on two streams that overlap
    count once, and a gap (the GPU waiting on the host) counts not at all."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from step_window_profile import busy_us, kernel_family

    assert busy_us([]) == 0.0
    assert busy_us([(0.0, 10.0), (5.0, 12.0), (20.0, 25.0)]) == 17.0
    assert busy_us([(20.0, 25.0), (0.0, 30.0), (1.0, 2.0)]) == 30.0
    assert (
        kernel_family("void cutlass::Kernel<sm90_xmma_gemm_e4m3>(Params)")
        == "void cutlass::Kernel<sm90_xmma_gemm_e4m3>"
    )


@pytest.mark.parametrize("flag", ["--profile-steps", "--sync-check-steps"])
def test_profile_and_sync_check_steps_need_a_gpu(tmp_path: Path, flag: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    with pytest.raises(SystemExit, match="run them on a GPU"):
        cli.main(["bench", "throughput", "--smoke", flag, "4", "--out", str(tmp_path / "x.json")])
