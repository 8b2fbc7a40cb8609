"""Greedy tokens from vocab-parallel logits without gathering the logits: one max-all-reduce of 8 bytes
per row.

Why: for greedy decoding rank 0 used to gather every rank's logits slice (vocab / N values per row,
64K bf16 for Llama-3 at TP=2), take the argmax, then broadcast the tokens back so the other ranks could
fill the next step's inputs: two collectives on the step's critical path. Instead each rank takes the
argmax of its own slice and packs (max value, global index) into one int64 key that orders as the pair
does; a MAX all-reduce of the keys leaves the winning token on every rank at once.

    key = orderable_bits(float32 max) << 32  |  (2**31 - 1 - global index)

`orderable_bits` maps a float32 to an int32 with the same order (negative floats have their magnitude
bits flipped); -0.0 is made +0.0 first, since the two compare equal. The low word makes the lower index
win a tie, as torch.argmax over the whole row does. NaN is not ordered as torch orders it (torch takes NaN
as the maximum); only a broken step produces one.
"""

from __future__ import annotations

import torch

from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.argmax import greedy_tokens

LOW_MASK = (1 << 31) - 1  # indices below 2**31; the low word holds LOW_MASK - index
NO_TOKEN = torch.iinfo(torch.int64).min  # the key of a rank whose slice holds only vocabulary padding


def argmax_keys(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """values: [S] float (each row's max), indices: [S] int64 (its global vocabulary index) -> [S] int64
    keys whose integer order is (value, -index) order."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ LOW_MASK, bits).to(torch.int64)
    return (ordered << 32) | (LOW_MASK - indices)


def key_tokens(keys: torch.Tensor) -> torch.Tensor:
    """The global vocabulary index each key carries."""
    return LOW_MASK - (keys & LOW_MASK)


def local_argmax_keys(local_logits: torch.Tensor, start: int) -> torch.Tensor:
    """Keys of each row's best entry in this rank's slice [S, V_local], which begins at vocab index
    `start`. An empty slice (padding only) gives keys that lose to any real entry."""
    rows = local_logits.shape[0]
    if local_logits.shape[1] == 0:
        return torch.full((rows,), NO_TOKEN, dtype=torch.int64, device=local_logits.device)
    where = greedy_tokens(local_logits)
    best = local_logits.gather(1, where.unsqueeze(1)).squeeze(1)
    return argmax_keys(best, where + start)


def vocab_parallel_argmax(local_logits: torch.Tensor, start: int, tp: TPContext) -> torch.Tensor:
    """Collective: the argmax over the whole vocabulary of each row, on every rank, from this rank's
    slice [S, V_local] of the logits (which begins at vocab index `start`). [S] int64."""
    if tp.size == 1 and start == 0 and local_logits.shape[1] > 0:
        return greedy_tokens(local_logits)
    return key_tokens(tp.all_reduce_max(local_argmax_keys(local_logits, start)))


def vocab_parallel_argmax_ref(slices: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's slice, in rank order: the argmax of the gathered logits."""
    return torch.cat(slices, dim=-1).argmax(dim=-1)
