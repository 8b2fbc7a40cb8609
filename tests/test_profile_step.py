"""The start-up profile step (ModelRunner.profile) on the CPU."""

from __future__ import annotations

import torch

from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.kv_cache import allocate_kv_cache
from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.models.llama import LlamaArch, LlamaForCausalLM

TINY = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}


def test_profile_never_runs_positions_past_the_rotary_tables() -> None:
    """One sequence and a token budget far above max_model_len (bench_quant's batch-1 engine): the
    profile stays within the model's positions; before, it read the rotary tables out of bounds (an
    illegal memory access on an H100, an IndexError here)."""
    arch = LlamaArch.from_hf(TINY)
    model = LlamaForCausalLM(arch, TPContext(), KernelOps.reference(), 64)
    blocks = 8192 // 16
    cache = allocate_kv_cache(arch, arch.num_kv_heads, blocks, 16, torch.float32, torch.device("cpu"))
    model.bind_kv_cache(cache.k, cache.v)
    ModelRunner(model, torch.device("cpu"), 16).profile(8192, 1, blocks)
