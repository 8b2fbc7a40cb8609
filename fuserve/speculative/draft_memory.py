"""A draft's KV pool on a GPU it may share with its target.

A draft deployment has its process to itself, but an in-engine draft (speculative.placement.in_engine)
shares the engine's: what torch reports as allocated there holds the target's weights, KV cache and
graphs. So a draft counts only what it allocated itself since `start` (its weights, and the peak of a
profile forward), takes its share of the device less that, and never more than the device has free
less twice the profile's transient memory and a GiB: its CUDA graphs' pool and the libraries'
workspaces come after the pool (an in-engine 1B draft that left only the transient free ran out of
memory capturing its graphs on an H200). Memory torch holds cached but unallocated is not counted as
free: in the engine's process it may be the target's graph pools.
"""

from __future__ import annotations

import torch

HEADROOM = 1 << 30


def draft_kv_blocks(
    device: torch.device, share: float, start: int, per_block: int, max_model_len: int, block_size: int
) -> int:
    """Blocks for the draft's KV cache. `start`: torch.cuda.memory_allocated(device) before the draft
    built anything. Call after its profile forward (if any), with the profile's scratch freed; the peak
    counted is the one since the caller last reset it. Fewer blocks than one sequence of max_model_len
    tokens is an error that names the settings to change."""
    min_blocks = -(-max_model_len // block_size)
    own_peak = torch.cuda.max_memory_allocated(device) - start
    transient = own_peak - (torch.cuda.memory_allocated(device) - start)
    free, total = torch.cuda.mem_get_info(device)
    by_share, by_free = total * share - own_peak, free - 2 * transient - HEADROOM
    blocks = int(min(by_share, by_free) // per_block)
    if blocks < min_blocks:
        raise RuntimeError(
            f"the draft's KV cache would get {blocks * per_block / 2**30:.2f} GiB (its share of the GPU less "
            f"its weights: {by_share / 2**30:.2f} GiB; the device's free memory less headroom: "
            f"{by_free / 2**30:.2f} GiB), less than one sequence at its longest; raise "
            "speculative.placement.gpu_memory_utilization, and for a draft in the engine lower "
            "cache.gpu_memory_utilization to leave it that share"
        )
    return blocks
