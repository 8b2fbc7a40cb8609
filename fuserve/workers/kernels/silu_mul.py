"""SiLU-gated product of the MLP: `silu(gate) * up` from the fused gate/up projection.

The gate and up projections run as one GEMM whose output row is [gate (I) | up (I)]. Unfused, the
activation writes silu(gate) out and the product reads it back; here one pass reads both halves
and writes the product:

    x[t, :I] ──silu (fp32)──┐
                            ├─ * ──► out[t] (x.dtype)        [T, I]
    x[t, I:] ───────────────┘

Grid: (tokens, column blocks of the intermediate size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait


@triton.jit
def _silu_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    intermediate_size,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * intermediate_size + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] (last dim contiguous) -> silu(x[:, :I]) * x[:, I:] as a new [T, I] of x.dtype."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be 2-D [tokens, 2 * intermediate], got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x must have a contiguous last dimension, got strides {x.stride()}")
    num_tokens, intermediate_size = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, intermediate_size), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or intermediate_size == 0:
        return out
    block = min(1024, triton.next_power_of_2(intermediate_size))
    grid = (num_tokens, triton.cdiv(intermediate_size, block))
    use_pdl = pdl_enabled(x)
    _silu_mul_kernel[grid](
        x_ptr=x,
        out_ptr=out,
        stride_x=x.stride(0),
        intermediate_size=intermediate_size,
        BLOCK=block,
        USE_PDL=use_pdl,
        num_warps=4,
        launch_pdl=use_pdl,
    )
    return out


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch `silu_mul`."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)
