"""Per-token FP8 quantization of activations in one kernel: x [M, K] -> e4m3 [M, K] + fp32 scale [M, 1].

The FP8 W8A8 layers whose input no fused producer quantizes (o_proj, after attention) need
`quantize_per_token_fp8(x)`; in torch that is eight kernels (casts to fp32, abs, amax, clamp, two
divisions, clamp, cast) with fp32 intermediates, ~20 us per layer at batch 64 under a CUDA graph.
Here one program per token walks its row twice in BLOCK-wide tiles, first for the amax, then to
store the e4m3 values (the second walk re-reads the row from L2), exactly as the reference rounds:

    pass 1: x[t] tiles ──fp32 |max|──► scale[t] = max(amax, 1e-12) / 448          (fp32)
    pass 2: x[t] tiles ──/ scale[t], clamp ±448──► e4m3 q[t]                      [M, K]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.models.quant_scheme import FP8_MAX, quantize_per_token_fp8

_E4M3_MAX: tl.constexpr = tl.constexpr(FP8_MAX)  # a kernel reads module globals only as constexpr


@triton.jit
def _quantize_rows_fp8_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    stride_x,
    K,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + offs
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # IEEE divisions (Triton's `/` is approximate), so the bytes are those of quantize_per_token_fp8
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), _E4M3_MAX)
    for start in range(0, K, BLOCK):
        cols = start + offs
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.clamp(tl.div_rn(x, tl.broadcast_to(scale, x.shape)), -_E4M3_MAX, _E4M3_MAX)
        tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token_fp8(x)` in one kernel: x [M, K] (last dim contiguous) -> (q [M, K] e4m3,
    scale [M, 1] fp32)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with a contiguous last dimension, got {tuple(x.shape)} {x.stride()}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if k == 0:
        raise ValueError("x has no columns: there is nothing to quantize")
    use_pdl = pdl_enabled(x)
    _quantize_rows_fp8_kernel[(m,)](
        x_ptr=x,
        q_ptr=q,
        scale_ptr=scale,
        stride_x=x.stride(0),
        K=k,
        BLOCK=min(2048, triton.next_power_of_2(k)),
        USE_PDL=use_pdl,
        num_warps=8,
        launch_pdl=use_pdl,
    )
    return q, scale


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the W8A8 scheme's own per-token quantization."""
    return quantize_per_token_fp8(x)
