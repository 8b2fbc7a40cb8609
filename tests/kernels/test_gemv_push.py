"""The GEMV that pushes its partial to the peers, and the kernel that sums it: two ranks in one process.

Both ranks' receive slots are plain tensors of this device. Per call both ranks run their GEMV first
(each pushing into the other's slot), then both sum: the order of a real run whose ranks are in step.
Across calls this covers the counter, both slots, putting the empty marks back, zeros in the partial,
the summation order (both ranks' outputs must be bit-identical) and the math against the torch
reference. The cross-GPU run is in tests/parallel_gpu_checks.py.
"""

from __future__ import annotations

import pytest
import torch

from fuserve.parallel.all_reduce_rmsnorm import describe_give_up, give_up_status
from fuserve.parallel.gemv_push import (
    EMPTY_BITS,
    MAX_HIDDEN,
    NUM_SLOTS,
    PushSlots,
    empty_slots,
    gemv_push,
    pushed_add_rmsnorm,
)
from fuserve.workers.kernels.gemv import gemv_ref
from fuserve.workers.kernels.rmsnorm import fused_add_rmsnorm_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5
DTYPE = torch.bfloat16


def _two_ranks(max_spins: int = 1 << 20) -> tuple[list[PushSlots], list[torch.Tensor]]:
    bufs = [empty_slots(NUM_SLOTS * 2 * MAX_HIDDEN, DTYPE, DEVICE) for _ in range(2)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEVICE)
    status = give_up_status()
    slots = [
        PushSlots(
            rank=r,
            world=2,
            dtype=DTYPE,
            slot_ptrs=ptrs,
            counter=torch.zeros(1, dtype=torch.int32, device=DEVICE),
            status=status,
            max_spins=max_spins,
        )
        for r in range(2)
    ]
    return slots, bufs


def _all_empty(buf: torch.Tensor) -> bool:
    return bool((buf.view(torch.int16) == EMPTY_BITS).all())


def test_two_ranks_agree_and_match_reference() -> None:
    hidden, k = 40, 24
    slots, bufs = _two_ranks()
    norm_weight = (1 + 0.1 * torch.randn(hidden)).to(DEVICE, DTYPE)
    for call in range(5):  # each slot used 2-3 times
        g = torch.Generator().manual_seed(call)
        xs = [torch.randn(1, k, generator=g).to(DEVICE, DTYPE) for _ in range(2)]
        ws = [torch.randn(hidden, k, generator=g).to(DEVICE, DTYPE) for _ in range(2)]
        ws[1][3] = 0  # a row of zeros: a zero partial must still arrive
        bias = torch.randn(hidden, generator=g).to(DEVICE, DTYPE)
        residual = torch.randn(1, hidden, generator=g).to(DEVICE, DTYPE)
        biases = [bias, None]  # a row-parallel bias joins rank 0's part only
        parts = [gemv_push(xs[r], ws[r], biases[r], slots[r]) for r in range(2)]
        for r in range(2):
            assert torch.equal(parts[r], gemv_ref(xs[r], ws[r], biases[r]))
        assert not _all_empty(bufs[0]) and not _all_empty(bufs[1])
        outs = [pushed_add_rmsnorm(parts[r], residual, norm_weight, EPS, slots[r]) for r in range(2)]
        assert _all_empty(bufs[0]) and _all_empty(bufs[1]), "a summed slot must be marked empty again"
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        total = (parts[0].float() + parts[1].float()).to(DTYPE)
        want_out, want_res = fused_add_rmsnorm_ref(total, residual, norm_weight, EPS)
        torch.testing.assert_close(outs[0][1], want_res, rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(outs[0][0], want_out, rtol=1.6e-2, atol=1e-2)
        assert [int(s.counter) for s in slots] == [call + 1, call + 1]
    assert slots[0].status[0] == 0


def test_a_peer_that_never_pushes_ends_the_wait() -> None:
    """After max_spins polls of an empty slot the sum gives up, names the peer in the status word and
    poisons the row (NaN), as the flag protocol of all_reduce_rmsnorm.py does."""
    hidden = 16
    slots, bufs = _two_ranks(max_spins=8)  # bufs named: the kernel writes to their addresses
    x = torch.randn(1, 8, device=DEVICE, dtype=DTYPE)
    part = gemv_push(x, torch.randn(hidden, 8, device=DEVICE, dtype=DTYPE), None, slots[0])
    out, res = pushed_add_rmsnorm(part, torch.zeros_like(part), torch.ones_like(part[0]), EPS, slots[0])
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert int(slots[0].status[0]) == 2  # 1 + rank 1
    assert out.isnan().all() and res.isnan().all()
    assert slots[0].status.tolist()[2:] == [1, -hidden]  # its first call; every value missing
    want = f"GEMV push call 1: {hidden} values of the peer's partial never arrived"
    assert describe_give_up(slots[0].status) == want


def test_refuses_what_does_not_fit() -> None:
    slots, bufs = _two_ranks()
    w = torch.zeros(8, 4, device=DEVICE, dtype=DTYPE)
    assert slots[0].fits(torch.zeros(1, 4, device=DEVICE, dtype=DTYPE), w)
    assert not slots[0].fits(torch.zeros(2, 4, device=DEVICE, dtype=DTYPE), w)  # one row only
    assert not slots[0].fits(torch.zeros(1, 4, device=DEVICE), w.float())  # 16-bit only
    too_wide = torch.zeros(MAX_HIDDEN + 1, 4, device=DEVICE, dtype=DTYPE)
    assert not slots[0].fits(torch.zeros(1, 4, device=DEVICE, dtype=DTYPE), too_wide)
    with pytest.raises(ValueError, match="use gemv"):
        gemv_push(torch.zeros(2, 4, device=DEVICE, dtype=DTYPE), w, None, slots[0])
