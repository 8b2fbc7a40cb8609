"""Top-p (nucleus) sampling's cut-off, found without sorting the vocabulary.

Top-p keeps the most probable tokens whose mass first reaches `top_p`. The usual way sorts every row
(HF, vLLM's torch path): on an H200 a sort of [64, 128256] costs ~1.4 ms, a quarter of a Llama-3-8B
batch-64 decode step, and a model whose generation_config.json sets top_p makes every request pay it.
What the draw needs is only the cut-off value per row,

    t = the largest value with mass(p >= t) >= target,

and every token with p >= t is kept (every token tied with the cut-off too, where a sort would keep an
arbitrary few of them). Non-negative float32 values order as their int32 bit patterns, so `t` is found
by searching the bit patterns: each round evaluates `mass(bits >= pivot)` at PIVOTS evenly spaced pivots
of the current range [lo, hi) and narrows it to one gap, until hi = lo + 1 and lo's bits are `t`
exactly. Eight rounds of 16 pivots cover all 2**30 patterns of [0, 1]. Once the range is narrow, most
tiles hold no value inside it and only add to the mass above it, so after the first rounds a tile costs
one comparison per element.

    probs [S, V] fp32, target [S] ──grid (S): rounds over the row, in L2──► t [S] fp32

One program per row; sums run in a fixed order, so the result does not vary between runs, and every
pivot's mass is summed in the same order, so the masses never increase with the pivot and the search
is exact against its own sums. Near a boundary its sums may round differently from a sort's cumsum:
both are the top-p of the same probabilities to fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PIVOTS = 16
ONE_BITS = 0x3F800000  # the int32 pattern of 1.0, the largest probability
BLOCK = 1024


def _rounds(pivots: int) -> int:
    """Rounds that narrow [0, ONE_BITS + 1) to a single bit pattern."""
    span, rounds = ONE_BITS + 1, 0
    while span > 1:
        span = -(-span // pivots)
        rounds += 1
    return rounds


@triton.jit
def _nucleus_threshold_kernel(
    probs_ptr,
    target_ptr,
    out_ptr,
    vocab,
    stride_row,
    ROUNDS: tl.constexpr,
    PIVOTS: tl.constexpr,
    ONE_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = probs_ptr + row.to(tl.int64) * stride_row
    target = tl.load(target_ptr + row)
    lo = tl.zeros([], dtype=tl.int32)  # mass(bits >= lo) >= target
    hi = tl.full([], ONE_BITS + 1, dtype=tl.int32)  # mass(bits >= hi) < target
    steps = tl.arange(0, PIVOTS) + 1
    for _ in range(ROUNDS):
        step = (hi - lo + PIVOTS - 1) // PIVOTS
        pivots = tl.minimum(lo + steps * step, hi)  # ascending; those at hi are known to fail
        above = tl.zeros([], dtype=tl.float32)
        inside = tl.zeros([PIVOTS], dtype=tl.float32)
        for v0 in range(0, vocab, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            p = tl.load(base + cols, mask=cols < vocab, other=0.0)
            bits = p.to(tl.int32, bitcast=True)
            above += tl.sum(tl.where(bits >= hi, p, 0.0))
            in_range = (bits >= lo) & (bits < hi)
            if tl.max(in_range.to(tl.int32)) > 0:
                hit = (bits[None, :] >= pivots[:, None]) & in_range[None, :]
                inside += tl.sum(tl.where(hit, p[None, :], 0.0), axis=1)
        reached = ((above + inside) >= target) & (pivots < hi)
        new_lo = lo + tl.sum(reached.to(tl.int32)) * step
        hi = tl.minimum(hi, new_lo + step)
        lo = new_lo
    tl.store(out_ptr + row, lo.to(tl.float32, bitcast=True))


def nucleus_threshold(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """probs: [S, V] float32 >= 0 (contiguous last dim), target: [S] float32 in (0, 1] ->
    [S] float32: per row the largest t with sum(probs[probs >= t]) >= target, or 0.0 where even the
    whole row's sum falls short (rounding)."""
    _check(probs, target)
    out = torch.empty(probs.shape[0], dtype=torch.float32, device=probs.device)
    if probs.shape[0] == 0:
        return out
    _nucleus_threshold_kernel[(probs.shape[0],)](
        probs_ptr=probs,
        target_ptr=target,
        out_ptr=out,
        vocab=probs.shape[1],
        stride_row=probs.stride(0),
        ROUNDS=_rounds(PIVOTS),
        PIVOTS=PIVOTS,
        ONE_BITS=ONE_BITS,
        BLOCK=BLOCK,
        num_warps=8,
    )
    return out


def nucleus_threshold_ref(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain-torch `nucleus_threshold`, by sorting: the value at which the descending cumsum first
    reaches the target."""
    _check(probs, target)
    ordered = probs.sort(dim=-1, descending=True).values
    short = ordered.cumsum(dim=-1) < target.unsqueeze(1)
    first = short.sum(dim=-1, keepdim=True)  # index of the first position that reaches it
    value = ordered.gather(1, first.clamp(max=probs.shape[1] - 1)).squeeze(1)
    return torch.where(first.squeeze(1) < probs.shape[1], value, torch.zeros_like(value))


def _check(probs: torch.Tensor, target: torch.Tensor) -> None:
    if probs.dim() != 2 or probs.dtype != torch.float32 or probs.stride(1) != 1:
        raise ValueError(
            f"probs must be a 2-D float32 tensor with a contiguous last dim, got {tuple(probs.shape)} "
            f"{probs.dtype} strides {probs.stride()}"
        )
    if target.shape != probs.shape[:1] or target.dtype != torch.float32:
        raise ValueError(
            f"target must be float32 [{probs.shape[0]}], got {tuple(target.shape)} {target.dtype}"
        )
