"""GEMV for 2 to MAX_ROWS rows (a verify step's 1 + k tokens, decode at batch 2-8): y = x @ W^T, W read
once for every row, at memory bandwidth.

Alone cuBLAS reads these shapes as fast at 8 rows as at 1, but in the 8B's chain of linear layers (a
CUDA graph, no PDL between its kernels) 2-8 rows cost 0.4-0.6 ms a step more than the one-row GEMV
(kernels/gemv.py) on an H200: a batch-1 verify step's extra kernel time, and most of what batch 8 costs
over batch 1. A tensor-core version (rows padded to 16, tl.dot) read at 0.65-0.78 of the copy bandwidth
and was reverted (benchmarks/NOTES.md). This one is the one-row GEMV's loop with the rows beside it:
each program streams BLOCK_N rows of W over K, multiplies every tile with each of the BLOCK_M rows of x
in fp32 FMAs ([BLOCK_M, BLOCK_N, BLOCK_K] partial sums in registers) and reduces over K once at the
end; the first tile of W is loaded before waiting for the kernel that wrote x (PDL, kernels/pdl.py).

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
# fp32 partial sums a thread may hold: BLOCK_M * BLOCK_N * BLOCK_K / (32 * num_warps)
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
    """The configs whose partial sums fit a thread's registers at this launch's BLOCK_M."""
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", MAX_ROWS))
    fit = [
        c
        for c in configs
        if block_m * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= _MAX_ACC_PER_THREAD * 32 * c.num_warps
    ]
    return fit or configs[:1]


@triton.autotune(
    configs=_CONFIGS,
    key=["N", "K", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _fits_registers},
    cache_results=True,
)
@triton.jit
def _gemv_rows_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    xs = x_ptr + offs_m[:, None] * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    w = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    pdl_launch_and_wait(USE_PDL)
    x = tl.load(xs + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    acc = x[:, None, :] * w.to(tl.float32)[None, :, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(xs + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


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
        M=m,
        N=n,
        K=k,
        stride_xm=x.stride(0),
        stride_wn=weight.stride(0),
        stride_ym=y.stride(0),
        HAS_BIAS=bias is not None,
        USE_PDL=use_pdl,
        BLOCK_M=triton.next_power_of_2(m),
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
