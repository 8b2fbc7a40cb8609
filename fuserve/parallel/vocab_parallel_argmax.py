"""Greedy tokens from vocab-parallel logits without gathering the logits: one max-all-reduce of 8 bytes
per row.

Why: for greedy decoding rank 0 used to gather every rank's logits slice (vocab / N values per row,
64K bf16 for Llama-3 at TP=2), take the argmax, then broadcast the tokens back so the other ranks could
fill the next step's inputs: two collectives on the step's critical path. Instead each rank takes the
argmax of its own slice as a key (kernels/argmax.py: the max's orderable bits, then the lower global
index), and a MAX all-reduce of the keys leaves the winning token on every rank at once. Ties go to the
lower index, as torch.argmax over the whole row does.
"""

from __future__ import annotations

import torch

from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.argmax import greedy_keys, greedy_tokens, key_tokens

NO_TOKEN = torch.iinfo(torch.int64).min  # the key of a rank whose slice holds only vocabulary padding


def local_argmax_keys(local_logits: torch.Tensor, start: int) -> torch.Tensor:
    """Keys of each row's best entry in this rank's slice [S, V_local], which begins at vocab index
    `start`. An empty slice (padding only) gives keys that lose to any real entry."""
    if local_logits.shape[1] == 0:
        rows = local_logits.shape[0]
        return torch.full((rows,), NO_TOKEN, dtype=torch.int64, device=local_logits.device)
    return greedy_keys(local_logits, start)


def vocab_parallel_argmax(local_logits: torch.Tensor, start: int, tp: TPContext) -> torch.Tensor:
    """Collective: the argmax over the whole vocabulary of each row, on every rank, from this rank's
    slice [S, V_local] of the logits (which begins at vocab index `start`). [S] int64."""
    if tp.size == 1 and start == 0 and local_logits.shape[1] > 0:
        return greedy_tokens(local_logits)
    return key_tokens(tp.all_reduce_max(local_argmax_keys(local_logits, start)))


def vocab_parallel_argmax_ref(slices: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's slice, in rank order: the argmax of the gathered logits."""
    return torch.cat(slices, dim=-1).argmax(dim=-1)
