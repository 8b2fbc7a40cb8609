"""All-reduce, residual add and RMSNorm in one kernel, for the small row-parallel outputs of decode.

Why: at TP=2 a Llama-3-8B decode step ends each attention and MLP block with an all-reduce (torch's
one-shot kernel, 6.8 us on two H200s) and then the fused add + RMSNorm (2.1 us): 65 pairs, 0.58 ms of a
3.1 ms step. One kernel per pair does both and halves the cross-GPU handshakes: the one-shot kernel meets
its peers twice (before reading their buffers, and after, so nobody overwrites a buffer still being read);
this one pushes instead of pulling and meets them once.

One program per token row, on every rank r of W:
    epoch = ++counter[row]                 a per-row call count, the same on every rank (same calls)
    push x (r's partial row) into slot (epoch % 2, r) of every peer's buffer      NVLink stores
    barrier (orders every warp's pushes before the flag)
    flag[r][row] = epoch on every peer                                             release, system scope
    for src in 0..W-1 (the same order on every rank, so every rank sums bit-identically):
        src == r: its own x; else wait for own flag[src][row] >= epoch, read slot (epoch % 2, src)
    sum -> rounded to x.dtype (as an all-reduce returns it) -> + residual -> RMSNorm, as rmsnorm.py
Two slots per source, alternating by epoch: a peer overwrites slot p at epoch e + 2 only after this
rank's epoch e + 1 program saw its flag, which this rank raised after its epoch e program (which read
slot p) had finished: kernels on one stream run in order. Counters live in each rank's own memory, so a
CUDA graph replay advances them like an eager call.

While a program waits for its peers (a few microseconds of NVLink latency, with the GPU's memory idle),
the kernel can pull the start of the next linear layer's weights into L2 (`prefetch`: the first bytes of
every row, spread over the programs), so the GEMM after it (cuBLAS, from 2 rows) reads that part from
L2: a tile that walks K from 0 starts on hits, whichever rows it holds. Measured at TP=2 batch 64 on two
H100s: gate_up 2.9 us a layer faster, qkv unchanged, the step 4.45 -> 4.37 ms (benchmarks/NOTES.md).

Buffers (`PushBuffers`): each rank's data buffer [2, W, slot_numel] and flags [W, max_rows] are
symmetric memory (torch.distributed._symmetric_memory, P2P over CUDA IPC, no multicast); the kernel gets
every rank's base address in a small int64 table. Tests on CPU build the same tables over two plain
tensors and run the two ranks one after the other under TRITON_INTERPRET.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.l2_prefetch import LINE_BYTES, prefetch_rows_l2
from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.kernels.rmsnorm import fused_add_rmsnorm_ref, row_num_warps, store_rmsnorm_row

MAX_ROWS = 1024  # rows per call (batch tokens); flags and counters are sized for it
# polls of a peer's flag before a program gives up: each is a system-scope atomic, so this is far
# beyond any skew between live ranks (first-call autotuning included) yet still ends the wait on a
# rank that died
MAX_SPINS = 1 << 26
MAX_HIDDEN = 16384  # one program holds a whole row
NUM_SLOTS = 2  # buffers per source, used in turn by epoch
SLOTS = tl.constexpr(NUM_SLOTS)
PREFETCH_ROWS = tl.constexpr(32)  # weight rows one prefetch step of a program covers
PREFETCH_LINE = tl.constexpr(LINE_BYTES)  # bytes a prefetch request asks for


@triton.jit
def _all_reduce_add_rmsnorm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    data_ptrs,
    flag_ptrs,
    counter_ptr,
    status_ptr,
    rank,
    hidden_size,
    stride_x,
    stride_residual,
    slot_numel,
    max_rows,
    max_spins,
    eps,
    prefetch_ptr,
    prefetch_rows,
    prefetch_stride,
    prefetch_bytes,
    WORLD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden_size
    dtype = x_ptr.dtype.element_ty

    epoch = next_call_count(counter_ptr + row)
    which = epoch % SLOTS
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    row_in_slot = row.to(tl.int64) * hidden_size + cols

    mine = (which * WORLD + rank).to(tl.int64) * slot_numel
    for peer in tl.static_range(WORLD):
        if peer != rank:
            dst = tl.load(data_ptrs + peer).to(tl.pointer_type(dtype))
            tl.store(dst + mine + row_in_slot, x, mask=mask)
    tl.debug_barrier()  # every thread's stores before the flag that publishes them
    for peer in tl.static_range(WORLD):
        if peer != rank:
            flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(flags + rank * max_rows + row, epoch, sem="release", scope="sys")
    if PREFETCH:  # the next layer's weights into L2 while the peers' rows are on their way
        prefetch_weight_rows(prefetch_ptr, prefetch_rows, prefetch_stride, prefetch_bytes)

    own_flags = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    own_data = tl.load(data_ptrs + rank).to(tl.pointer_type(dtype))
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        if src == rank:
            acc += x.to(tl.float32)
        else:
            theirs = own_data + (which * WORLD + src).to(tl.int64) * slot_numel + row_in_slot
            flag = own_flags + src * max_rows + row
            seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
            spins = 0
            while (seen < epoch) & (spins < max_spins):
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
                spins += 1
            part = tl.load(theirs, mask=mask, other=0.0, volatile=True).to(tl.float32)
            if seen < epoch:
                part = give_up_on(status_ptr, src, row, epoch, seen, BLOCK_H)
            acc += part

    store_add_rmsnorm_row(
        acc,
        residual_ptr + row.to(tl.int64) * stride_residual,
        weight_ptr,
        out_ptr + row.to(tl.int64) * hidden_size,
        new_residual_ptr + row.to(tl.int64) * hidden_size,
        cols,
        mask,
        hidden_size,
        eps,
    )


@triton.jit
def next_call_count(counter_ptr):
    """Add 1 to this rank's call count at `counter_ptr` and return the new count, the same in every
    thread of the program.

    Why an atomic: a scalar atomic runs in one thread and reaches the others through shared memory
    behind a barrier. A plain load then store (what this was until 2026-11-28) lets a warp that loads
    late read the count another warp's thread 0 has already stored, so its warps disagree on the call:
    that warp pushed to the other slot and waited for the next flag, its barriers then paired with
    other code's, and on two H100s ~1% of 128-row calls summed wrong on both ranks (one warp's share
    of a row on the peer, the row's norm here; benchmarks/stress_push_all_reduce.py)."""
    return tl.atomic_add(counter_ptr, 1, sem="relaxed", scope="gpu") + 1


@triton.jit
def prefetch_weight_rows(w_ptr, n_rows, stride_bytes, row_bytes):
    """This program's share of a weight's rows, bytes [0, row_bytes) of each, asked of L2. `w_ptr` is
    the weight as bytes; rows are dealt out PREFETCH_ROWS at a time to the programs in turn."""
    start = tl.program_id(0) * PREFETCH_ROWS
    step = tl.num_programs(0) * PREFETCH_ROWS
    for r0 in range(start, n_rows, step):
        rows = tl.minimum(r0 + tl.arange(0, PREFETCH_ROWS), n_rows - 1)  # a repeated row costs no bytes
        prefetch_rows_l2(w_ptr + rows.to(tl.int64)[:, None] * stride_bytes, 0, row_bytes, PREFETCH_LINE)


@triton.jit
def give_up_on(status_ptr, src, row, epoch, seen, BLOCK_H: tl.constexpr):
    """A peer that never came (died or stuck): record it in the host-visible status words, and return
    the NaN row that poisons this sum instead of a partial one. The first program to give up writes
    [1 + src, row, epoch, seen]: this rank's call count for the row against the last the peer
    published, which tells a peer one call behind (slow, or gone) from ranks whose calls parted.
    `status_ptr` is the words' address as an integer, which Triton types i32 when it happens to be
    below 2**31: widen it before the cast."""
    word = status_ptr.to(tl.int64).to(tl.pointer_type(tl.int32))
    first = tl.atomic_cas(word, 0, src + 1, sem="relaxed", scope="sys") == 0
    if first:
        tl.store(word + 1, row)
        tl.store(word + 2, epoch)
        tl.store(word + 3, seen)
    return tl.full([BLOCK_H], float("nan"), tl.float32)


@triton.jit
def store_add_rmsnorm_row(
    acc, residual_row_ptr, weight_ptr, out_row_ptr, new_residual_row_ptr, cols, mask, hidden_size, eps
):
    """The end of an all-reduce + add + RMSNorm for one row: the fp32 sum `acc` rounded to the model
    dtype (as an all-reduce returns it), + residual -> new residual, then its RMSNorm, as rmsnorm.py."""
    dtype = new_residual_row_ptr.dtype.element_ty
    residual = tl.load(residual_row_ptr + cols, mask=mask, other=0.0)
    h = (acc.to(dtype).to(tl.float32) + residual.to(tl.float32)).to(dtype)
    tl.store(new_residual_row_ptr + cols, h, mask=mask)
    store_rmsnorm_row(h, weight_ptr, out_row_ptr, cols, mask, hidden_size, eps)


@dataclass
class PushBuffers:
    """One rank's view of the group's buffers: every rank's data and flag base addresses (int64 device
    tables), its own call counters, and the layout sizes. See the module docstring."""

    rank: int
    world: int
    dtype: torch.dtype
    data_ptrs: torch.Tensor  # [W] int64
    flag_ptrs: torch.Tensor  # [W] int64
    counters: torch.Tensor  # [max_rows] int32, this rank's own
    slot_numel: int
    max_rows: int = MAX_ROWS
    # polls of a peer's flag before giving up on it, so a dead peer cannot hang this GPU forever
    max_spins: int = MAX_SPINS
    # host-visible (pinned) words [1 + the rank a kernel gave up waiting for, row, epoch, the peer's
    # flag], or all 0 (give_up_on)
    status: torch.Tensor = field(default_factory=lambda: give_up_status())

    @property
    def timed_out_rank(self) -> int | None:
        """The rank a kernel gave up waiting for, read without a device sync (the words are pinned)."""
        value = int(self.status[0])
        return value - 1 if value else None

    def fits(self, x: torch.Tensor) -> bool:
        """Depends on shape and dtype only, so every rank decides the same for the same call."""
        return (
            x.dim() == 2
            and x.dtype == self.dtype
            and 0 < x.shape[0] <= self.max_rows
            and x.shape[1] <= MAX_HIDDEN
            and x.numel() <= self.slot_numel
        )


def give_up_status() -> torch.Tensor:
    return torch.zeros(4, dtype=torch.int32, pin_memory=torch.cuda.is_available())


def describe_give_up(status: torch.Tensor) -> str:
    """The status words in words, for the error a give-up raises (empty when none happened)."""
    src, row, epoch, seen = (int(v) for v in status.tolist())
    if not src:
        return ""
    if seen < 0:  # gemv_push's wait: values, not a flag
        return f"GEMV push call {epoch}: {-seen} values of the peer's partial never arrived"
    why = "one call behind: slow, stuck elsewhere or gone" if seen == epoch - 1 else "the ranks' calls parted"
    return f"row {row}, this rank's call {epoch} for it, the peer's last {seen} ({why})"


def slot(data: torch.Tensor, bufs: PushBuffers, epoch: int, src: int, rows: int, hidden: int) -> torch.Tensor:
    """The [rows, hidden] view of `data` (one rank's flat data buffer) where `src` pushes at `epoch`."""
    start = (epoch % NUM_SLOTS * bufs.world + src) * bufs.slot_numel
    return data[start : start + rows * hidden].view(rows, hidden)


@dataclass(frozen=True)
class WeightPrefetch:
    """What the kernel asks L2 for: the first `row_bytes` of each of `rows` rows, `stride_bytes` apart,
    of `weight` seen as bytes."""

    weight: torch.Tensor  # [rows, row_length_in_bytes] uint8 view
    rows: int
    stride_bytes: int
    row_bytes: int


def weight_prefetch(next_weight: torch.Tensor | None, rows: int, budget_bytes: int) -> WeightPrefetch | None:
    """The prefetch for the linear layer after this all-reduce, or None where none helps or can run:
    one row (the GEMV that follows prefetches its own weights, l2_prefetch.py), no budget, a weight that
    is not a contiguous 16-bit CUDA matrix (the 8-bit kernels read other layouts), or Triton's
    interpreter (no inline PTX)."""
    if (
        next_weight is None
        or rows < 2
        or budget_bytes <= 0
        or not compiled_for_gpu(next_weight)
        or next_weight.dim() != 2
        or next_weight.element_size() != 2
        or not next_weight.is_contiguous()
    ):
        return None
    n, k = next_weight.shape
    row_length = k * next_weight.element_size()
    l2 = l2_cache_bytes(next_weight.device)
    if l2:  # lines evicted before the GEMM reads them cost their bandwidth twice
        budget_bytes = min(budget_bytes, l2 // 2)
    return WeightPrefetch(
        next_weight.view(torch.uint8), n, row_length, prefetch_row_bytes(n, row_length, budget_bytes)
    )


def compiled_for_gpu(x: torch.Tensor) -> bool:
    """Whether the kernel is compiled for a GPU (inline PTX allowed), not run by Triton's interpreter,
    which executes one program at a time and has no PTX."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


@functools.cache
def l2_cache_bytes(device: torch.device) -> int:
    """The GPU's L2 in bytes (50 MiB on H100 and H200), 0 where torch does not say."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))


def prefetch_row_bytes(rows: int, row_length: int, budget_bytes: int) -> int:
    """Bytes of every row that fit the budget: whole 128-byte lines, at least one, at most the row."""
    per_row = budget_bytes // max(rows, 1) // LINE_BYTES * LINE_BYTES
    return min(row_length, max(per_row, LINE_BYTES))


def all_reduce_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    bufs: PushBuffers,
    prefetch: WeightPrefetch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: `h = sum over ranks of x; new_residual = h + residual; return rmsnorm(new_residual),
    new_residual`. x: this rank's partial [T, H] (a row-parallel layer's output before its all-reduce);
    residual: [T, H]; weight: [H]. Every rank calls it with the same shapes, in the same order.
    `prefetch` (weight_prefetch) changes no result: it only warms L2 for the next layer."""
    if not bufs.fits(x):
        raise ValueError(
            f"x {tuple(x.shape)} {x.dtype} does not fit the push buffers ({bufs.max_rows} rows, "
            f"{bufs.slot_numel} elements, {bufs.dtype}); use the all-reduce then fused_add_rmsnorm"
        )
    if residual.shape != x.shape or residual.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError(
            f"x {tuple(x.shape)} and residual {tuple(residual.shape)} need one shape and contiguous rows"
        )
    rows, hidden = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h = triton.next_power_of_2(hidden)
    use_pdl = pdl_enabled(x)
    _all_reduce_add_rmsnorm_kernel[(rows,)](
        x,
        residual,
        weight,
        out,
        new_residual,
        bufs.data_ptrs,
        bufs.flag_ptrs,
        bufs.counters,
        bufs.status.data_ptr(),
        bufs.rank,
        hidden,
        x.stride(0),
        residual.stride(0),
        bufs.slot_numel,
        bufs.max_rows,
        bufs.max_spins,
        eps,
        prefetch.weight if prefetch is not None else x,
        prefetch.rows if prefetch is not None else 0,
        prefetch.stride_bytes if prefetch is not None else 0,
        prefetch.row_bytes if prefetch is not None else 0,
        WORLD=bufs.world,
        BLOCK_H=block_h,
        USE_PDL=use_pdl,
        PREFETCH=prefetch is not None,
        num_warps=row_num_warps(block_h),
        launch_pdl=use_pdl,
    )
    return out, new_residual


def all_reduce_add_rmsnorm_ref(
    partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, given every rank's partial: the sum in rank order, then rmsnorm.fused_add_rmsnorm_ref."""
    total = partials[0].float()
    for p in partials[1:]:
        total = total + p.float()
    return fused_add_rmsnorm_ref(total.to(residual.dtype), residual, weight, eps)


def symmetric_push_buffers(
    group: Any, device: torch.device, dtype: torch.dtype, slot_numel: int
) -> tuple[PushBuffers, list[torch.Tensor]]:
    """Collective: allocate and exchange this rank's data and flag buffers. Returns the view and the
    tensors that must stay alive as long as it is used."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    data = symm_mem.empty(NUM_SLOTS * world * slot_numel, dtype=dtype, device=device)
    flags = symm_mem.empty(world * MAX_ROWS, dtype=torch.int32, device=device)
    data.zero_()
    flags.zero_()
    torch.cuda.synchronize(device)  # zeroed before any peer can raise a flag here
    bufs = PushBuffers(
        rank=rank,
        world=world,
        dtype=dtype,
        data_ptrs=peer_table(data, group),
        flag_ptrs=peer_table(flags, group),
        counters=torch.zeros(MAX_ROWS, dtype=torch.int32, device=device),
        slot_numel=slot_numel,
    )
    return bufs, [data, flags]


def peer_table(buf: torch.Tensor, group: Any) -> torch.Tensor:
    """Collective: exchange a symmetric-memory buffer; every rank's base address of it, as an int64
    device table for the kernels."""
    import torch.distributed._symmetric_memory as symm_mem

    handle = symm_mem.rendezvous(buf, group)
    return torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=buf.device)
