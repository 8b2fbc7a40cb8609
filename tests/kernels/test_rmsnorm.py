"""rmsnorm and fused_add_rmsnorm against their torch references (HF LlamaRMSNorm semantics)."""

from __future__ import annotations

import pytest
import torch
from fp8_rows_check import assert_fp8_rows, assert_same_bytes

from fuserve.workers.kernels.rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_fp8,
    fused_add_rmsnorm_fp8_ref,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_fp8,
    rmsnorm_fp8_ref,
    rmsnorm_ref,
)
from fuserve.workers.models.quant_scheme import quantize_per_token_fp8

# kernel and reference round at the same points; they differ only in the fp32 sum's order
# (at most one ulp of the output dtype)
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},
}
EPS = 1e-5
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(num_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, row_pad: int):
    """x with a row stride wider than `hidden` when row_pad > 0 (a column slice of a wider tensor)."""
    x = torch.randn(num_tokens, hidden + row_pad, dtype=dtype, device=device)[:, :hidden]
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "row_pad"), [(1, 64, 0), (7, 96, 0), (5, 200, 24), (3, 576, 0)]
)
def test_rmsnorm_matches_ref(
    num_tokens: int, hidden: int, row_pad: int, dtype: torch.dtype, device: torch.device
):
    x, _, weight = _inputs(num_tokens, hidden, dtype, device, row_pad)
    out = rmsnorm(x, weight, EPS)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    torch.testing.assert_close(out, rmsnorm_ref(x, weight, EPS), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(("num_tokens", "hidden", "row_pad"), [(1, 64, 0), (6, 200, 8), (3, 576, 0)])
def test_fused_add_rmsnorm_matches_ref(
    num_tokens: int, hidden: int, row_pad: int, dtype: torch.dtype, device: torch.device
):
    x, residual, weight = _inputs(num_tokens, hidden, dtype, device, row_pad)
    normed, new_residual = fused_add_rmsnorm(x, residual, weight, EPS)
    normed_ref, new_residual_ref = fused_add_rmsnorm_ref(x, residual, weight, EPS)
    torch.testing.assert_close(new_residual, new_residual_ref, rtol=0, atol=0)  # one rounding, both sides
    torch.testing.assert_close(normed, normed_ref, **TOLERANCE[dtype])


def test_rmsnorm_matches_hf_formula_in_bf16(device: torch.device):
    """The rounding points are HF LlamaRMSNorm's: weight * (x.float() normalised).to(bf16)."""
    x, _, weight = _inputs(4, 128, torch.bfloat16, device, 0)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    torch.testing.assert_close(
        rmsnorm(x, weight, EPS), weight * h.to(torch.bfloat16), **TOLERANCE[torch.bfloat16]
    )


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(("num_tokens", "hidden", "row_pad"), [(1, 64, 0), (6, 200, 8), (3, 576, 0)])
def test_rmsnorm_fp8_out_quantizes_the_normed_rows_per_token(
    num_tokens: int, hidden: int, row_pad: int, dtype: torch.dtype, device: torch.device
):
    """The fp8 mode writes what the model-dtype mode writes, quantized per token in the same pass: byte
    for byte against quantize_per_token_fp8 of the kernel's own model-dtype output (same fp32 sum order),
    and within one e4m3 step of the torch reference. Row 0 is all zeros (scale 1e-12 / 448, q = 0)."""
    x, residual, weight = _inputs(num_tokens, hidden, dtype, device, row_pad)
    x[0] = 0
    got = rmsnorm_fp8(x, weight, EPS)
    assert_same_bytes(got, quantize_per_token_fp8(rmsnorm(x, weight, EPS)))
    assert_fp8_rows(got, rmsnorm_fp8_ref(x, weight, EPS), dtype)
    assert not got[0][0].float().any() and got[1][0].item() == pytest.approx(1e-12 / 448)

    residual[0] = 0
    q, scale, new_residual = fused_add_rmsnorm_fp8(x, residual, weight, EPS)
    normed, new_residual_unfused = fused_add_rmsnorm(x, residual, weight, EPS)
    assert torch.equal(new_residual, new_residual_unfused)
    assert_same_bytes((q, scale), quantize_per_token_fp8(normed))
    want = fused_add_rmsnorm_fp8_ref(x, residual, weight, EPS)
    assert_fp8_rows((q, scale), want, dtype)
    torch.testing.assert_close(new_residual, want[2], rtol=0, atol=0)


def test_rmsnorm_rejects_mismatched_weight(device: torch.device):
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm(x, torch.ones(32, device=device), EPS)
    with pytest.raises(TypeError, match="dtype"):
        rmsnorm(x, torch.ones(64, device=device, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rmsnorm(x.t(), torch.ones(2, device=device), EPS)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("num_tokens", "hidden"), [(4096, 4096), (257, 8192), (3, 5120)])
def test_fused_add_rmsnorm_large_gpu(num_tokens: int, hidden: int, dtype: torch.dtype):
    x, residual, weight = _inputs(num_tokens, hidden, dtype, torch.device("cuda"), 0)
    normed, new_residual = fused_add_rmsnorm(x, residual, weight, EPS)
    normed_ref, new_residual_ref = fused_add_rmsnorm_ref(x, residual, weight, EPS)
    torch.testing.assert_close(new_residual, new_residual_ref, rtol=0, atol=0)
    torch.testing.assert_close(normed, normed_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(rmsnorm(x, weight, EPS), rmsnorm_ref(x, weight, EPS), **TOLERANCE[dtype])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("num_tokens", [16, 64, 4096])
def test_rmsnorm_fp8_out_llama8b_shape_gpu(num_tokens: int):
    """Hopper, bf16, hidden 4096 (the W8A8 layers' input): the compiled kernel's bytes and scales."""
    x, residual, weight = _inputs(num_tokens, 4096, torch.bfloat16, torch.device("cuda"), 0)
    got = rmsnorm_fp8(x, weight, EPS)
    assert_same_bytes(got, quantize_per_token_fp8(rmsnorm(x, weight, EPS)))
    assert_fp8_rows(got, rmsnorm_fp8_ref(x, weight, EPS), torch.bfloat16)
    q, scale, new_residual = fused_add_rmsnorm_fp8(x, residual, weight, EPS)
    normed, _ = fused_add_rmsnorm(x, residual, weight, EPS)
    assert_same_bytes((q, scale), quantize_per_token_fp8(normed))
    assert_fp8_rows((q, scale), fused_add_rmsnorm_fp8_ref(x, residual, weight, EPS), torch.bfloat16)
