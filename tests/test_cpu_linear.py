"""The CPU linear (oneDNN) computes F.linear's result to fp32 rounding for the row counts a decode or
verify step has, with and without bias, and hands other inputs (3-D, bf16, empty, strided weights) to
F.linear unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fuserve.workers.kernels.cpu_linear import linear


@pytest.mark.parametrize("m", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(m: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=gen)
    w = torch.randn(200, 96, generator=gen) * 0.1
    b = torch.randn(200, generator=gen) if with_bias else None
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_other_inputs_take_f_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen)
    x3 = torch.randn(2, 3, 24, generator=gen)
    assert torch.equal(linear(x3, w), F.linear(x3, w))
    xb, wb = x3[0].bfloat16(), w.bfloat16()
    assert torch.equal(linear(xb, wb), F.linear(xb, wb))
    assert linear(torch.empty(0, 24), w).shape == (0, 40)
    wt = torch.randn(24, 40, generator=gen).t()  # not contiguous
    assert torch.equal(linear(x3[0], wt), F.linear(x3[0], wt))
