"""GEMV for 2 to MAX_ROWS rows (a verify step's 1 + k tokens, decode at batch 2-8): y = x @ W^T, W read
once for every row, at memory bandwidth.

Alone cuBLAS reads these shapes as fast at 8 rows as at 1, but in the 8B's chain of linear layers (a
CUDA graph, no PDL between its kernels) 2-8 rows cost 0.4-0.6 ms a step more than the one-row GEMV
(kernels/gemv.py) on an H200: a batch-1 verify step's extra kernel time, and most of what batch 8 costs
over batch 1. A tensor-core version (rows padded to 16, tl.dot) read at 0.65-0.78 of the copy bandwidth
and was reverted, and so was an FMA version over a [rows, BLOCK_N, BLOCK_K] tensor, whose time grew with
the rows as if each tile were loaded once a row (benchmarks/NOTES.md). This one is the one-row GEMV's
loop with one [BLOCK_N, BLOCK_K] accumulator per row (ROWS, a constant of the compiled kernel: up to
eight, the unused compiled out): each thread multiplies the W elements it loaded with every row in fp32
FMAs, and reduces over K once at the end; the first tile of W is loaded before waiting for the kernel
that wrote x (PDL, kernels/pdl.py).

    x [M, K] ──┐
               ├─ sum_k x[m, k] * W[n, k] (fp32) ──► y[m, n] (x.dtype)      grid: N / BLOCK_N
    W [N, K] ──┘
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait

MAX_ROWS = 8
# fp32 partial sums a thread may hold: ROWS * BLOCK_N * BLOCK_K / (32 * num_warps)
_MAX_ACC_PER_THREAD = 128
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = (
    [triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=1)]
    if _INTERPRETED
    else [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (4, 8, 16)
        for bk in (128, 256, 512)
        for w in (2, 4)
        for s in (3, 4)
    ]
)


def _fits_registers(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """The configs whose partial sums fit a thread's registers at this launch's row count."""
    rows = kwargs.get("ROWS", named_args.get("ROWS", MAX_ROWS))
    fit = [
        c
        for c in configs
        if rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= _MAX_ACC_PER_THREAD * 32 * c.num_warps
    ]
    return fit or configs[:1]


@triton.jit
def _fma_row(acc, w, x_ptr, stride_xm, offs_k, mask_k, ROW: tl.constexpr, ROWS: tl.constexpr):
    """acc + w * x[ROW] broadcast over w's rows; a row past ROWS leaves acc alone (and is compiled out)."""
    if ROW < ROWS:
        x = tl.load(x_ptr + ROW * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    return acc


@triton.jit
def _fma_rows(
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, w, x_ptr, stride_xm, offs_k, mask_k, ROWS: tl.constexpr
):
    """One tile of W times each of the ROWS rows of x, one accumulator a row: every thread multiplies the
    W elements it loaded with each row (the rows are not spread over threads, so no tile is loaded twice)."""
    acc0 = _fma_row(acc0, w, x_ptr, stride_xm, offs_k, mask_k, 0, ROWS)
    acc1 = _fma_row(acc1, w, x_ptr, stride_xm, offs_k, mask_k, 1, ROWS)
    acc2 = _fma_row(acc2, w, x_ptr, stride_xm, offs_k, mask_k, 2, ROWS)
    acc3 = _fma_row(acc3, w, x_ptr, stride_xm, offs_k, mask_k, 3, ROWS)
    acc4 = _fma_row(acc4, w, x_ptr, stride_xm, offs_k, mask_k, 4, ROWS)
    acc5 = _fma_row(acc5, w, x_ptr, stride_xm, offs_k, mask_k, 5, ROWS)
    acc6 = _fma_row(acc6, w, x_ptr, stride_xm, offs_k, mask_k, 6, ROWS)
    acc7 = _fma_row(acc7, w, x_ptr, stride_xm, offs_k, mask_k, 7, ROWS)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _store_row(acc, y_ptr, stride_ym, bias, offs_n, mask_n, ROW: tl.constexpr, ROWS: tl.constexpr):
    if ROW < ROWS:
        y = tl.sum(acc, axis=1) + bias
        tl.store(y_ptr + ROW * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.autotune(
    configs=_CONFIGS,
    key=["N", "K", "ROWS"],
    prune_configs_by={"early_config_prune": _fits_registers},
    cache_results=True,
)
@triton.jit
def _gemv_rows_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    # as the one-row GEMV: the first tile of W before waiting for the kernel that wrote x, its products
    # before the loop, so that the loop's loads are unconditional and pipelined (num_stages)
    w = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    pdl_launch_and_wait(USE_PDL)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _fma_rows(
        acc0,
        acc1,
        acc2,
        acc3,
        acc4,
        acc5,
        acc6,
        acc7,
        w.to(tl.float32),
        x_ptr,
        stride_xm,
        offs_k,
        mask_k,
        ROWS,
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _fma_rows(
            acc0,
            acc1,
            acc2,
            acc3,
            acc4,
            acc5,
            acc6,
            acc7,
            w.to(tl.float32),
            x_ptr,
            stride_xm,
            offs_k,
            mask_k,
            ROWS,
        )
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _store_row(acc0, y_ptr, stride_ym, bias, offs_n, mask_n, 0, ROWS)
    _store_row(acc1, y_ptr, stride_ym, bias, offs_n, mask_n, 1, ROWS)
    _store_row(acc2, y_ptr, stride_ym, bias, offs_n, mask_n, 2, ROWS)
    _store_row(acc3, y_ptr, stride_ym, bias, offs_n, mask_n, 3, ROWS)
    _store_row(acc4, y_ptr, stride_ym, bias, offs_n, mask_n, 4, ROWS)
    _store_row(acc5, y_ptr, stride_ym, bias, offs_n, mask_n, 5, ROWS)
    _store_row(acc6, y_ptr, stride_ym, bias, offs_n, mask_n, 6, ROWS)
    _store_row(acc7, y_ptr, stride_ym, bias, offs_n, mask_n, 7, ROWS)


def gemv_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [M, K] with 1 <= M <= MAX_ROWS, weight: [N, K] (row-major, x's dtype), bias: [N] or None ->
    [M, N] in x.dtype, written into `out` when given (a contiguous [M, N])."""
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv_rows takes 1 to {MAX_ROWS} rows, got {m}; use F.linear for more")
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} features but weight expects {weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} and weight {weight.dtype}: gemv_rows needs one dtype")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    use_pdl = pdl_enabled(x)
    _gemv_rows_kernel[grid](
        x_ptr=x,
        w_ptr=weight,
        bias_ptr=bias if bias is not None else weight,
        y_ptr=y,
        N=n,
        K=k,
        stride_xm=x.stride(0),
        stride_wn=weight.stride(0),
        stride_ym=y.stride(0),
        HAS_BIAS=bias is not None,
        USE_PDL=use_pdl,
        ROWS=m,
        launch_pdl=use_pdl,
    )
    return y


def gemv_rows_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch `gemv_rows`: fp32 accumulation, one rounding to x.dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)
