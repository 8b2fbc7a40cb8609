"""quantize_rows_fp8 (the per-token FP8 quantization of an FP8 W8A8 layer's own input) against
quantize_per_token_fp8: the same e4m3 bytes and fp32 scales."""

from __future__ import annotations

import pytest
import torch
from fp8_rows_check import assert_same_bytes

from fuserve.workers.kernels.fp8_rows import quantize_rows_fp8, quantize_rows_fp8_ref

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "k", "row_pad"), [(1, 16, 0), (5, 200, 8), (3, 4500, 0)])
def test_quantize_rows_fp8_matches_ref(rows: int, k: int, row_pad: int, dtype: torch.dtype, device):
    """Rows of 1 to 3 tiles, a row stride wider than K, values past e4m3's normal range at both ends
    (x 1e3 and x 1e-3 rows), and an all-zero row (scale 1e-12 / 448, q = 0)."""
    x = torch.randn(rows, k + row_pad, dtype=dtype, device=device)[:, :k]
    x[0] = 0
    if rows > 2:
        x[1] *= 1e3
        x[2] *= 1e-3
    got = quantize_rows_fp8(x)
    assert got[0].dtype == torch.float8_e4m3fn and got[1].shape == (rows, 1)
    assert_same_bytes(got, quantize_rows_fp8_ref(x))
    assert not got[0][0].float().any()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("rows", [16, 64, 4096])
def test_quantize_rows_fp8_llama8b_shape_gpu(rows: int):
    """Hopper, bf16, K 4096 (o_proj's input, the attention output)."""
    x = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda")
    assert_same_bytes(quantize_rows_fp8(x), quantize_rows_fp8_ref(x))
