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


def num_blocks_for(
    cfg: CacheConfig, arch: LlamaArch, num_kv_heads: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Pool size from the config; on GPU call after the profiling step (reads peak memory)."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    per_block = bytes_per_block(arch, num_kv_heads, cfg.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = total * cfg.gpu_memory_utilization - used_by_others - torch.cuda.max_memory_allocated(device)
    else:
        budget = cfg.cpu_kv_cache_gib * (1 << 30)
    blocks = int(budget // per_block)
    if blocks < 1:
        raise RuntimeError(
            f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB); raise "
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
