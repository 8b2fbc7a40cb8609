"""Decode GEMV on 8-bit weights through the tensor cores: the conversions leave the CUDA cores' slow pipe.

`quant_gemv` (quant_gemv.py) turns every weight into fp32 with a conversion instruction (I2F for int8,
F2F for e4m3). Those run at a quarter of the FP32 rate on Hopper (16 per SM per clock), and at the
copy bandwidth an H100 must convert ~3e12 weights a second, ~70% of what that pipe does: the suspect
for its 0.73-0.79 of the copy floor against bf16's 0.92 (benchmarks/NOTES.md, issue 18). Here int8
becomes fp16 by bit operations (0x6400 | (w + 128) is the fp16 1024 + w + 128, exact, so subtracting
1152 gives w), e4m3 by the packed e4m3x2 -> f16x2 conversion, and the multiply-accumulate is a
tensor-core `tl.dot` of x, padded to 16 rows of which 15 are zero, with the fp16 tile (fp32
accumulation). The scale is applied once per output at the end, as in `quant_gemv`.

    x  [1, K] bf16/fp16 -> fp16, rows 1..15 zero ──┐
                                                    ├─ tl.dot, fp32 ─ row 0 * scale[n] (+ bias) ──► y[n]
    Wq [N, K] int8 / e4m3 -> fp16 tile ─────────────┘                                grid: N / BLOCK_N

x in fp16: a bf16 activation keeps its bits (fp16 has more mantissa) below 65504 in magnitude; fp32
inputs (CPU tests) stay on `quant_gemv`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.kernels.quant_gemv import check_quant_operands, quant_gemv_ref, weight_bytes

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROWS = 16  # the smallest M of a tensor-core dot
_CONFIGS = (
    [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    if _INTERPRETED
    else [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (16, 32, 64)
        for bk in (256, 512)
        for w in (4,)
        for s in (3, 4)
    ]
)


@triton.jit
def fp16_tile(ptrs, mask, FP8: tl.constexpr):
    """8-bit weights as fp16, exactly, without a per-element conversion instruction for int8."""
    if FP8:
        w = tl.load(ptrs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        w = tl.load(ptrs, mask=mask, other=0).to(tl.int16) + 0x6480  # 0x6400 | (w + 128)
        w = w.to(tl.float16, bitcast=True) - 1152.0
    return w


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _quant_gemv_tc_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    first = tl.arange(0, ROWS)[:, None] == 0  # x's one real row
    offs_pre = tl.arange(0, BLOCK_K)
    mask_pre = offs_pre < K
    # the weights do not depend on the previous kernel: their first tile is read before the wait
    w_pre = fp16_tile(rows + offs_pre[None, :], mask_n[:, None] & mask_pre[None, :], FP8)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    pdl_launch_and_wait(USE_PDL)
    x_pre = tl.load(x_ptr + offs_pre[None, :], mask=first & mask_pre[None, :], other=0.0).to(tl.float16)
    acc = tl.dot(x_pre, tl.trans(w_pre), out_dtype=tl.float32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_k[None, :], mask=first & mask_k[None, :], other=0.0).to(tl.float16)
        w = fp16_tile(rows + offs_k[None, :], mask_n[:, None] & mask_k[None, :], FP8)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.float32)
    y = tl.sum(acc, axis=0) * scale  # rows 1..15 are zero
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def quant_gemv_tc(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [1, K] bf16/fp16, qweight: [N, K] int8/e4m3, scale: [N] fp32, bias: [N] or None -> [1, N]."""
    check_quant_operands(x, qweight, scale)
    if x.shape[0] != 1 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"quant_gemv_tc takes one bf16/fp16 row, got {x.dtype} {tuple(x.shape)}; use quant_gemv"
        )
    n, k = qweight.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    use_pdl = pdl_enabled(x)
    _quant_gemv_tc_kernel[grid](
        x_ptr=x,
        w_ptr=weight_bytes(qweight),
        scale_ptr=scale,
        bias_ptr=bias if bias is not None else scale,
        y_ptr=y,
        N=n,
        K=k,
        stride_wn=qweight.stride(0),
        HAS_BIAS=bias is not None,
        FP8=qweight.dtype == torch.float8_e4m3fn,
        USE_PDL=use_pdl,
        ROWS=ROWS,
        launch_pdl=use_pdl,
    )
    return y


quant_gemv_tc_ref = quant_gemv_ref  # the same product: fp32 sums of exact weights, one rounding
