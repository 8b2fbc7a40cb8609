"""GEMM on 8-bit weights for batches of rows: y = (x @ Wq^T) * scale, dequantized tile by tile.

Past one row a linear layer starts to use the tensor cores, so the single-row GEMV (quant_gemv.py)
gives way to a tiled GEMM. Each program computes a BLOCK_M x BLOCK_N tile of y; it streams tiles of
x and of the 8-bit weight over K, converts the weight tile to x's dtype in registers (int8 and e4m3
values are exact in bf16/fp16) and feeds both to tl.dot with an fp32 accumulator. The per-channel
scale is constant along K, so it multiplies the accumulator once at the end. No dequantized weight
ever reaches memory.

    x  [M, K] ──tile──┐
                      ├─ tl.dot(x_tile, dtype(Wq_tile)^T) (fp32 acc) ─ * scale[n] (+ bias) ──► y [M, N]
    Wq [N, K] ──tile──┘                                    grid: (M / BLOCK_M) x (N / BLOCK_N)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.quant_gemv import check_quant_operands, quant_gemv_ref, weight_bytes, weight_tile

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = (
    [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    if _INTERPRETED
    else [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            # 2-15 rows (weight-bound like the GEMV): narrow N tiles give N/16-N/32 programs, enough to
            # keep every SM streaming weights (N/64 leaves half of an H100's 132 SMs idle at N = 4096)
            (16, 16, 512, 4, 4),
            (16, 32, 512, 4, 4),
            (16, 32, 256, 4, 4),
            (16, 64, 256, 4, 4),
            (16, 128, 128, 4, 4),
            (32, 64, 256, 4, 4),
            (64, 64, 128, 4, 4),
            (64, 128, 128, 4, 3),
            (64, 128, 64, 4, 4),
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
        )
    ]
)


def _m_bucket(m: int) -> int:
    """Autotune once per power-of-two batch size, not once per distinct M."""
    return triton.next_power_of_2(m)


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"], cache_results=True)
@triton.jit
def _quant_gemm_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # the weight tile read as [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = weight_tile(w_rows + offs_k[:, None], mask_k[:, None] & mask_n[None, :], FP8).to(a.dtype)
        if IEEE_FP32:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def quant_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [M, K] (bf16/fp16/fp32), qweight: [N, K] int8/e4m3, scale: [N] fp32 -> [M, N] in x.dtype."""
    check_quant_operands(x, qweight, scale)
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    _quant_gemm_kernel[grid](
        x_ptr=x,
        w_ptr=weight_bytes(qweight),
        scale_ptr=scale,
        bias_ptr=bias if bias is not None else scale,
        y_ptr=y,
        M=m,
        N=n,
        K=k,
        M_BUCKET=_m_bucket(m),
        stride_xm=x.stride(0),
        stride_wn=qweight.stride(0),
        stride_ym=y.stride(0),
        HAS_BIAS=bias is not None,
        FP8=qweight.dtype == torch.float8_e4m3fn,
        IEEE_FP32=x.dtype == torch.float32,
    )
    return y


def quant_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch `quant_gemm`: fp32 products and sums, the scale after the sum, one rounding."""
    return quant_gemv_ref(x, qweight, scale, bias)
