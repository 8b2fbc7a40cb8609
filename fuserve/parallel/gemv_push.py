"""A row-parallel GEMV that pushes its output to the peers as it computes it, and the kernel that sums it.

Why: at batch 1 the all-reduce after o_proj and down_proj is latency, not bandwidth: 8 KiB per rank.
The fused all-reduce (all_reduce_rmsnorm.py) starts only once the GEMV has finished: it loads the
partial row, stores it to the peers over NVLink, waits for those stores to land (a system-scope release)
and raises a flag the peers poll; 4.7 us alone at TP=2, ~64 times per step. Here every GEMV program
stores its few outputs straight into the peers' receive buffers when it has them, with no flag and no
fence: a receive slot holds -0.0 in every element while empty (a Lamport-style mark), the GEMV writes
-0.0 as +0.0, and the reader polls the slot until no element is -0.0 any more, then puts the marks
back for the slot's next use. Each element is one aligned store, so it is either empty or final.

    rank r, call e (e = ++counter, the same on every rank; slot = e % 2):
      GEMV program p:  y[p's outputs] -> own partial, and -> slot (e % 2, r) of every peer
      sum kernel:      own partial + for each peer src (rank order): poll own slot (e % 2, src) until
                       full, then reset it to -0.0 -> round to dtype -> + residual -> RMSNorm

Two slots suffice: a peer writes slot s again at call e + 2 only after its call e + 1 summed this
rank's e + 1 push, which this rank's GEMV made after its own e sum (and the reset of s) had finished.
The slots are their own symmetric buffer, never shared with the flag protocol of all_reduce_rmsnorm.py.

The GEMV never autotunes here (tuning would run it, and so push, several times): it runs with the block
sizes `gemv` tuned for the same shape. Only one token row (decode at batch 1) and 16-bit dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from fuserve.parallel.all_reduce_rmsnorm import (
    MAX_HIDDEN,
    NUM_SLOTS,
    SLOTS,
    give_up_on,
    next_call_count,
    peer_table,
    store_add_rmsnorm_row,
)
from fuserve.workers.kernels.gemv import gemv_block, tuned_config
from fuserve.workers.kernels.l2_prefetch import LINE_BYTES, l2_prefetch_budget, prefetch_columns
from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.kernels.rmsnorm import row_num_warps

EMPTY_BITS = -32768  # 0x8000: -0.0 in bf16 and fp16
EMPTY = tl.constexpr(EMPTY_BITS)
DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _gemv_push_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    slot_ptrs,
    counter_ptr,
    rank,
    N,
    K,
    stride_wn,
    slot_numel,
    prefetch_cols,
    HAS_BIAS: tl.constexpr,
    WORLD: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    LINE: tl.constexpr,
):
    y, offs_n, mask_n = gemv_block(
        x_ptr=x_ptr,
        w_ptr=w_ptr,
        bias_ptr=bias_ptr,
        N=N,
        K=K,
        stride_wn=stride_wn,
        prefetch_cols=prefetch_cols,
        HAS_BIAS=HAS_BIAS,
        USE_PDL=USE_PDL,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        L2_PREFETCH=L2_PREFETCH,
        LINE=LINE,
    )
    y = tl.where(y == 0, tl.zeros_like(y), y)  # -0.0 marks an empty element: send zeros as +0.0
    tl.store(y_ptr + offs_n, y, mask=mask_n)
    which = (tl.load(counter_ptr) + 1) % SLOTS
    mine = (which * WORLD + rank).to(tl.int64) * slot_numel
    for peer in tl.static_range(WORLD):
        if peer != rank:
            dst = tl.load(slot_ptrs + peer).to(tl.pointer_type(y_ptr.dtype.element_ty))
            tl.store(dst + mine + offs_n, y, mask=mask_n)


@triton.jit
def _pushed_add_rmsnorm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    slot_ptrs,
    counter_ptr,
    status_ptr,
    rank,
    hidden_size,
    slot_numel,
    max_spins,
    eps,
    WORLD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden_size
    dtype = x_ptr.dtype.element_ty
    epoch = next_call_count(counter_ptr)
    which = epoch % SLOTS
    empty = tl.full([BLOCK_H], EMPTY, tl.int16).to(dtype, bitcast=True)
    own_slots = tl.load(slot_ptrs + rank).to(tl.pointer_type(dtype))
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        if src == rank:
            acc += tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            theirs = own_slots + (which * WORLD + src).to(tl.int64) * slot_numel + cols
            part = tl.load(theirs, mask=mask, other=0.0, volatile=True)
            missing = tl.sum((part.to(tl.int16, bitcast=True) == EMPTY).to(tl.int32), axis=0)
            spins = 0
            while (missing > 0) & (spins < max_spins):
                part = tl.load(theirs, mask=mask, other=0.0, volatile=True)
                missing = tl.sum((part.to(tl.int16, bitcast=True) == EMPTY).to(tl.int32), axis=0)
                spins += 1
            tl.store(theirs, empty, mask=mask)  # empty again for this slot's next use
            summand = part.to(tl.float32)
            if missing > 0:
                summand = give_up_on(status_ptr, src, 0, epoch, -missing, BLOCK_H)
            acc += summand

    store_add_rmsnorm_row(
        acc, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, cols, mask, hidden_size, eps
    )


@dataclass
class PushSlots:
    """One rank's view of the receive slots: every rank's slot buffer base address (an int64 device
    table) and this rank's own call counter. The status word is shared with all_reduce_rmsnorm's
    PushBuffers, so one check covers both protocols."""

    rank: int
    world: int
    dtype: torch.dtype
    slot_ptrs: torch.Tensor  # [W] int64
    counter: torch.Tensor  # [1] int32
    status: torch.Tensor  # [4] int32, pinned: all_reduce_rmsnorm.give_up_status()
    max_spins: int
    slot_numel: int = MAX_HIDDEN
    _configs: dict[tuple, triton.Config] = field(default_factory=dict)

    def fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Depends on shapes, dtypes and layout only, so every rank decides the same for the same call."""
        return (
            x.dim() == 2
            and x.shape[0] == 1
            and x.dtype == self.dtype
            and weight.dtype == self.dtype
            and x.stride(1) == 1
            and weight.stride(1) == 1
            and weight.shape[1] == x.shape[1]
            and 0 < weight.shape[0] <= self.slot_numel
        )


def empty_slots(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A receive buffer with every element marked empty (-0.0)."""
    return torch.full((numel,), EMPTY_BITS, dtype=torch.int16, device=device).view(dtype)


def gemv_push(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slots: PushSlots
) -> torch.Tensor:
    """Collective (with the `pushed_add_rmsnorm` that must follow it on every rank): this rank's partial
    y = x @ W^T (+ bias), [1, N], also stored into every peer's receive slot."""
    if not slots.fits(x, weight):
        raise ValueError(
            f"gemv_push takes one {slots.dtype} row and a weight of at most {slots.slot_numel} rows, got "
            f"x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}; use gemv"
        )
    n, k = weight.shape
    key = (n, k, x.dtype, bias is not None)
    config = slots._configs.get(key)
    if config is None:
        config = slots._configs[key] = tuned_config(x, weight, bias)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    use_pdl = pdl_enabled(x)
    prefetch_cols = prefetch_columns(n, k, weight.element_size(), l2_prefetch_budget()) if use_pdl else 0
    block_n = config.kwargs["BLOCK_N"]
    _gemv_push_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        slots.slot_ptrs,
        slots.counter,
        slots.rank,
        n,
        k,
        weight.stride(0),
        slots.slot_numel,
        prefetch_cols,
        HAS_BIAS=bias is not None,
        WORLD=slots.world,
        USE_PDL=use_pdl,
        BLOCK_N=block_n,
        BLOCK_K=config.kwargs["BLOCK_K"],
        L2_PREFETCH=prefetch_cols > 0,
        LINE=LINE_BYTES // weight.element_size(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        launch_pdl=use_pdl,
    )
    return y


def pushed_add_rmsnorm(
    partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, slots: PushSlots
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: `h = sum over ranks of partial; return rmsnorm(h + residual), h + residual`, where
    every rank's partial came from `gemv_push` (so the peers' parts are already on their way here)."""
    if residual.shape != partial.shape or residual.stride(-1) != 1:
        raise ValueError(f"partial {tuple(partial.shape)} and residual {tuple(residual.shape)} must match")
    hidden = partial.shape[1]
    out = torch.empty_like(partial)
    new_residual = torch.empty_like(partial)
    block_h = triton.next_power_of_2(hidden)
    use_pdl = pdl_enabled(partial)
    _pushed_add_rmsnorm_kernel[(1,)](
        partial,
        residual,
        weight,
        out,
        new_residual,
        slots.slot_ptrs,
        slots.counter,
        slots.status.data_ptr(),
        slots.rank,
        hidden,
        slots.slot_numel,
        slots.max_spins,
        eps,
        WORLD=slots.world,
        BLOCK_H=block_h,
        USE_PDL=use_pdl,
        num_warps=row_num_warps(block_h),
        launch_pdl=use_pdl,
    )
    return out, new_residual


def symmetric_push_slots(
    group: Any, device: torch.device, dtype: torch.dtype, status: torch.Tensor, max_spins: int
) -> tuple[PushSlots, list[torch.Tensor]]:
    """Collective: allocate and exchange this rank's receive slots. Returns the view and the tensors that
    must stay alive as long as it is used."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    buf = symm_mem.empty(NUM_SLOTS * world * MAX_HIDDEN, dtype=dtype, device=device)
    buf.copy_(empty_slots(buf.numel(), dtype, device))
    torch.cuda.synchronize(device)  # marked empty before any peer can push here
    slots = PushSlots(
        rank=rank,
        world=world,
        dtype=dtype,
        slot_ptrs=peer_table(buf, group),
        counter=torch.zeros(1, dtype=torch.int32, device=device),
        status=status,
        max_spins=max_spins,
    )
    return slots, [buf]
