"""On a GPU: the engine with Triton kernels and CUDA graphs gives the reference path's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def run(folder: Path, dtype: str, kernels: dict, prompts: list[list[int]]) -> list:
    cfg = config_from_dict(
        {
            "model": {"path": str(folder), "dtype": dtype, "max_model_len": 256},
            "cache": {"block_size": 16, "num_blocks": 128},
            "scheduler": {"max_num_batched_tokens": 64, "max_num_seqs": 16},
            "kernels": kernels,
        }
    )
    llm = LLM(cfg)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, logprobs=0)
    return llm.generate(prompts, params)


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_triton_and_graphs_match_reference(tmp_path: Path, arch: str) -> None:
    folder = make_checkpoint(
        tmp_path / arch,
        arch,
        seed=3,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=512,
    )
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 7, 16, 33, 100)]
    ref = run(folder, "float32", {"use_triton": "off", "cuda_graphs": False}, prompts)
    fused = run(folder, "float32", {"use_triton": "on", "cuda_graphs": True}, prompts)
    for r, f in zip(ref, fused, strict=True):
        assert f.outputs[0].token_ids == r.outputs[0].token_ids
        got = [lp.logprob for lp in f.outputs[0].logprobs]
        want = [lp.logprob for lp in r.outputs[0].logprobs]
        assert got == pytest.approx(want, abs=1e-3)
    bf16 = run(folder, "bfloat16", {"use_triton": "on", "cuda_graphs": True}, prompts)
    bf16_ref = run(folder, "bfloat16", {"use_triton": "off", "cuda_graphs": False}, prompts)
    for r, f in zip(bf16_ref, bf16, strict=True):
        # bf16 rounding differs between paths: compare the first steps and the logprobs loosely
        assert f.outputs[0].token_ids[:8] == r.outputs[0].token_ids[:8]


def test_device_busy_time_is_measured_within_the_wall_time(tmp_path: Path) -> None:
    """The steps' device time (CUDA events) is what tells a slow GPU from a slow host under load: it
    must be there, include the prefill steps' share, and fit in the wall time of the run."""
    import time

    folder = make_checkpoint(
        tmp_path / "m",
        "llama3",
        seed=5,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=512,
    )
    cfg = config_from_dict(
        {
            "model": {"path": str(folder), "dtype": "bfloat16", "max_model_len": 256},
            "cache": {"block_size": 16, "num_blocks": 128},
            "scheduler": {"max_num_batched_tokens": 64, "max_num_seqs": 16},
        }
    )
    llm = LLM(cfg)
    before = llm.engine.stats()
    start = time.perf_counter()
    llm.generate([[1] * 100, [2] * 7], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    wall = time.perf_counter() - start
    after = llm.engine.stats()
    busy = after.device_busy_seconds_total - before.device_busy_seconds_total
    prefill = after.prefill_device_busy_seconds_total - before.prefill_device_busy_seconds_total
    assert 0.0 < prefill < busy <= wall
