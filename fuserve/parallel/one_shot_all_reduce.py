"""One-shot all-reduce for the small messages of decode: each rank sums every peer's buffer over P2P.

Why: at TP=2 on two H200s an NCCL all-reduce of 8 KiB costs 18-36 us, latency-bound, and a Llama-3-8B
decode step has 64 of them (1.2 ms against a 1.9 ms weight-read floor). One kernel does better for
messages up to about a MiB: each rank copies its input into a symmetric buffer, meets its peers at a
barrier on signal pads, loads every rank's buffer straight from peer memory (NVLink), writes the sum,
and meets them again so nobody overwrites a buffer a peer is still reading. torch ships that kernel as
`symm_mem::one_shot_all_reduce_copy`; this file owns the buffer, the size rule and the fallback.

No multicast: NVLink multicast (NVLS) can take shared GPUs out of service, so the workers run with
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (process_group.py). Ray masks CUDA_VISIBLE_DEVICES per actor, so
every rank calls its GPU cuda:0; the symmetric-memory rendezvous refuses that ("overlapping devices")
unless TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1, whose only other effect is to skip multicast setup.

Its sibling in all_reduce_rmsnorm.py does the all-reduce that ends an attention or MLP block together with
the residual add and RMSNorm that follow it, and gemv_push.py lets a batch-1 row-parallel GEMV push its
output to the peers itself; this class owns their buffers too and self-tests all three.

CUDA graphs: the op is one kernel on the current stream over fixed buffers, so a capture records it like
any other kernel and its output comes from the graph's pool.

Once per process: torch's symmetric-memory rendezvous names its store keys from one counter per process
(`StoreExchange`'s sequence number, in CUDASymmetricMemory.cu), which every rendezvous advances and
nothing resets. A process that set up one group has its counter ahead of a fresh worker's, so in a second
group its keys and the worker's never meet: both wait in the store until its timeout. That was the hang
of a one-shot engine started after another one-shot engine in the same pytest process (two H200s,
2026-11-23; two H100s, 2026-11-25). So a rank whose process already took part in a rendezvous declines,
and the whole group uses NCCL (`create`), with a warning; tests and benchmarks that want the one-shot
path for several engines start each in a fresh process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from fuserve.parallel import gemv_push
from fuserve.parallel.all_reduce_rmsnorm import (
    all_reduce_add_rmsnorm,
    describe_give_up,
    symmetric_push_buffers,
    weight_prefetch,
)
from fuserve.workers.kernels.switches import switches

log = logging.getLogger(__name__)

# Largest message (bytes) worth one-shot per group size: each rank reads (size - 1) x the message, so the
# crossover with NCCL's bandwidth-optimal algorithms comes earlier for larger groups. bench_tp.py measures it.
DEFAULT_MAX_BYTES = {2: 1 << 20, 4: 512 << 10, 8: 256 << 10}
# From four ranks on, torch's two-shot kernel (reduce-scatter + all-gather over P2P: each rank reads 1/N of
# every peer's buffer) took every size measured alone on four H100s (2026-11-26, in a CUDA graph): 8.3 us
# at 16 KiB against one-shot 9.6 and the fused all-reduce + add + RMSNorm 14.7; 14.0 us at 1 MiB against
# NCCL 26.7; 29.4 us at 4 MiB against NCCL 56.1. So at N >= 4 it takes every message up to its buffer,
# followed by the separate add + RMSNorm (bench_tp.py measures the kernels alone with two_shot=False).
# Below four ranks the one-shot and fused kernels keep the small messages, and two-shot takes only those
# above their limit: a prefill's (Llama-3-8B at TP=2: 4,096 tokens x 4,096 x 2 bytes = 32 MiB, which NCCL
# sums in 139.6 us), in a buffer the worker sizes for its largest step (`reserve_two_shot`).
TWO_SHOT_MIN_RANKS = 4
TWO_SHOT_MAX_BYTES = 8 << 20
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)  # what the torch kernel dispatches on
_ALIGN = 16  # bytes; the kernel's widest vector, and it requires input and buffer to share an alignment
_rendezvous_started = False  # this process has entered a symmetric-memory rendezvous (module docstring)


class OneShotAllReduce:
    def __init__(
        self,
        group: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_bytes: int,
        push_gemv: bool = True,
        two_shot: bool = True,
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        global _rendezvous_started
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"one-shot all-reduce supports {SUPPORTED_DTYPES}, not {dtype}")
        _rendezvous_started = True  # from here on this process's exchange counter may have moved
        try:
            symm_mem.set_backend("CUDA")  # P2P over CUDA IPC handles: no NVSHMEM or NCCL windows needed
        except Exception:  # already chosen for this process (by an earlier allocation): keep it
            pass
        self.dtype = dtype
        self.group_name = group.group_name
        self.max_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        self.buffer.zero_()
        symm_mem.rendezvous(self.buffer, group)
        self.push, self._push_tensors = symmetric_push_buffers(group, device, dtype, self.max_numel)
        self.size = dist.get_world_size(group)
        self.group = group
        self.two_shot = two_shot
        # the two-shot kernel takes messages of more elements than this (all of them from four ranks on,
        # unless two_shot is off: bench_tp.py then measures the one-shot and fused kernels at any size)
        self.two_shot_above = 0 if two_shot and self.size >= TWO_SHOT_MIN_RANKS else self.max_numel
        self.two_shot_buffer: torch.Tensor | None = None
        if two_shot and self.size >= TWO_SHOT_MIN_RANKS:
            self.two_shot_buffer = _symmetric_buffer(
                TWO_SHOT_MAX_BYTES // dtype.itemsize, dtype, device, group
            )
        self.slots: gemv_push.PushSlots | None = None
        if push_gemv and dtype in gemv_push.DTYPES:
            self.slots, self._slot_tensors = gemv_push.symmetric_push_slots(
                group, device, dtype, self.push.status, self.push.max_spins
            )

    @classmethod
    def create(
        cls,
        group: Any,
        cpu_group: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_bytes: int | None = None,
        push_gemv: bool = True,
        timeout_s: float = 60.0,
        two_shot: bool = True,
    ) -> OneShotAllReduce | None:
        """Every rank gets one or none does: a rank that cannot set it up (no P2P, old driver, fp16, a
        process that already did a rendezvous) makes the whole group fall back to NCCL, since mixing the
        two would deadlock. Three agreements: nobody enters the rendezvous (a collective that waits for
        every peer) unless every rank can; nobody launches the self-test kernel unless every rank has its
        buffer; nobody uses the kernel unless every rank's self-test summed right."""
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        max_bytes = max_bytes or DEFAULT_MAX_BYTES.get(size, 256 << 10)
        why_not = (
            f"{dtype} is not one of {SUPPORTED_DTYPES}"
            if dtype not in SUPPORTED_DTYPES
            else "this process already set up symmetric memory for an earlier group, and torch's "
            "rendezvous cannot pair it with fresh processes (one one-shot group per process)"
            if _rendezvous_started
            else None
        )
        if why_not is not None:
            log.warning("rank %d: one-shot all-reduce unavailable, using NCCL: %s", rank, why_not)
        if not _all_ranks(why_not is None, cpu_group):
            return None
        impl = None
        try:
            impl = cls(group, device, dtype, max_bytes, push_gemv, two_shot)
        except Exception as err:  # any failure means: use NCCL, and say why
            log.warning("one-shot all-reduce unavailable, using NCCL for every all-reduce: %s", err)
        if not _all_ranks(impl is not None, cpu_group) or impl is None:
            return None
        try:
            ok = impl._self_test(rank, size, timeout_s)
        except TimeoutError:
            raise  # a kernel still waits for a peer on this GPU: NCCL would queue behind it, so no fallback
        except Exception as err:
            log.warning("one-shot all-reduce self-test failed, using NCCL: %s", err)
            ok = False
        return impl if _all_ranks(ok, cpu_group) else None

    def _self_test(self, rank: int, size: int, timeout_s: float) -> bool:
        """A wrong P2P mapping gives silently wrong sums, so check one known sum before trusting it."""
        device = self.buffer.device
        x = torch.full((2, 2048), float(rank + 1), dtype=self.dtype, device=device)
        got = self(x)
        ones = torch.ones(2048, dtype=self.dtype, device=device)
        normed, summed = self.add_rmsnorm(x, torch.zeros_like(x), ones, 0.0)
        checks = [got, summed]
        if self.two_shot_buffer is not None:  # a message only the two-shot kernel takes
            checks.append(
                self(
                    torch.full(
                        (self.max_numel + size * 64,), float(rank + 1), dtype=self.dtype, device=device
                    )
                )
            )
        if self.slots is not None:  # y = 64 x (rank + 1) / 64 on every rank, exact in 16 bits
            row = torch.ones(1, 64, dtype=self.dtype, device=device)
            w = torch.full((2048, 64), (rank + 1) / 64, dtype=self.dtype, device=device)
            pushed_normed, pushed = self.pushed_add_rmsnorm(
                self.gemv_push(row, w, None), torch.zeros(1, 2048, dtype=self.dtype, device=device), ones, 0.0
            )
            checks.append(pushed)
            normed = torch.cat([normed, pushed_normed])
        from fuserve.parallel.process_group import wait_device  # process_group imports this module

        wait_device(device, "the one-shot all-reduce's self-test", timeout_s)
        total = size * (size + 1) / 2
        ok = all(bool((t == total).all()) for t in checks) and bool((normed == 1).all())
        if not ok:
            log.warning("one-shot all-reduce self-test gave wrong sums on rank %d", rank)
        return ok

    def reserve_two_shot(self, numel: int, cpu_group: Any, timeout_s: float = 60.0) -> bool:
        """Collective (every rank, same numel): a two-shot buffer for messages of up to `numel` elements,
        so that a step's largest all-reduce (a prefill's) runs over P2P rather than NCCL. Checked with
        one sum of the largest message before it is used; False (NCCL keeps them) where it summed wrong
        on any rank, or is not needed."""
        if not self.two_shot or numel <= self.two_shot_above:
            return False
        buf = self.two_shot_buffer
        if buf is not None and buf.numel() >= numel:
            return True
        device = self.buffer.device
        numel = -(-numel // (self.size * _ALIGN)) * self.size * _ALIGN  # every rank's part 16-byte aligned
        self.two_shot_buffer = _symmetric_buffer(numel, self.dtype, device, self.group)
        rank = dist.get_rank(self.group)
        x = torch.full((numel,), float(rank + 1), dtype=self.dtype, device=device)
        got = self(x)
        from fuserve.parallel.process_group import wait_device  # process_group imports this module

        wait_device(device, "the two-shot all-reduce's check", timeout_s)
        ok = bool((got == self.size * (self.size + 1) / 2).all())
        if not _all_ranks(ok, cpu_group):
            log.warning("two-shot all-reduce of %d elements summed wrong; NCCL keeps such messages", numel)
            self.two_shot_buffer = buf
            return False
        return True

    def fits(self, x: torch.Tensor) -> bool:
        return self._fits(x, self.max_numel) or self._fits_two_shot(x)

    def _fits(self, x: torch.Tensor, max_numel: int) -> bool:
        nbytes = x.numel() * x.element_size()
        return (
            x.dtype == self.dtype
            and x.is_cuda
            and 0 < x.numel() <= max_numel
            and x.is_contiguous()
            and nbytes % _ALIGN == 0
            and (x.storage_offset() * x.element_size()) % _ALIGN == 0
        )

    def _fits_two_shot(self, x: torch.Tensor) -> bool:
        """Each rank reduces one 16-byte-aligned Nth of the message."""
        buf = self.two_shot_buffer
        return (
            buf is not None
            and x.numel() > self.two_shot_above
            and self._fits(x, buf.numel())
            and (x.numel() * x.element_size()) % (self.size * _ALIGN) == 0
        )

    def two_shot_slot(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A [rows, cols] view of the two-shot buffer that a layer's GEMM writes its partial into, so the
        sum (`sum_in_slot`) needs no copy in; None where two-shot would not take that message."""
        buf = self.two_shot_buffer
        if buf is None or dtype != self.dtype or rows * cols > buf.numel():
            return None
        slot = buf[: rows * cols].view(rows, cols)
        return slot if self._fits_two_shot(slot) else None

    def sum_in_slot(self, slot: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of the partials in `two_shot_slot`'s view, in place and not copied out: it
        holds only until this group's next all-reduce, so its reader must come first on the stream."""
        assert self.two_shot_buffer is not None
        torch.ops.symm_mem.two_shot_all_reduce_(self.two_shot_buffer[: slot.numel()], "sum", self.group_name)
        return slot

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over ranks, as a new tensor (x is left as it was)."""
        if self._fits_two_shot(x):
            assert self.two_shot_buffer is not None
            return two_shot_sum(x, self.two_shot_buffer, self.group_name)
        return one_shot_sum(x, self.buffer, self.group_name)

    def fits_add_rmsnorm(self, x: torch.Tensor) -> bool:
        """Below four ranks only: from four on the two-shot kernel and a separate add + RMSNorm beat it."""
        return x.is_cuda and self.two_shot_above > 0 and not self._fits_two_shot(x) and self.push.fits(x)

    def timed_out_rank(self) -> int | None:
        return self.push.timed_out_rank

    def give_up_detail(self) -> str:
        return describe_give_up(self.push.status)

    def add_rmsnorm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        next_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of x over ranks added to residual and RMS-normed, in one kernel (all_reduce_rmsnorm.py),
        which pulls the start of `next_weight` into L2 while it waits for the peers (kernels.
        all_reduce_prefetch_mb)."""
        prefetch = weight_prefetch(next_weight, x.shape[0], switches().all_reduce_prefetch_bytes)
        return all_reduce_add_rmsnorm(x, residual, weight, eps, self.push, prefetch)

    def fits_gemv_push(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return self.slots is not None and x.is_cuda and self.slots.fits(x, weight)

    def gemv_push(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's partial x @ W^T (+ bias), pushed to the peers as it is computed (gemv_push.py)."""
        assert self.slots is not None
        return gemv_push.gemv_push(x, weight, bias, self.slots)

    def pushed_add_rmsnorm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_rmsnorm` for a partial that `gemv_push` made: the peers' parts are already on their way."""
        assert self.slots is not None
        return gemv_push.pushed_add_rmsnorm(partial, residual, weight, eps, self.slots)


def _symmetric_buffer(numel: int, dtype: torch.dtype, device: torch.device, group: Any) -> torch.Tensor:
    """A zeroed buffer every rank of `group` maps (collective: each rank calls it in the same order)."""
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(numel, dtype=dtype, device=device)
    buf.zero_()
    symm_mem.rendezvous(buf, group)
    return buf


def one_shot_sum(x: torch.Tensor, buffer: torch.Tensor, group_name: str) -> torch.Tensor:
    """torch's one-shot kernel through a symmetric `buffer` of at least x's size: a new tensor."""
    buf = buffer[: x.numel()].view(x.shape)
    return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group_name)


def two_shot_sum(x: torch.Tensor, buffer: torch.Tensor, group_name: str) -> torch.Tensor:
    """torch's two-shot kernel (in place in a symmetric `buffer`), copied out: the buffer is the next
    call's."""
    buf = buffer[: x.numel()]
    buf.copy_(x.view(-1))
    torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group_name)
    return buf.view(x.shape).clone()


def _all_ranks(flag: bool, cpu_group: Any) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group)
    return bool(t.item())
