"""gemv_rows against its torch reference (interpreted on the CPU, compiled on a GPU), and `linear`
taking it at the 8B's shapes on a GPU."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.gemv import linear
from fuserve.workers.kernels.gemv_rows import MAX_ROWS, gemv_rows, gemv_rows_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: same products, a different summation order; bf16/fp16: one rounding of an fp32 result
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m, n, k, bias",
    [(1, 9, 33, False), (2, 13, 70, True), (3, 37, 129, False), (5, 8, 64, True), (MAX_ROWS, 64, 200, True)],
)
def test_gemv_rows_matches_reference(dtype: torch.dtype, m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 100 + n)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    got = gemv_rows(x, w, b)
    want = gemv_rows_ref(x, w, b)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=RTOL[dtype], atol=RTOL[dtype] * k**0.5)


def test_gemv_rows_writes_into_a_given_buffer_and_refuses_what_it_cannot_take() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=g).to(DEVICE)
    w = torch.randn(24, 40, generator=g).to(DEVICE)
    for fn in (gemv_rows, gemv_rows_ref):
        buffer = torch.full((3 * 24 + 8,), float("nan"), device=DEVICE)
        got = fn(x, w, None, out=buffer[: 3 * 24].view(3, 24))
        assert got.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-4)
        assert torch.isnan(buffer[3 * 24 :]).all(), "wrote past the slot"
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv_rows(torch.zeros(MAX_ROWS + 1, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        gemv_rows(x, w.half())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [2, 5, 8])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (128256, 4096)])
def test_linear_takes_the_rows_gemv_at_llama3_8b_shapes(rows: int, n: int, k: int) -> None:
    from fuserve.workers.kernels.switches import KernelSwitches, using_switches

    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    want = gemv_rows_ref(x, w).float()
    torch.testing.assert_close(linear(x, w).float(), want, rtol=1.6e-2, atol=1e-2)
    with using_switches(KernelSwitches(gemv_rows=False)):  # cuBLAS: the same product
        torch.testing.assert_close(linear(x, w).float(), want, rtol=1.6e-2, atol=1e-2)
