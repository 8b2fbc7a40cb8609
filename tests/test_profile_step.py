"""The start-up profile step (ModelRunner.profile) on the CPU."""

from __future__ import annotations

import torch
from checkpoints import TINY_LLAMA

from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.kv_cache import allocate_kv_cache
from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.models.llama import LlamaArch, LlamaForCausalLM


def test_profile_never_runs_positions_past_the_rotary_tables() -> None:
    """One sequence and a token budget far above max_model_len (bench_quant's batch-1 engine): the
    profile stays within the model's positions; before, it read the rotary tables out of bounds (an
    illegal memory access on an H100, an IndexError here)."""
    arch = LlamaArch.from_hf(TINY_LLAMA)
    model = LlamaForCausalLM(arch, TPContext(), KernelOps.reference(), 64)
    blocks = 8192 // 16
    cache = allocate_kv_cache(arch, arch.num_kv_heads, blocks, 16, torch.float32, torch.device("cpu"))
    model.bind_kv_cache(cache.k, cache.v)
    ModelRunner(model, torch.device("cpu"), 16).profile(8192, 1, blocks)
