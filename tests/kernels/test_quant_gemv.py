"""The 8-bit-weight GEMV and GEMM against their torch references (interpreter on CPU, the GPU if any)."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.quant_gemm import quant_gemm, quant_gemm_ref
from fuserve.workers.kernels.quant_gemv import quant_gemv, quant_gemv_ref
from fuserve.workers.models.quant_scheme import SCHEMES, quantize_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: same products, another summation order; fp16/bf16: one rounding of an fp32 result.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
WEIGHT_SCHEMES = ["int8-wo", "fp8-wo"]


def _operands(m: int, n: int, k: int, scheme: str, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    q, scale = quantize_rows(torch.randn(n, k, generator=g) * 0.05, SCHEMES[scheme])
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, q.to(DEVICE), scale.to(DEVICE), b


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, bias", [(1, 1, False), (13, 70, True), (37, 129, False)])
def test_quant_gemv_matches_reference(scheme: str, dtype: torch.dtype, n: int, k: int, bias: bool) -> None:
    x, q, scale, b = _operands(1, n, k, scheme, dtype, bias, seed=n * 1000 + k)
    got = quant_gemv(x, q, scale, b)
    want = quant_gemv_ref(x, q, scale, b)
    assert got.shape == (1, n) and got.dtype == dtype
    tol = RTOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * k**0.5 * 0.05)


# tl.dot in bf16 is wrong in the interpreter: fp16 and fp32 there, bf16 on a GPU too
GEMM_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("m, n, k, bias", [(2, 5, 7, False), (17, 33, 40, True), (3, 16, 96, False)])
def test_quant_gemm_matches_reference(
    scheme: str, dtype: torch.dtype, m: int, n: int, k: int, bias: bool
) -> None:
    x, q, scale, b = _operands(m, n, k, scheme, dtype, bias, seed=m * 7 + n * 1000 + k)
    got = quant_gemm(x, q, scale, b)
    want = quant_gemm_ref(x, q, scale, b)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = RTOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * k**0.5 * 0.05)


def test_quant_kernels_refuse_unquantized_weights() -> None:
    x = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="int8 or float8"):
        quant_gemv(x, torch.zeros(4, 8, device=DEVICE), torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        quant_gemv(
            torch.zeros(2, 8, device=DEVICE),
            torch.zeros(4, 8, dtype=torch.int8, device=DEVICE),
            torch.ones(4, device=DEVICE),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["int8-wo", "fp8-wo", "fp8"])
@pytest.mark.parametrize("m", [1, 4, 64, 256])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_quant_linear_llama3_8b_shapes(scheme: str, m: int, n: int, k: int) -> None:
    """On the GPU at full size: every dispatch path (GEMV, dequant GEMM, _scaled_mm) against the float
    product of the dequantized weight; fp8 W8A8 also carries the activations' e4m3 rounding."""
    from fuserve.workers.kernels.quant_linear import quant_linear, quant_linear_ref

    s = SCHEMES[scheme]
    w = torch.randn(n, k, device="cuda") * 0.02
    q, scale = quantize_rows(w, s)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = quant_linear(x, q, scale, None, s.quantize_activations).float()
    want = quant_linear_ref(x, q, scale, None, s.quantize_activations).float()
    exact = x.float() @ (q.float() * scale[:, None]).t()
    error = ((got - exact).norm() / exact.norm()).item()
    assert error < (0.05 if s.quantize_activations else 0.01)
    if not s.quantize_activations:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        return
    # W8A8: the kernels' and the reference's per-token e4m3 rounding may differ on an activation that
    # sits on a rounding boundary (the scales can be an ulp apart), which moves an output by up to a
    # few bf16 ulps (0.1 at |y| ~ 12 on an H100, 2026-11-27): a few elements, never the error as a whole
    outside = ((got - want).abs() > 2e-2 + 2e-2 * want.abs()).float().mean().item()
    assert outside < 0.01, f"{outside:.4f} of the outputs differ from the reference's"
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()
    assert error < 1.01 * ((want - exact).norm() / exact.norm()).item()
