"""SiLU-gated product of the MLP: `silu(gate) * up` from the fused gate/up projection.

The gate and up projections run as one GEMM whose output row is [gate (I) | up (I)]. Unfused, the
activation writes silu(gate) out and the product reads it back; here one pass reads both halves
and writes the product:

    x[t, :I] ──silu (fp32)──┐
                            ├─ * ──► out[t] (x.dtype)        [T, I]
    x[t, I:] ───────────────┘

Grid: (tokens, column blocks of the intermediate size).

FP8 output (`silu_mul_fp8`), for the FP8 W8A8 down projection that reads the product: one program
per token takes the amax of its row's product (rounded to the model dtype), then stores it as e4m3
with that token's fp32 scale (amax / 448): exactly what `quantize_per_token_fp8` makes of `silu_mul`'s
output, without its three kernels and without the model-dtype product ever reaching memory. A row of
up to ONE_PASS_MAX columns is loaded once, whole, into 16 warps' registers. A longer row is walked
twice in BLOCK-wide tiles, the second walk re-reading it from L2 (2 x I elements per token).

    pass 1: x[t] tiles ──silu*up──► round to x.dtype ──|max|──► scale[t] = max(amax, 1e-12) / 448
    pass 2: x[t] tiles ──silu*up──► round to x.dtype ──/ scale, clamp ±448──► e4m3 q[t]   [T, I]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.models.quant_scheme import FP8_MAX, quantize_per_token_fp8

_E4M3_MAX: tl.constexpr = tl.constexpr(FP8_MAX)  # a kernel reads module globals only as constexpr
ONE_PASS_MAX = 16384  # rows up to this many columns (padded) are read once, whole, by 16 warps
ONE_PASS_MAX_INTERPRETED = 64  # the interpreter (tests): small rows one pass, the rest two, both covered


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


@triton.jit
def _silu_mul_tile(x_ptr, row_offset, cols, intermediate_size):
    """silu(gate) * up for one tile of a row, rounded to the model dtype (then fp32); 0 past the row."""
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row_offset + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    return (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _silu_mul_fp8_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    stride_x,
    intermediate_size,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:  # the whole row in one tile: read once, held in registers for both steps
        out = _silu_mul_tile(x_ptr, row * stride_x, offs, intermediate_size)
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(out), axis=0), 1e-12), _E4M3_MAX)
        q = tl.clamp(tl.div_rn(out, tl.broadcast_to(scale, out.shape)), -_E4M3_MAX, _E4M3_MAX)
        tl.store(
            q_ptr + row * intermediate_size + offs,
            q.to(q_ptr.dtype.element_ty),
            mask=offs < intermediate_size,
        )
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, intermediate_size, BLOCK):
            amax = tl.maximum(
                amax, tl.abs(_silu_mul_tile(x_ptr, row * stride_x, start + offs, intermediate_size))
            )
        # IEEE divisions (Triton's `/` is approximate), so the bytes are those of quantize_per_token_fp8
        scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), _E4M3_MAX)
        for start in range(0, intermediate_size, BLOCK):
            cols = start + offs
            out = _silu_mul_tile(x_ptr, row * stride_x, cols, intermediate_size)
            q = tl.clamp(tl.div_rn(out, tl.broadcast_to(scale, out.shape)), -_E4M3_MAX, _E4M3_MAX)
            tl.store(
                q_ptr + row * intermediate_size + cols,
                q.to(q_ptr.dtype.element_ty),
                mask=cols < intermediate_size,
            )
    tl.store(scale_ptr + row, scale)


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be 2-D [tokens, 2 * intermediate], got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x must have a contiguous last dimension, got strides {x.stride()}")


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] (last dim contiguous) -> silu(x[:, :I]) * x[:, I:] as a new [T, I] of x.dtype."""
    _check_input(x)
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


def silu_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token_fp8(silu_mul(x))` in one kernel: x [T, 2*I] -> (q [T, I] e4m3, scale [T, 1])."""
    _check_input(x)
    num_tokens, intermediate_size = x.shape[0], x.shape[1] // 2
    q = torch.empty((num_tokens, intermediate_size), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((num_tokens, 1), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return q, scale
    if intermediate_size == 0:
        raise ValueError("x has no columns: there is nothing to quantize")
    use_pdl = pdl_enabled(x)
    row_block = triton.next_power_of_2(intermediate_size)
    one_pass = row_block <= (ONE_PASS_MAX if x.is_cuda else ONE_PASS_MAX_INTERPRETED)
    _silu_mul_fp8_kernel[(num_tokens,)](
        x_ptr=x,
        q_ptr=q,
        scale_ptr=scale,
        stride_x=x.stride(0),
        intermediate_size=intermediate_size,
        BLOCK=row_block if one_pass else min(2048, row_block),
        ONE_PASS=one_pass,
        USE_PDL=use_pdl,
        num_warps=16 if one_pass and row_block > 4096 else 8,
        launch_pdl=use_pdl,
    )
    return q, scale


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch `silu_mul`."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_mul_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `silu_mul_fp8`: the product, then the separate per-token quantization it replaces."""
    return quantize_per_token_fp8(silu_mul_ref(x))
