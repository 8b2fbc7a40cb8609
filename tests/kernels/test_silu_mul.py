"""silu_mul against its torch reference."""

from __future__ import annotations

import pytest
import torch
from fp8_rows_check import assert_fp8_rows, assert_same_bytes

from fuserve.workers.kernels.silu_mul import silu_mul, silu_mul_fp8, silu_mul_fp8_ref, silu_mul_ref
from fuserve.workers.models.quant_scheme import quantize_per_token_fp8

# both compute silu(gate) * up in fp32 and round once; fp32 differs by the exp implementation only
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2e-3, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(
    ("num_tokens", "intermediate", "row_pad"), [(1, 16, 0), (5, 96, 0), (3, 1500, 40), (2, 2048, 0)]
)
def test_silu_mul_matches_ref(num_tokens: int, intermediate: int, row_pad: int, dtype: torch.dtype, device):
    # row_pad > 0: x is a column slice of a wider GEMM output (row stride > 2 * intermediate)
    x = (
        3
        * torch.randn(num_tokens, 2 * intermediate + row_pad, dtype=dtype, device=device)[
            :, : 2 * intermediate
        ]
    )
    out = silu_mul(x)
    assert out.shape == (num_tokens, intermediate) and out.dtype == dtype
    torch.testing.assert_close(out, silu_mul_ref(x), **TOLERANCE[dtype])


def test_silu_mul_is_close_to_the_unfused_model_math(device):
    """HF computes act(gate) * up in the model dtype; fusing only changes where bf16 rounding happens."""
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(x), torch.nn.functional.silu(gate) * up, rtol=3.2e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(
    ("num_tokens", "intermediate", "row_pad"),
    [(1, 16, 0), (2, 48, 8), (5, 96, 0), (3, 2500, 40), (2, 4096, 0)],
)
def test_silu_mul_fp8_out_quantizes_the_product_per_token(
    num_tokens: int, intermediate: int, row_pad: int, dtype: torch.dtype, device
):
    """Byte for byte quantize_per_token_fp8 of silu_mul's own output, within one e4m3 step of the torch
    reference: rows read once whole (16, 48 columns under the interpreter's one-pass limit, 48 with a
    masked tail) and rows of 1, 2 and 3 tiles walked twice. Row 0's product is all zeros."""
    x = 3 * torch.randn(num_tokens, 2 * intermediate + row_pad, dtype=dtype, device=device)
    x = x[:, : 2 * intermediate]
    x[0, :intermediate] = 0
    got = silu_mul_fp8(x)
    assert_same_bytes(got, quantize_per_token_fp8(silu_mul(x)))
    assert_fp8_rows(got, silu_mul_fp8_ref(x), dtype)
    assert not got[0][0].float().any()


def test_silu_mul_rejects_odd_width(device):
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_mul(torch.randn(2, 7, device=device))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("num_tokens", "intermediate"), [(4096, 14336), (7, 3584), (1, 28672)])
def test_silu_mul_large_gpu(num_tokens: int, intermediate: int, dtype: torch.dtype):
    x = torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device="cuda")
    torch.testing.assert_close(silu_mul(x), silu_mul_ref(x), **TOLERANCE[dtype])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("num_tokens", [16, 64, 4096])
def test_silu_mul_fp8_out_llama8b_shape_gpu(num_tokens: int):
    """Hopper, bf16, intermediate 14336 (the down projection's input): the compiled kernel's bytes."""
    x = 3 * torch.randn(num_tokens, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    got = silu_mul_fp8(x)
    assert_same_bytes(got, quantize_per_token_fp8(silu_mul(x)))
    assert_fp8_rows(got, silu_mul_fp8_ref(x), torch.bfloat16)
