"""silu_mul against its torch reference."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.silu_mul import silu_mul, silu_mul_ref

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
