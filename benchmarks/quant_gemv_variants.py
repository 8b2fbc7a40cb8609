"""Candidate batch-1 GEMVs on 8-bit weights for issue 18, to A/B against kernels/quant_gemv.py.

`quant_gemv` streams its weights at ~0.7 of the copy bandwidth where the bf16 GEMV reaches ~0.9, and
a tensor-core variant did not help (benchmarks/NOTES.md). Compiled for sm_90 here (ptxas -v, SASS), it
differs from the bf16 GEMV in two ways. (1) Its [BLOCK_N, BLOCK_K] fp32 accumulator costs 128
registers at 8 x 1024 over 4 warps for 64 bytes of weights per thread: half a byte in flight per
register, where bf16's same tile is a byte per register; and 16 KiB tiles spill. Triton makes no
async copies for loads that feed no tl.dot (num_stages changes nothing), so the bytes an SM has in
flight are its resident programs' current tiles: about half of bf16's. (2) x (bf16, 8 per 16-byte
vector) and the weights (16 per vector) get different layouts, so every tile of x goes through
shared memory behind a barrier; bf16 x and bf16 weights share one.

Here each thread loads 8 weights (an 8-byte vector) and the 8 matching x values (a 16-byte vector),
which gives x the tile's own layout (no shared memory, no barrier: checked in the SASS), and sums
its 8 products in registers: the accumulator is [BLOCK_N, BLOCK_K / 8], 64 registers for the 8 x
1024 tile. The candidates, each one step further:

- `grouped`: that, with `quant_gemv`'s conversion instructions (I2F; e4m3 -> f16x2 -> f32).
- `grouped_bits`: converting with integer operations instead (`int8_bits_to_f32`,
  `e4m3_bits_to_f32`, both exact).
- `ahead`: as `grouped_bits`, loading the next tile before converting the current one, so each
  program keeps two tiles in flight instead of one.
- `ahead_native`: `ahead` with `grouped`'s conversions, in case the integer ones lose for one dtype.

Same signature and PDL behaviour as `quant_gemv` (first tile read before `griddepcontrol.wait`). The
winner moves into kernels/quant_gemv.py; the others are deleted with this file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait
from fuserve.workers.kernels.quant_gemv import check_quant_operands

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
VECTOR: tl.constexpr = tl.constexpr(8)  # weights one thread loads at once and sums alone
_TWO_POW_120: tl.constexpr = tl.constexpr(2.0**120)
_E4M3_FIELDS: tl.constexpr = tl.constexpr(0x87F00000 - (1 << 32))  # sign, 4 exponent, 3 mantissa bits
_INT8_MAGIC: tl.constexpr = tl.constexpr(0x4B400000)  # 1.5 * 2^23: its fp32 ulp is 1
# num_stages is left at 1: no async copies are made for these loads, so it only multiplied compiles.
# (BLOCK_N, BLOCK_K, warps): 32 to 128 bytes of weights per thread (64 at ~64 registers, ~80 with
# `ahead`), tiles of 4-16 KiB; whole 4096-wide rows let a program of the small shapes (qkv, o) make
# one round trip. Left out: 16 x 1024 over 8 warps (x's layout differs from the tile's: barriers in
# the loop) and tiles of 16 rows (168-240 registers).
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
CONFIGS = (
    [triton.Config({"BLOCK_N": 8, "BLOCK_K": 64}, num_warps=1)]
    if _INTERPRETED
    else [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1) for bn, bk, w in _TILES]
)


@triton.jit
def int8_bits_to_f32(w):
    """int8 -> fp32 without I2F: 0x4B400000 + w is the fp32 1.5 * 2^23 + w exactly (ulp 1 there)."""
    return (w.to(tl.int32) + _INT8_MAGIC).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def e4m3_bits_to_f32(w):
    """e4m3 bytes (as int8) -> fp32 without conversion instructions: the sign goes to bit 31, the 4
    exponent and 3 mantissa bits to bits 20-26, which is the value times 2^-120 (e4m3 subnormals land
    on fp32 subnormals, kept: Triton does not flush them), then one exact multiply by 2^120. The two
    NaN patterns (never in weights) come out as +-480."""
    bits = (w.to(tl.int32) << 20) & _E4M3_FIELDS
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_120


@triton.jit
def weights_f32(w, FP8: tl.constexpr, BITS: tl.constexpr):
    """A tile of 8-bit weights (loaded as int8) in fp32."""
    if BITS:
        if FP8:
            f = e4m3_bits_to_f32(w)
        else:
            f = int8_bits_to_f32(w)
    else:
        if FP8:
            f = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            f = w.to(tl.float32)
    return f


@triton.jit
def _grouped_quant_gemv_kernel(
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
    BITS: tl.constexpr,
    AHEAD: tl.constexpr,
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
    # column of each element of a tile, [GROUPS, VECTOR]: one thread's 8 along the last axis
    cols = tl.arange(0, GROUPS)[:, None] * VECTOR + tl.arange(0, VECTOR)[None, :]
    # the weights do not depend on the previous kernel: their first tile is read before the wait
    w = tl.load(rows + cols[None, :, :], mask=row_ok & (cols < K)[None, :, :], other=0)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    pdl_launch_and_wait(USE_PDL)
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    if AHEAD:
        for k0 in range(0, K, BLOCK_K):
            offs_next = k0 + BLOCK_K + cols
            w_next = tl.load(rows + offs_next[None, :, :], mask=row_ok & (offs_next < K)[None, :, :], other=0)
            x = tl.load(x_ptr + k0 + cols[None, :, :], mask=(k0 + cols < K)[None, :, :], other=0.0)
            acc += tl.sum(weights_f32(w, FP8, BITS) * x.to(tl.float32), axis=2)
            w = w_next
    else:
        x = tl.load(x_ptr + cols[None, :, :], mask=(cols < K)[None, :, :], other=0.0)
        acc += tl.sum(weights_f32(w, FP8, BITS) * x.to(tl.float32), axis=2)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            offs_k = k0 + cols
            w = tl.load(rows + offs_k[None, :, :], mask=row_ok & (offs_k < K)[None, :, :], other=0)
            x = tl.load(x_ptr + offs_k[None, :, :], mask=(offs_k < K)[None, :, :], other=0.0)
            acc += tl.sum(weights_f32(w, FP8, BITS) * x.to(tl.float32), axis=2)
    y = tl.sum(acc, axis=1) * scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def _autotuned() -> triton.runtime.Autotuner:
    """One autotuner per variant over the same kernel: each keeps its own best config per shape."""
    return triton.autotune(configs=CONFIGS, key=["N", "K", "FP8"])(_grouped_quant_gemv_kernel)


def _launch(
    kernel: triton.runtime.Autotuner,
    bits: bool,
    ahead: bool,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`quant_gemv`'s contract: x [1, K], qweight [N, K] int8/e4m3, scale [N] fp32 -> [1, N] in x.dtype."""
    check_quant_operands(x, qweight, scale)
    if x.shape[0] != 1:
        raise ValueError(f"takes one row x of shape [1, K], got {tuple(x.shape)}")
    n, k = qweight.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    use_pdl = pdl_enabled(x)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x_ptr=x,
        w_ptr=qweight.view(torch.int8),  # fp8 as its bytes: a masked load's 0 fill is a valid int8
        scale_ptr=scale,
        bias_ptr=bias if bias is not None else scale,
        y_ptr=y,
        N=n,
        K=k,
        stride_wn=qweight.stride(0),
        HAS_BIAS=bias is not None,
        FP8=qweight.dtype == torch.float8_e4m3fn,
        BITS=bits,
        AHEAD=ahead,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
    )
    return y


QuantGemv = Callable[..., torch.Tensor]
# name -> (launcher with quant_gemv's signature, its autotuner: best_config and configs_timings)
VARIANTS: dict[str, tuple[QuantGemv, triton.runtime.Autotuner]] = {}
for _name, _bits, _ahead in (
    ("grouped", False, False),
    ("grouped_bits", True, False),
    ("ahead", True, True),
    ("ahead_native", False, True),
):
    _kernel = _autotuned()
    VARIANTS[_name] = (functools.partial(_launch, _kernel, _bits, _ahead), _kernel)
