"""Decode GEMV on 8-bit weights: y = (x @ Wq^T) * scale for one token row, at memory bandwidth.

At batch 1 a linear layer costs the time to read its weights; int8 or fp8 weights halve the bytes of
bf16. Each program owns BLOCK_N output features and streams their 8-bit rows over K, converting each
tile to fp32 in registers (no dequantized copy anywhere), multiplying by x and reducing across K; the
per-channel scale is applied once per output at the end, since it is constant along K. Same shape as
kernels/gemv.py (PDL: the first weight tile is read before waiting for the previous kernel).

Each thread loads 8 weights and the 8 matching x values and sums their products itself, so the
accumulator is [BLOCK_N, BLOCK_K / 8] and x has the weight tile's own layout. Before, a [BLOCK_N,
BLOCK_K] fp32 accumulator held half a byte of weights in flight per register (bf16's GEMV holds a
byte), and x, laid out for 16-byte bf16 vectors against 16 int8 weights a vector, went through shared
memory behind a barrier every tile: one decoder layer's four GEMVs in a CUDA graph on an H100 took
92.7 us (int8) / 82.0 us (fp8), now 79.4 / 79.0, against bf16's 148.5 (benchmarks/NOTES.md, issue 18).
Triton makes no async copies for loads that feed no tl.dot, so num_stages stays 1: what an SM has in
flight is its resident programs' current tiles.

    x  [1, K] (bf16/fp16/fp32) ──┐
                                  ├─ sum_k x[k] * float(Wq[n, k]) ─ * scale[n] (+ bias) ──► y[n]
    Wq [N, K] (int8 / e4m3) ──────┘                                    grid: N / BLOCK_N
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
QUANT_WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)
VECTOR: tl.constexpr = tl.constexpr(8)  # weights one thread loads at once and sums alone
# (BLOCK_N, BLOCK_K, warps): 32 to 128 bytes of weights a thread, tiles of 4-16 KiB; whole 4096-wide
# rows let a program of the small shapes (qkv, o) make one pass. Left out: 16 x 1024 over 8 warps (x's
# layout then differs from the tile's: barriers in the loop) and 16-row tiles (168-240 registers).
_TILES = [
    (1, 4096, 4),
    (2, 2048, 4),
    (2, 4096, 4),
    (4, 1024, 4),
    (4, 2048, 4),
    (8, 1024, 4),
    (4, 4096, 8),
    (8, 2048, 8),
    (4, 4096, 4),
    (8, 2048, 4),
]
_CONFIGS = (
    [triton.Config({"BLOCK_N": 8, "BLOCK_K": 64}, num_warps=1)]
    if _INTERPRETED
    else [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1) for bn, bk, w in _TILES]
)


@triton.jit
def weight_tile(ptrs, mask, FP8: tl.constexpr):
    """A tile of 8-bit weights, masked lanes 0. fp8 weights arrive as their bytes (uint8) and are
    reinterpreted here: a masked load's fill value cannot be cast to fp8 (the interpreter refuses it)."""
    w = tl.load(ptrs, mask=mask, other=0)
    if FP8:
        w = w.to(tl.float8e4nv, bitcast=True)
    return w


def weight_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """What the kernels take as w_ptr: int8 as is, fp8 viewed as uint8 (see `weight_tile`)."""
    return qweight.view(torch.uint8) if qweight.dtype == torch.float8_e4m3fn else qweight


@triton.autotune(configs=_CONFIGS, key=["N", "K", "FP8"], cache_results=True)
@triton.jit
def _quant_gemv_kernel(
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
):
    GROUPS: tl.constexpr = BLOCK_K // VECTOR
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn
    row_ok = mask_n[:, None, None]
    # the column of each element of a tile, [GROUPS, VECTOR]: one thread's 8 along the last axis
    cols = tl.arange(0, GROUPS)[:, None] * VECTOR + tl.arange(0, VECTOR)[None, :]
    # the weights do not depend on the previous kernel: their first tile is read before the wait
    w = weight_tile(rows + cols[None, :, :], row_ok & (cols < K)[None, :, :], FP8)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    pdl_launch_and_wait(USE_PDL)
    x = tl.load(x_ptr + cols[None, :, :], mask=(cols < K)[None, :, :], other=0.0).to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * x, axis=2)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + cols
        w = weight_tile(rows + offs_k[None, :, :], row_ok & (offs_k < K)[None, :, :], FP8)
        x = tl.load(x_ptr + offs_k[None, :, :], mask=(offs_k < K)[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x, axis=2)
    y = tl.sum(acc, axis=1) * scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def check_quant_operands(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    if qweight.dtype not in QUANT_WEIGHT_DTYPES:
        raise ValueError(f"qweight must be int8 or float8_e4m3fn, got {qweight.dtype}; quantize it first")
    n, k = qweight.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}] for weights of shape {tuple(qweight.shape)}: {tuple(x.shape)}")
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be fp32 of shape ({n},), got {scale.dtype} {tuple(scale.shape)}")
    if qweight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and qweight need a contiguous last dimension")


def quant_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [1, K], qweight: [N, K] int8/e4m3, scale: [N] fp32, bias: [N] or None -> [1, N] in x.dtype."""
    check_quant_operands(x, qweight, scale)
    if x.shape[0] != 1:
        raise ValueError(f"quant_gemv takes one row x of shape [1, K], got {tuple(x.shape)}; use quant_gemm")
    n, k = qweight.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    use_pdl = pdl_enabled(x)
    _quant_gemv_kernel[grid](
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
        launch_pdl=use_pdl,
    )
    return y


def quant_gemv_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch `quant_gemv` (any number of rows): fp32 products and sums, one rounding to x.dtype."""
    y = (x.float() @ qweight.float().t()) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
