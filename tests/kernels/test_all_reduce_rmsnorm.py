"""The fused all-reduce + add + RMSNorm kernel, two ranks simulated in one process.

Both ranks' buffers are plain tensors of this device, and the ranks run one after the other: rank 1
first, with rank 0's push for this epoch written into its buffer by the test (as rank 0's kernel would),
then rank 0, which must find rank 1's real push and flag. Across epochs this covers the counters, both
buffer slots, the flags, the summation order (both ranks' outputs must be bit-identical) and the math
against the torch reference. The real cross-GPU run is in tests/parallel_gpu_checks.py.
"""

from __future__ import annotations

import pytest
import torch

from fuserve.parallel.all_reduce_rmsnorm import (
    MAX_ROWS,
    NUM_SLOTS,
    PushBuffers,
    all_reduce_add_rmsnorm,
    all_reduce_add_rmsnorm_ref,
    describe_give_up,
    prefetch_row_bytes,
    slot,
    weight_prefetch,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5


Tensors = list[torch.Tensor]


def _two_ranks(dtype: torch.dtype, slot_numel: int) -> tuple[list[PushBuffers], Tensors, Tensors]:
    data = [torch.zeros(NUM_SLOTS * 2 * slot_numel, dtype=dtype, device=DEVICE) for _ in range(2)]
    flags = [torch.zeros(2 * MAX_ROWS, dtype=torch.int32, device=DEVICE) for _ in range(2)]
    data_ptrs = torch.tensor([d.data_ptr() for d in data], dtype=torch.int64, device=DEVICE)
    flag_ptrs = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64, device=DEVICE)
    bufs = [
        PushBuffers(
            rank=r,
            world=2,
            dtype=dtype,
            data_ptrs=data_ptrs,
            flag_ptrs=flag_ptrs,
            counters=torch.zeros(MAX_ROWS, dtype=torch.int32, device=DEVICE),
            slot_numel=slot_numel,
        )
        for r in range(2)
    ]
    return bufs, data, flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_ranks_agree_and_match_reference(dtype: torch.dtype) -> None:
    hidden, slot_numel = 48, 8 * 64
    bufs, data, flags = _two_ranks(dtype, slot_numel)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    epochs = [0] * MAX_ROWS
    for step, rows in enumerate([3, 3, 1, 5, 2, 3, 3]):  # row 0: epochs 1-7, each slot 3+ times
        g = torch.Generator(device="cpu").manual_seed(step)
        parts = [torch.randn(rows, hidden, generator=g).to(DEVICE, dtype) for _ in range(2)]
        residual = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
        for r in range(rows):
            epochs[r] += 1

        for r in range(rows):  # what rank 0's kernel would have pushed to rank 1 for this epoch
            slot(data[1], bufs[1], epochs[r], 0, rows, hidden)[r].copy_(parts[0][r])
            flags[1][r] = epochs[r]  # flags[1][src=0][row]
        out1, res1 = all_reduce_add_rmsnorm(parts[1], residual, weight, EPS, bufs[1])
        for r in range(rows):  # rank 1 pushed its partial to rank 0 (and raised rank 0's flag)
            assert torch.equal(slot(data[0], bufs[0], epochs[r], 1, rows, hidden)[r], parts[1][r])
            assert int(flags[0][MAX_ROWS + r]) == epochs[r]  # flags[0][src=1][row]
        out0, res0 = all_reduce_add_rmsnorm(parts[0], residual, weight, EPS, bufs[0])
        for r in range(rows):
            assert torch.equal(slot(data[1], bufs[1], epochs[r], 0, rows, hidden)[r], parts[0][r])

        assert torch.equal(out0, out1) and torch.equal(res0, res1), "ranks must sum bit-identically"
        want_out, want_res = all_reduce_add_rmsnorm_ref(parts, residual, weight, EPS)
        tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(res0, want_res, **tol)
        torch.testing.assert_close(out0, want_out, **tol)
        assert torch.equal(bufs[0].counters[:rows], bufs[1].counters[:rows])
        assert bufs[0].counters[:rows].tolist() == epochs[:rows]


def test_refuses_what_does_not_fit() -> None:
    bufs, data, flags = _two_ranks(torch.float32, 64)  # named: the pointer tables must not dangle
    x = torch.zeros(2, 48, device=DEVICE)
    assert not bufs[0].fits(x)  # 96 elements > 64
    assert not bufs[0].fits(torch.zeros(1, 48, dtype=torch.float16, device=DEVICE))
    assert bufs[0].fits(torch.zeros(1, 48, device=DEVICE))
    with pytest.raises(ValueError, match="does not fit"):
        all_reduce_add_rmsnorm(x, x, torch.ones(48, device=DEVICE), EPS, bufs[0])


def test_a_peer_that_never_comes_ends_the_wait() -> None:
    """A dead peer must not hang the GPU: after max_spins polls the kernel gives up, names the peer in
    the host-visible status word and poisons the row (NaN) instead of returning a partial sum."""
    hidden = 16
    # named, not `_, _`: a rebound `_` would free the data buffers whose addresses the kernel writes to
    bufs, data, flags = _two_ranks(torch.float32, 4 * hidden)
    bufs[0].max_spins = 8
    assert bufs[0].timed_out_rank is None
    x = torch.randn(2, hidden, device=DEVICE)
    out, res = all_reduce_add_rmsnorm(x, torch.zeros_like(x), torch.ones(hidden, device=DEVICE), EPS, bufs[0])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert bufs[0].timed_out_rank == 1
    assert out.isnan().all() and res.isnan().all()
    src, row, epoch, seen = bufs[0].status.tolist()  # the first program to give up wrote them
    assert (src, epoch, seen) == (2, 1, 0) and row in (0, 1)
    assert describe_give_up(bufs[0].status) == f"row {row}, this rank's call 1 for it, the peer's last 0 " + (
        "(one call behind: slow, stuck elsewhere or gone)"
    )
    if DEVICE.type == "cuda":  # what one poll costs, for MAX_SPINS's comment
        import time

        bufs[0].max_spins = 1 << 20
        t0 = time.perf_counter()
        all_reduce_add_rmsnorm(x, torch.zeros_like(x), torch.ones(hidden, device=DEVICE), EPS, bufs[0])
        torch.cuda.synchronize()
        print(f"{(time.perf_counter() - t0) / (1 << 20) * 1e9:.0f} ns per poll of a flag")


def test_a_give_up_tells_calls_that_parted() -> None:
    """A peer whose last flag for the row is more than one call back did not lag: the ranks' call
    counts parted (a bug), and the error says so."""
    hidden = 16
    bufs, data, flags = _two_ranks(torch.float32, 4 * hidden)
    bufs[0].max_spins = 8
    bufs[0].counters[0] = 2  # this rank's 3rd call for row 0 ...
    flags[0][MAX_ROWS + 0] = 1  # ... where rank 1 published its 1st
    x = torch.randn(1, hidden, device=DEVICE)
    all_reduce_add_rmsnorm(x, torch.zeros_like(x), torch.ones(hidden, device=DEVICE), EPS, bufs[0])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert bufs[0].status.tolist() == [2, 0, 3, 1]
    assert describe_give_up(bufs[0].status).endswith("(the ranks' calls parted)")
    assert describe_give_up(torch.zeros(4, dtype=torch.int32)) == ""


def test_the_next_weights_prefetch_takes_whole_lines_within_the_budget() -> None:
    """Bytes of each row of the next layer's weight that the fused kernel asks L2 for: the budget over
    the rows in whole 128-byte lines, at least one line, never past the row."""
    # Llama-3-8B gate_up at TP=2: 14,336 rows of 8 KiB; 16 MiB is 1,170 bytes a row -> 9 lines
    assert prefetch_row_bytes(14336, 8192, 16 << 20) == 9 * 128
    assert prefetch_row_bytes(1024, 8192, 1 << 30) == 8192  # capped at the row
    assert prefetch_row_bytes(1 << 20, 8192, 1 << 20) == 128  # at least one line
    w = torch.zeros(64, 32, dtype=torch.bfloat16)
    # the CPU (and the interpreter) cannot prefetch; one row is the GEMV's, which prefetches itself
    assert weight_prefetch(w, 64, 1 << 20) is None
    assert weight_prefetch(None, 64, 1 << 20) is None
