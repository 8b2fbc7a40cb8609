"""Decode GEMV: y = x @ W^T for one token row, read at memory bandwidth.

At batch 1 every linear layer is a matrix-vector product: the whole cost is reading W once. cuBLAS
picks tiles built for matrices and, on an H100, reads some shapes (4096 x 4096, o_proj) at about half
of the copy bandwidth and others through a split-K pass plus a reduction kernel. Here each program
owns BLOCK_N output features and streams their rows of W over K in BLOCK_K chunks, multiplying by x
in fp32 and reducing across K in registers; one launch, no workspace, no reduction pass. On Hopper the
first tile of W is read while the previous kernel drains (programmatic dependent launch, kernels/pdl.py).

    x [1, K] ──┐
               ├─ sum_k x[k] * W[n, k] (fp32) ──► y[n] (x.dtype)       grid: N / BLOCK_N
    W [N, K] ──┘

The MLP's gate/up projection has the same kernel with `GATED`: a program owns BLOCK_N features of
both halves of W = [gate (I) | up (I)] and writes silu(gate) * up, so the product never round-trips
through memory and one launch (of ~10 per layer) goes away.

Only used where M == 1 (decode at batch 1); larger batches go to torch's GEMM.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.kernels.silu_mul import silu_mul, silu_mul_ref

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
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """This program's BLOCK_N outputs, rounded to x's dtype, with their offsets and mask. Shared with
    the GEMV that pushes its output to the tensor-parallel peers (fuserve/parallel/gemv_push.py)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    up_rows = rows + N * stride_wn  # GATED: the up half's rows, N below the gate's
    # the weights do not depend on the previous kernel: the first tile is loaded before waiting for it
    # (more tiles before the wait measured slower: benchmarks/NOTES.md)
    offs_pre = tl.arange(0, BLOCK_K)
    mask_pre = mask_n[:, None] & (offs_pre < K)[None, :]
    w_pre = tl.load(rows + offs_pre[None, :], mask=mask_pre, other=0.0)
    pdl_launch_and_wait(USE_PDL)
    if GATED:  # after the wait: a second tile held across it costs registers
        u_pre = tl.load(up_rows + offs_pre[None, :], mask=mask_pre, other=0.0)
    x_pre = tl.load(x_ptr + offs_pre, mask=offs_pre < K, other=0.0).to(tl.float32)
    y = tl.sum(w_pre.to(tl.float32) * x_pre[None, :], axis=1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if GATED:
        y_up = tl.sum(u_pre.to(tl.float32) * x_pre[None, :], axis=1)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_w = mask_n[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = tl.load(rows + offs_k[None, :], mask=mask_w, other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        if GATED:
            u = tl.load(up_rows + offs_k[None, :], mask=mask_w, other=0.0)
            acc_up += u.to(tl.float32) * x[None, :]
    y += tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    if GATED:
        y_up += tl.sum(acc_up, axis=1)
        if HAS_BIAS:
            y_up += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        # rounded as the unfused GEMV's output would be, so fused and unfused agree
        gate = y.to(dtype).to(tl.float32)
        y = gate * tl.sigmoid(gate) * y_up.to(dtype).to(tl.float32)
    return y.to(dtype), offs_n, mask_n


@triton.autotune(configs=_CONFIGS, key=["N", "K", "GATED"])
@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    y, offs_n, mask_n = gemv_block(
        x_ptr, w_ptr, bias_ptr, N, K, stride_wn, HAS_BIAS, GATED, USE_PDL, BLOCK_N, BLOCK_K
    )
    tl.store(y_ptr + offs_n, y, mask=mask_n)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False
) -> torch.Tensor:
    """x: [1, K], weight: [N, K] (row-major), bias: [N] or None -> [1, N] in x.dtype.
    gated: weight is [gate; up] ([2I, K]) and the result is silu(gate) * up, [1, I]."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes one row x of shape [1, K], got {tuple(x.shape)}; use F.linear for more")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {k}")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    if gated:
        if n % 2:
            raise ValueError(f"a gated GEMV needs [gate; up] weights with an even row count, got {n}")
        n //= 2
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    use_pdl = pdl_enabled(x)
    _gemv_kernel[grid](
        x_ptr=x,
        w_ptr=weight,
        bias_ptr=bias if bias is not None else weight,
        y_ptr=y,
        N=n,
        K=k,
        stride_wn=weight.stride(0),
        HAS_BIAS=bias is not None,
        GATED=gated,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
    )
    return y


def tuned_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> triton.Config:
    """The block sizes and warps `gemv` runs with for this shape (tuning it now if it has not been)."""
    gemv(x, weight, bias)
    return _gemv_kernel.best_config


def gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False
) -> torch.Tensor:
    """Plain-torch `gemv`: fp32 accumulation, one rounding to x.dtype (then silu_mul_ref if gated)."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return silu_mul_ref(y) if gated else y


def _single_row(x: torch.Tensor) -> bool:
    return x.shape[0] == 1 and x.is_cuda and x.dim() == 2 and x.stride(1) == 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the bandwidth-bound GEMV for a single row on the GPU."""
    if _single_row(x):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_mul(F.linear(x, [gate; up], bias)): one gated GEMV for a single row on the GPU."""
    if _single_row(x):
        return gemv(x, weight, bias, gated=True)
    return silu_mul(F.linear(x, weight, bias))
