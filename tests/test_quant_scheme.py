"""Per-channel 8-bit quantization round trips, within the bounds the formats allow."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.quant_linear import FP8_ACT_MIN_ROWS, quant_linear_ref
from fuserve.workers.models.quant_scheme import (
    SCHEMES,
    dequantize_rows,
    quantize_per_token_fp8,
    quantize_rows,
    scheme_for,
)


def test_int8_round_trip_within_half_a_step() -> None:
    w = torch.randn(64, 300) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(w, SCHEMES["int8-wo"])
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert q.abs().amax(dim=1).eq(127).all()  # every row uses the full range
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("name", ["fp8-wo", "fp8"])
def test_fp8_round_trip_within_e4m3_precision(name: str) -> None:
    w = torch.randn(64, 300) * torch.logspace(-3, 1, 64)[:, None]
    q, scale = quantize_rows(w, SCHEMES[name])
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize_rows(q, scale)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, an absolute floor below
    bound = w.abs() * 2**-4 + scale[:, None] * 2**-9
    assert ((back - w).abs() <= bound).all()


def test_zero_row_stays_finite_and_quantizing_is_row_local() -> None:
    w = torch.randn(6, 40)
    w[2] = 0
    q, scale = quantize_rows(w, SCHEMES["int8-wo"])
    assert torch.isfinite(dequantize_rows(q, scale)).all() and (dequantize_rows(q, scale)[2] == 0).all()
    # the fused weight quantizes as its pieces do: the loader may quantize each checkpoint slice
    q_top, s_top = quantize_rows(w[:4], SCHEMES["int8-wo"])
    assert torch.equal(q_top, q[:4]) and torch.equal(s_top, scale[:4])


def test_per_token_activation_quantization() -> None:
    x = torch.randn(5, 64) * torch.tensor([0.01, 1, 10, 100, 1000])[:, None]
    xq, xs = quantize_per_token_fp8(x)
    assert xs.shape == (5, 1)
    assert ((xq.float() * xs - x).abs() <= x.abs() * 2**-4 + xs * 2**-9).all()


def test_fp8_scheme_quantizes_activations_only_from_min_rows() -> None:
    s = SCHEMES["fp8"]
    g = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(32, 64, generator=g), s)
    x = torch.randn(FP8_ACT_MIN_ROWS, 64, generator=g)
    w8a8 = quant_linear_ref(x, q, scale, None, True)
    w8a16 = quant_linear_ref(x, q, scale, None, False)
    assert not torch.equal(w8a8, w8a16)  # the activations' e4m3 rounding shows
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4 per activation): a few percent on the whole,
    # while single outputs near zero may differ by more than any per-element tolerance
    assert (w8a8 - w8a16).norm() <= 0.05 * w8a16.norm()
    one = x[:1]
    one_row = [quant_linear_ref(one, q, scale, None, act) for act in (True, False)]
    assert torch.equal(*one_row)


def test_unknown_scheme_names_the_choices() -> None:
    assert scheme_for("none") is None
    with pytest.raises(ValueError, match="int8-wo"):
        scheme_for("int4")
