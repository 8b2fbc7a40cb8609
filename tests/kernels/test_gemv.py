from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels import cpu_linear
from fuserve.workers.kernels.gemv import gemv, gemv_ref, linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: same products, a different summation order; bf16: one rounding of an fp32 result.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, bias", [(1, 1, False), (13, 70, True), (64, 200, False), (37, 129, True)])
def test_gemv_matches_reference(dtype: torch.dtype, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    got = gemv(x, w, b)
    want = gemv_ref(x, w, b)
    assert got.shape == (1, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=RTOL[dtype], atol=RTOL[dtype] * k**0.5)


def test_gemv_rejects_more_than_one_row() -> None:
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
def test_gemv_llama3_8b_shapes(n: int, k: int) -> None:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    torch.testing.assert_close(linear(x, w).float(), gemv_ref(x, w).float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_linear_writes_into_a_given_buffer(rows: int, kernels: str) -> None:
    """`out` (a view of a larger buffer, as the two-shot all-reduce's slot is) takes the result in place:
    the GEMV's for one row, the matmul's for more; the reference ops' linear copies into it."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 40, generator=g).to(DEVICE)
    w = torch.randn(24, 40, generator=g).to(DEVICE)
    buffer = torch.full((rows * 24 + 8,), float("nan"), device=DEVICE)
    slot = buffer[: rows * 24].view(rows, 24)
    if kernels == "reference":
        got = cpu_linear.linear(x, w, None, out=slot)
    else:
        got = gemv(x, w, None, out=slot) if rows == 1 else linear(x, w, None, out=slot)
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer[: rows * 24].view(rows, 24), x @ w.t(), rtol=1e-5, atol=1e-4)
    assert torch.isnan(buffer[rows * 24 :]).all(), "wrote past the slot"
