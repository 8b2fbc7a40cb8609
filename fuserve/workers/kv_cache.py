"""The KV cache pool: how many blocks fit, and the per-layer K and V tensors.

On GPU the pool takes what is left of `gpu_memory_utilization` x total memory after the weights
and the peak activations of a profiling step at the full token budget; on CPU a fixed size.
Layout per layer: [num_blocks, block_size, kv_heads, head_dim], the layout the kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuserve.configs import CacheConfig
from fuserve.workers.models.llama import LlamaArch


@dataclass
class KVCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    num_blocks: int
    block_size: int


def bytes_per_block(arch: LlamaArch, num_kv_heads: int, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * num_kv_heads * arch.head_dim * elem


@dataclass
class KVBudget:
    """Where a GPU's memory went before the KV cache took the rest, in bytes: logged at start-up so
    that a pool smaller than expected says which part took the memory."""

    limit: int  # gpu_memory_utilization x total
    others: int  # other processes and this process's CUDA context, outside torch's allocator
    weights: int  # allocated by the model's build: its weights and buffers
    peak: int  # the allocator's peak: earlier tensors, the weights and the profiling step's activations
    per_block: int
    earlier: int = 0  # allocated in this process before the engine's build (another engine's, the caller's)

    @property
    def kv(self) -> int:
        return self.limit - self.others - self.peak

    @property
    def activations(self) -> int:
        return self.peak - self.earlier - self.weights

    def describe(self) -> str:
        gib = 1 << 30
        earlier = f" - earlier tensors in this process {self.earlier / gib:.2f}" if self.earlier else ""
        return (
            f"KV budget {self.kv / gib:.2f} GiB = limit {self.limit / gib:.2f} - other processes and "
            f"contexts {self.others / gib:.2f}{earlier} - weights {self.weights / gib:.2f} - activation "
            f"peak {self.activations / gib:.2f} GiB"
        )


def gpu_kv_budget(
    cfg: CacheConfig, per_block: int, earlier: int, weights: int, device: torch.device
) -> KVBudget:
    """Call after the profiling step (reads the allocator's peak)."""
    free, total = torch.cuda.mem_get_info(device)
    return KVBudget(
        limit=int(total * cfg.gpu_memory_utilization),
        others=total - free - torch.cuda.memory_reserved(device),
        weights=weights,
        peak=torch.cuda.max_memory_allocated(device),
        per_block=per_block,
        earlier=earlier,
    )


def num_blocks_for(cfg: CacheConfig, per_block: int, budget: KVBudget | None) -> int:
    """Pool size from the config, else from the GPU's budget, else (CPU) from cpu_kv_cache_gib."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    nbytes = budget.kv if budget is not None else cfg.cpu_kv_cache_gib * (1 << 30)
    blocks = int(nbytes // per_block)
    if blocks < 1:
        raise RuntimeError(
            f"no memory left for the KV cache ({budget.describe() if budget else f'{nbytes} bytes'}); raise "
            "cache.gpu_memory_utilization, lower scheduler.max_num_batched_tokens, or use a smaller model"
        )
    return blocks


def allocate_kv_cache(
    arch: LlamaArch,
    num_kv_heads: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCache:
    shape = (num_blocks, block_size, num_kv_heads, arch.head_dim)
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
    return KVCache(k, v, num_blocks, block_size)
