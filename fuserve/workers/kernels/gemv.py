"""Decode GEMV: y = x @ W^T for one token row, read at memory bandwidth.

At batch 1 every linear layer is a matrix-vector product: the whole cost is reading W once. cuBLAS
picks tiles built for matrices and, on an H100, reads some shapes (4096 x 4096, o_proj) at about half
of the copy bandwidth and others through a split-K pass plus a reduction kernel. Here each program
owns BLOCK_N output features and streams their rows of W over K in BLOCK_K chunks, multiplying by x
in fp32 and reducing across K in registers; one launch, no workspace, no reduction pass. On Hopper the
first tile of W is read while the previous kernel drains (programmatic dependent launch, kernels/pdl.py),
and optionally more of W is pulled into L2 meanwhile (kernels/l2_prefetch.py).

    x [1, K] ──┐
               ├─ sum_k x[k] * W[n, k] (fp32) ──► y[n] (x.dtype)       grid: N / BLOCK_N
    W [N, K] ──┘

Only used where M == 1 (decode at batch 1); larger batches go to torch's GEMM.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fuserve.workers.kernels.l2_prefetch import (
    LINE_BYTES,
    l2_prefetch_budget,
    prefetch_columns,
    prefetch_rows_l2,
)
from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = (
    [triton.Config({"BLOCK_N": 8, "BLOCK_K": 64}, num_warps=1)]
    if _INTERPRETED
    else [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (4, 8, 16)
        for bk in (256, 512, 1024)
        for w in (2, 4)
        for s in (3, 4)
        if bn * bk <= 8192
    ]
)


@triton.jit
def gemv_block(
    x_ptr,
    w_ptr,
    bias_ptr,
    N,
    K,
    stride_wn,
    prefetch_cols,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    LINE: tl.constexpr,
):
    """This program's BLOCK_N outputs, rounded to x's dtype, with their offsets and mask. Shared with
    the GEMV that pushes its output to the tensor-parallel peers (fuserve/parallel/gemv_push.py)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    # the weights do not depend on the previous kernel: the first tile is loaded before waiting for it
    # (more tiles before the wait measured slower: benchmarks/NOTES.md)
    offs_pre = tl.arange(0, BLOCK_K)
    mask_pre = offs_pre < K
    w_pre = tl.load(rows + offs_pre[None, :], mask=mask_n[:, None] & mask_pre[None, :], other=0.0)
    if L2_PREFETCH:  # the next prefetch_cols columns of the rows into L2 (l2_prefetch.py)
        valid_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
        prefetch_rows_l2(valid_rows, BLOCK_K, tl.minimum(BLOCK_K + prefetch_cols, K), LINE)
    pdl_launch_and_wait(USE_PDL)
    x_pre = tl.load(x_ptr + offs_pre, mask=mask_pre, other=0.0).to(tl.float32)
    y = tl.sum(w_pre.to(tl.float32) * x_pre[None, :], axis=1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(
            rows + offs_k[None, :],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
            eviction_policy="evict_first" if L2_PREFETCH else "",
        )
        acc += w.to(tl.float32) * x[None, :]
    y += tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return y.to(x_ptr.dtype.element_ty), offs_n, mask_n


# Timing the 32 configs costs ~4 s per weight shape, paid by every process at every engine start; the
# timings are kept in Triton's cache (TRITON_CACHE_DIR, per GPU architecture), so only a machine's first
# start pays them (the same for quant_gemv.py and quant_gemm.py)
@triton.autotune(configs=_CONFIGS, key=["N", "K"], cache_results=True)
@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    prefetch_cols,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    LINE: tl.constexpr,
):
    y, offs_n, mask_n = gemv_block(
        x_ptr=x_ptr,
        w_ptr=w_ptr,
        bias_ptr=bias_ptr,
        N=N,
        K=K,
        stride_wn=stride_wn,
        prefetch_cols=prefetch_cols,
        HAS_BIAS=HAS_BIAS,
        USE_PDL=USE_PDL,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        L2_PREFETCH=L2_PREFETCH,
        LINE=LINE,
    )
    tl.store(y_ptr + offs_n, y, mask=mask_n)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [1, K], weight: [N, K] (row-major), bias: [N] or None -> [1, N] in x.dtype, written into `out`
    when given (a contiguous [1, N])."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes one row x of shape [1, K], got {tuple(x.shape)}; use F.linear for more")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {k}")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device) if out is None else out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    use_pdl = pdl_enabled(x)
    prefetch_cols = prefetch_columns(n, k, weight.element_size(), l2_prefetch_budget()) if use_pdl else 0
    _gemv_kernel[grid](
        x_ptr=x,
        w_ptr=weight,
        bias_ptr=bias if bias is not None else weight,
        y_ptr=y,
        N=n,
        K=k,
        stride_wn=weight.stride(0),
        prefetch_cols=prefetch_cols,
        HAS_BIAS=bias is not None,
        USE_PDL=use_pdl,
        L2_PREFETCH=prefetch_cols > 0,
        LINE=LINE_BYTES // weight.element_size(),
        launch_pdl=use_pdl,
    )
    return y


def tuned_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> triton.Config:
    """The block sizes and warps `gemv` runs with for this shape (tuning it now if it has not been)."""
    gemv(x, weight, bias)
    return _gemv_kernel.best_config


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch `gemv`: fp32 accumulation, one rounding to x.dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear, with the bandwidth-bound GEMV for a single row on the GPU; `out` (contiguous, the result's
    shape) takes the result where the caller needs it in a buffer of its own (a symmetric-memory
    all-reduce's), without a copy."""
    if x.shape[0] == 1 and x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        return gemv(x, weight, bias, out)
    if out is None:
        return F.linear(x, weight, bias)
    torch.matmul(x, weight.t(), out=out)
    return out if bias is None else out.add_(bias)
