"""Checks shared by the tests of the kernels with an fp8 output mode (RMSNorm, add+RMSNorm, SiLU·up):
e4m3 rows plus one fp32 scale per token, as `quantize_per_token_fp8` makes them."""

from __future__ import annotations

import torch

# the scale is the amax of model-dtype values / 448: kernel and reference differ by the model dtype's ulp
SCALE_TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-12},
    torch.float16: {"rtol": 2e-3, "atol": 1e-12},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-12},
}


def assert_fp8_rows(
    got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> None:
    """(q, scale) of a fused fp8 producer against its reference: each token's scale within the model
    dtype's rounding of the row amax, and each value within one e4m3 step (an ulp of the model dtype
    before the cast can move it across a rounding boundary; 2^-9 is e4m3's smallest subnormal)."""
    (q, scale), (q_ref, scale_ref) = got[:2], want[:2]
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape
    assert scale.dtype == torch.float32 and scale.shape == (q.shape[0], 1)
    torch.testing.assert_close(scale, scale_ref, **SCALE_TOLERANCE[dtype])
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0.125, atol=2**-9)


def assert_same_bytes(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`quantize_per_token_fp8` of the model-dtype output up to the division's rounding: on CUDA torch
    divides by a scalar through its reciprocal and the kernels round the division itself, so scales may
    be 1 ulp apart, and an element that x / scale puts on an e4m3 rounding boundary may land one step
    away (H100, 2026-11-26: equal bytes with scales 1 ulp apart in one run, a differing byte in another).
    Everywhere else the bytes are the same."""
    torch.testing.assert_close(got[1], want[1], rtol=2.0**-22, atol=0.0)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0.125, atol=2**-9)
    differ = (got[0].view(torch.uint8) != want[0].view(torch.uint8)).float().mean().item()
    assert differ <= 1e-3, f"{differ:.2%} of the e4m3 bytes differ"
