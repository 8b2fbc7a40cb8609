"""RMSNorm, and the residual add fused into it.

Every decoder layer ends its attention and MLP blocks with `residual = x + residual` followed by
`rmsnorm(residual)`. Done apart, that reads the hidden state three times and writes it twice;
fused, one program per token row reads `x` and `residual` once and writes `normed` and the new
residual once.

Data flow for one row (one program, the whole hidden dimension in one tile):

    x, residual (x.dtype) ──add──► new_residual (rounded to x.dtype, stored)
                                      │ .float()
                                      ▼ h * rsqrt(mean(h*h) + eps)
                                   h.to(x.dtype) * weight ──► normed (x.dtype)

The rounding points are those of HuggingFace's `LlamaRMSNorm`, so the output matches it bit for
bit up to the order of the fp32 sum.

FP8 output (`rmsnorm_fp8`, `fused_add_rmsnorm_fp8`), for the FP8 W8A8 layer that reads the norm's
output (QKV, gate/up): the row, still in registers after the norm, is rounded to the model dtype,
its amax taken, and it is stored as e4m3 with one fp32 scale (amax / 448) per token, exactly what
`quantize_per_token_fp8` makes of the model-dtype output. That saves the layer three kernels
(amax, scale, cast) and a write and read of the row in the model dtype.

    normed (model dtype, fp32 regs) ──|max|──► scale = max(amax, 1e-12) / 448 ──► scale[t] (fp32)
                                    └──── / scale, clamp ±448 ──► e4m3 ──► q[t] [H]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.models.quant_scheme import FP8_MAX, quantize_per_token_fp8

_E4M3_MAX: tl.constexpr = tl.constexpr(FP8_MAX)  # a kernel reads module globals only as constexpr


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    scale_ptr,
    new_residual_ptr,
    stride_x,
    stride_residual,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden_size

    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # the sum is rounded to the model dtype before the norm reads it, as in the unfused model
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * hidden_size + cols, x, mask=mask)

    if FP8_OUT:
        store_rmsnorm_row_fp8(
            x, weight_ptr, out_ptr + row * hidden_size, scale_ptr + row, cols, mask, hidden_size, eps
        )
    else:
        store_rmsnorm_row(x, weight_ptr, out_ptr + row * hidden_size, cols, mask, hidden_size, eps)


@triton.jit
def store_rmsnorm_row(x, weight_ptr, out_row_ptr, cols, mask, hidden_size, eps):
    """`weight * rmsnorm(x)` for one row `x` (model dtype), stored at out_row_ptr; HF's rounding points.
    Shared with the fused all-reduce in fuserve/parallel/all_reduce_rmsnorm.py."""
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / hidden_size
    h = h * tl.rsqrt(variance + eps)
    h = h.to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_row_ptr + cols, (weight * h).to(out_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_rmsnorm_row_fp8(x, weight_ptr, q_row_ptr, scale_row_ptr, cols, mask, hidden_size, eps):
    """`store_rmsnorm_row`, then the row (rounded to the model dtype) quantized per token: e4m3 at
    q_row_ptr and its fp32 scale at scale_row_ptr. Masked lanes hold 0, so they never raise the amax."""
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / hidden_size
    h = h * tl.rsqrt(variance + eps)
    h = h.to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (weight * h).to(x.dtype).to(tl.float32)
    # IEEE divisions (Triton's `/` is approximate), so the bytes are those of quantize_per_token_fp8
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12), _E4M3_MAX)
    q = tl.clamp(tl.div_rn(y, tl.broadcast_to(scale, y.shape)), -_E4M3_MAX, _E4M3_MAX)
    tl.store(q_row_ptr + cols, q.to(q_row_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_row_ptr, scale)


def row_num_warps(block_h: int) -> int:
    """Warps for one program holding a whole row of `block_h` elements."""
    return 4 if block_h <= 2048 else 8 if block_h <= 8192 else 16


def _check_rows(name: str, t: torch.Tensor, hidden_size: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, hidden], got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    if hidden_size is not None and t.shape[1] != hidden_size:
        raise ValueError(f"{name} has hidden size {t.shape[1]}, expected {hidden_size}")


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [{x.shape[1]}], got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")


def _check_pair(x: torch.Tensor, residual: torch.Tensor) -> None:
    _check_rows("x", x)
    _check_rows("residual", residual, x.shape[1])
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    new_residual: torch.Tensor | None,
    scale: torch.Tensor | None = None,
) -> None:
    """`scale` given: out is e4m3 and the kernel quantizes each row into it (the fp8 mode)."""
    num_tokens, hidden_size = x.shape
    if num_tokens == 0:
        return
    block_h = triton.next_power_of_2(hidden_size)
    use_pdl = pdl_enabled(x)
    _rmsnorm_kernel[(num_tokens,)](
        x_ptr=x,
        residual_ptr=residual if residual is not None else x,
        weight_ptr=weight,
        out_ptr=out,
        scale_ptr=scale if scale is not None else out,
        new_residual_ptr=new_residual if new_residual is not None else out,
        stride_x=x.stride(0),
        stride_residual=residual.stride(0) if residual is not None else 0,
        hidden_size=hidden_size,
        eps=eps,
        HAS_RESIDUAL=residual is not None,
        FP8_OUT=scale is not None,
        BLOCK_H=block_h,
        USE_PDL=use_pdl,
        num_warps=row_num_warps(block_h),
        launch_pdl=use_pdl,
    )


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * rmsnorm(x)` over the last dim. x: [T, H], weight: [H] (x.dtype) -> [T, H] (x.dtype)."""
    _check_rows("x", x)
    _check_weight(x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`new_residual = x + residual; return rmsnorm(new_residual), new_residual`, in one pass.

    x, residual: [T, H] of one dtype; weight: [H]. Both outputs are new [T, H] tensors of x.dtype.
    """
    _check_pair(x, residual)
    _check_weight(x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, new_residual)
    return out, new_residual


def _fp8_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    return q, scale


def rmsnorm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token_fp8(rmsnorm(x, weight, eps))` in one pass: (q [T, H] e4m3, scale [T, 1] fp32)."""
    _check_rows("x", x)
    _check_weight(x, weight)
    q, scale = _fp8_outputs(x)
    _launch(x, None, weight, eps, q, None, scale)
    return q, scale


def fused_add_rmsnorm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_add_rmsnorm` with its normed output quantized per token in the same pass:
    (q [T, H] e4m3, scale [T, 1] fp32, new_residual [T, H] x.dtype)."""
    _check_pair(x, residual)
    _check_weight(x, weight)
    q, scale = _fp8_outputs(x)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, q, new_residual, scale)
    return q, scale, new_residual


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch `rmsnorm`, written as HuggingFace's LlamaRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `fused_add_rmsnorm`."""
    new_residual = x + residual
    return rmsnorm_ref(new_residual, weight, eps), new_residual


def rmsnorm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `rmsnorm_fp8`: the norm, then the separate per-token quantization it replaces."""
    return quantize_per_token_fp8(rmsnorm_ref(x, weight, eps))


def fused_add_rmsnorm_fp8_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch `fused_add_rmsnorm_fp8`."""
    normed, new_residual = fused_add_rmsnorm_ref(x, residual, weight, eps)
    return (*quantize_per_token_fp8(normed), new_residual)
