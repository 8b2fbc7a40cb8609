"""The tensor-parallel facts a layer needs: its rank, the group size, and the collectives.

Passed to every parallel layer at construction (no module-level state). With size 1 every
collective is the identity, so the single-device path pays nothing.

Two process groups: `group` carries the activations (NCCL on GPU, gloo on CPU) and `cpu_group` (always
gloo) carries small host-side facts: startup agreements here, step plans in plan_broadcast.py.
`fast_all_reduce`, when set, takes the small all-reduces of decode (one-shot over P2P, see
one_shot_all_reduce.py); everything it declines goes to the group's own all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist


class FastAllReduce(Protocol):
    def fits(self, x: torch.Tensor) -> bool: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def fits_add_rmsnorm(self, x: torch.Tensor) -> bool: ...

    def add_rmsnorm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        next_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def timed_out_rank(self) -> int | None:
        """A rank that this rank's kernels gave up waiting for (it never arrived), or None."""
        ...

    def give_up_detail(self) -> str:
        """Where and at which call that give-up happened, in words ("" when none did)."""
        ...

    def fits_gemv_push(self, x: torch.Tensor, weight: torch.Tensor) -> bool: ...

    def reserve_two_shot(self, numel: int, cpu_group: Any, timeout_s: float = 60.0) -> bool: ...

    def two_shot_slot(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None: ...

    def sum_in_slot(self, slot: torch.Tensor) -> torch.Tensor: ...

    def gemv_push(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def pushed_add_rmsnorm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class SlotPartial:
    """A row-parallel layer's partial output written straight into the two-shot all-reduce's symmetric
    buffer (FastAllReduce.two_shot_slot): `TPContext.all_reduce_add_rmsnorm` sums it there and reads the sum
    in place, so neither a copy in nor a copy out runs (two per all-reduce, ~1 us each at four ranks)."""

    partial: torch.Tensor


@dataclass(frozen=True)
class PushedPartial:
    """A row-parallel layer's partial output that its GEMV already pushed to every peer (gemv_push.py).
    Only `TPContext.all_reduce_add_rmsnorm` takes it: the peers' pushes are waiting to be summed there."""

    partial: torch.Tensor


# A row-parallel layer's output that only `TPContext.all_reduce_add_rmsnorm` takes (it is not yet a sum).
Partial = PushedPartial | SlotPartial

AddRMSNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TPContext:
    rank: int = 0
    size: int = 1
    group: Any = None
    cpu_group: Any = None
    fast_all_reduce: FastAllReduce | None = None

    def timed_out_rank(self) -> int | None:
        return self.fast_all_reduce.timed_out_rank() if self.fast_all_reduce is not None else None

    def give_up_detail(self) -> str:
        return self.fast_all_reduce.give_up_detail() if self.fast_all_reduce is not None else ""

    def reserve_large_messages(self, numel: int) -> None:
        """Collective, before the first step: let the fast path take all-reduces of up to `numel`
        elements too (a prefill step's), where it has a kernel that beats NCCL at that size."""
        if self.size > 1 and self.fast_all_reduce is not None:
            self.fast_all_reduce.reserve_two_shot(numel, self.cpu_group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks. Use the returned tensor: the fast path writes a new one."""
        if self.size == 1:
            return x
        if self.fast_all_reduce is not None and self.fast_all_reduce.fits(x):
            return self.fast_all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def row_parallel_partial(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        linear: Callable[..., torch.Tensor],
    ) -> torch.Tensor | Partial:
        """This rank's partial x @ W^T (+ bias) of a row-parallel layer, for `all_reduce_add_rmsnorm`.
        For one decode row the fast path's GEMV pushes it to the peers as it computes it."""
        fast = self.fast_all_reduce
        if self.size > 1 and fast is not None:
            if fast.fits_gemv_push(x, weight):
                return PushedPartial(fast.gemv_push(x, weight, bias))
            slot = fast.two_shot_slot(x.shape[0], weight.shape[0], x.dtype) if bias is None else None
            if slot is not None:  # the GPU's linear (kernels/gemv.py) writes into it
                return SlotPartial(linear(x, weight, None, out=slot))
        y = linear(x, weight, None)
        return y + bias if bias is not None else y

    def all_reduce_add_rmsnorm(
        self,
        x: torch.Tensor | Partial,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        add_rmsnorm: AddRMSNorm,
        next_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_rmsnorm(sum over ranks of x, residual, weight, eps)`, where x is this rank's partial sum
        (a row-parallel layer's output before its all-reduce). The fast path does both in one kernel,
        and may pull the start of `next_weight` (the layer that reads the result) into L2 meanwhile."""
        fast = self.fast_all_reduce
        if isinstance(x, PushedPartial):
            assert fast is not None, "a pushed partial comes from the fast all-reduce only"
            return fast.pushed_add_rmsnorm(x.partial, residual, weight, eps)
        if isinstance(x, SlotPartial):
            assert fast is not None, "a slot partial comes from the fast all-reduce only"
            return add_rmsnorm(fast.sum_in_slot(x.partial), residual, weight, eps)
        if self.size > 1 and fast is not None and fast.fits_add_rmsnorm(x):
            return fast.add_rmsnorm(x, residual, weight, eps, next_weight)
        return add_rmsnorm(self.all_reduce(x), residual, weight, eps)

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max over ranks, in place on every rank (vocab_parallel_argmax.py's keys)."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def broadcast_from_rank0(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x, in place on every rank; queued on the stream like any collective (no host sync)."""
        if self.size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's slice of the last dim (vocab-parallel logits) on rank 0 only.

        Only rank 0 samples, so the other ranks send their slice and get an empty [..., 0] tensor back:
        gathering everywhere would move (size - 1) x more logits for nothing.
        """
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        if parts is None:
            return x[..., :0]
        return torch.cat(parts, dim=-1)

    def min_across_ranks(self, value: int) -> int:
        """The smallest of every rank's value, on every rank (e.g. KV blocks that fit on each GPU)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())
