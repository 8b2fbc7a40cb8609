"""A draft's KV budget on a GPU it may share with its target.

A draft deployment has its process to itself, but an in-engine draft (speculative.placement.in_engine)
shares the engine's: what torch reports as allocated there holds the target's weights, KV cache and
graphs. So a draft counts only what it allocated itself since `start` (its weights, and the peak of a
profile forward), takes its share of the device less that, and never more than the device has free,
less twice the profile's transient memory and a GiB: its CUDA graphs' pool and the libraries'
workspaces come after the pool (an in-engine 1B draft that left only the transient free ran out of
memory capturing its graphs on an H200).
"""

from __future__ import annotations

import torch

HEADROOM = 1 << 30


def draft_kv_budget(device: torch.device, share: float, start: int) -> int:
    """Bytes for the draft's KV cache. `start`: torch.cuda.memory_allocated(device) before the draft
    built anything. Call after its profile forward, with the profile's scratch freed; the peak counted
    is the one since the caller last reset it."""
    own_peak = torch.cuda.max_memory_allocated(device) - start
    transient = own_peak - (torch.cuda.memory_allocated(device) - start)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache
    return int(min(total * share - own_peak, free - 2 * transient - HEADROOM))
