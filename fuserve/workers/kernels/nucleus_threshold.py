"""Top-p (nucleus) sampling's cut-off, found without sorting the vocabulary.

Top-p keeps the most probable tokens whose mass first reaches `top_p`. The usual way sorts every row
(HF, vLLM's torch path): on an H200 that filter costs ~1.4-1.7 ms for [64, 128256] (the sort alone
0.65 ms), a quarter of a Llama-3-8B batch-64 decode step, and a model whose generation_config.json
sets top_p makes every request pay it. What the draw needs is only the cut-off value per row,

    t = the largest value with mass(p >= t) >= target,

and every token with p >= t is kept (every token tied with the cut-off too, where a sort would keep an
arbitrary few of them). Two steps find it (`nucleus_cut`):

1. The row's largest values (a `topk` of a few hundred, sorted): where their cumsum reaches the target,
   the cut-off is among them. A language model's nucleus is usually this small.
2. Rows whose nucleus is wider are searched by this kernel, with no host sync. Non-negative float32
   values order as their int32 bit patterns, so each round evaluates mass(bits >= pivot) at PIVOTS
   evenly spaced pivots of the current range [lo, hi) and narrows it to one gap, until hi = lo + 1:
   lo's bits are t exactly. 10 rounds of 8 pivots cover the 2**30 patterns of [0, 1]. One program per
   row reads it (from L2) once per round; rows already solved by step 1 return at once.

    probs [S, V] fp32, target [S], known [S] ──grid (S)──► t [S] fp32

Sums run in a fixed order, so the result does not vary between runs, and every pivot's mass is summed
in the same order, so the masses never increase with the pivot and the search is exact against its own
sums. Near a boundary its sums may round differently from a sort's cumsum: both are the top-p of the
same probabilities to fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PIVOTS = 8
ONE_BITS = 0x3F800000  # the int32 pattern of 1.0, the largest probability
BLOCK = 4096


def _rounds(pivots: int) -> int:
    """Rounds that narrow [0, ONE_BITS + 1) to a single bit pattern."""
    span, rounds = ONE_BITS + 1, 0
    while span > 1:
        span = -(-span // pivots)
        rounds += 1
    return rounds


ROUNDS = _rounds(PIVOTS)


@triton.jit
def _nucleus_threshold_kernel(
    probs_ptr,
    target_ptr,
    known_ptr,
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
    known = tl.load(known_ptr + row)
    # invariant: mass(bits >= lo) >= target > mass(bits >= hi); a known answer is the range [t, t + 1)
    lo = tl.where(known >= 0, known.to(tl.int32, bitcast=True), 0)
    hi = tl.where(known >= 0, lo + 1, ONE_BITS + 1)
    steps = tl.arange(0, PIVOTS) + 1
    for _ in range(ROUNDS):
        if hi - lo > 1:
            step = (hi - lo + PIVOTS - 1) // PIVOTS
            pivots = tl.minimum(lo + steps * step, hi)  # ascending; those at hi are known to fail
            above = tl.zeros([BLOCK], dtype=tl.float32)  # per column, summed once per round
            inside = tl.zeros([PIVOTS, BLOCK], dtype=tl.float32)
            for v0 in range(0, vocab, BLOCK):
                cols = v0 + tl.arange(0, BLOCK)
                p = tl.load(base + cols, mask=cols < vocab, other=0.0)
                bits = p.to(tl.int32, bitcast=True)
                above += tl.where(bits >= hi, p, 0.0)
                hit = (bits[None, :] >= pivots[:, None]) & (bits < hi)[None, :]
                inside += tl.where(hit, p[None, :], 0.0)
            reached = ((tl.sum(above) + tl.sum(inside, axis=1)) >= target) & (pivots < hi)
            new_lo = lo + tl.sum(reached.to(tl.int32)) * step
            hi = tl.minimum(hi, new_lo + step)
            lo = new_lo
    tl.store(out_ptr + row, lo.to(tl.float32, bitcast=True))


def nucleus_threshold(
    probs: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None
) -> torch.Tensor:
    """probs: [S, V] float32 >= 0 (contiguous last dim), target: [S] float32 in (0, 1] ->
    [S] float32: per row the largest t with sum(probs[probs >= t]) >= target, or 0.0 where even the
    whole row's sum falls short (rounding). `known` [S]: rows where it is >= 0 already have their answer
    (from the top candidates, `nucleus_cut`) and are returned as they are, without a search."""
    _check(probs, target)
    out = torch.empty(probs.shape[0], dtype=torch.float32, device=probs.device)
    if probs.shape[0] == 0:
        return out
    if known is None:
        known = torch.full_like(target, -1.0)
    _nucleus_threshold_kernel[(probs.shape[0],)](
        probs_ptr=probs,
        target_ptr=target,
        known_ptr=known,
        out_ptr=out,
        vocab=probs.shape[1],
        stride_row=probs.stride(0),
        ROUNDS=ROUNDS,
        PIVOTS=PIVOTS,
        ONE_BITS=ONE_BITS,
        BLOCK=BLOCK,
        num_warps=8,
    )
    return out


def nucleus_cut(probs: torch.Tensor, target: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """`nucleus_threshold` of each row, given `top`: its largest values, sorted descending (a topk).
    A row whose top values already reach its target gets its cut-off from their cumsum; only the others
    are searched (the kernel on a GPU, with no host sync; the reference elsewhere)."""
    cum = top.cumsum(dim=-1)
    first = (cum < target.unsqueeze(1)).sum(dim=-1, keepdim=True)
    reached = first.squeeze(1) < top.shape[1]
    from_top = top.gather(1, first.clamp(max=top.shape[1] - 1)).squeeze(1)
    if probs.is_cuda:
        return nucleus_threshold(probs, target, torch.where(reached, from_top, -1.0))
    if bool(reached.all()):
        return from_top
    return torch.where(reached, from_top, nucleus_threshold_ref(probs, target))


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
