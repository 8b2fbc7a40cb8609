"""The CPU's linear layer: oneDNN's fp32 matmul instead of the BLAS call `F.linear` makes.

On the CPU box (AMD EPYC, one thread, torch's MKL), `F.linear` with a few rows costs far more than
with one: MKL's sgemm for M = 2-3 rows reads the weights at about half the speed of its gemv for
M = 1. SmolLM2-135M's 30 layers cost 39 ms of linears for 1 row and 67-70 ms for 2-3 rows, and its LM
head 10 ms for 1 row and 23-37 ms for 2-3. That is the cost of a speculative verify step of 1 + k rows
beyond a decode step (benchmarks/NOTES.md, "Why a verify step costs more than a decode step on the
CPU"). oneDNN's matmul reads the weights once whatever the row count: 34 / 41 / 43 / 46 / 51 ms for
M = 1..5 over the layers, 8.3 / 10.7 / 11.1 / 11.8 / 13.8 ms for the head. It is also faster at M = 1.

Same math, other rounding: results differ from `F.linear` by a few ulp of fp32 (|diff| ~1e-6 on
logits of ~1), as two BLAS libraries do. Anything but a 2-D fp32 CPU input with a contiguous weight, or
a build without oneDNN, goes to `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N]; copied into `out` when given (gemv.linear's
    contract, which writes there directly)."""
    if (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] > 0
        and x.dtype == weight.dtype == torch.float32
        and weight.is_contiguous()
    ):
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    else:
        y = F.linear(x, weight, bias)
    return y if out is None else out.copy_(y)
