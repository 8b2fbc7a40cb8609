"""Guided decoding's mask on the logits: tokens a grammar forbids get -inf before sampling.

The engine's grammars (llguidance, fuserve/workers/guided_decoding.py) fill one int32 bitmask row per
sampling sequence on the CPU, bit `t % 32` of word `t // 32` set when token t is allowed (llguidance's
and vLLM's layout); rows of unconstrained sequences are all ones. One launch masks every row in place:

    logits [S, V] float, bitmask [S, W] int32 ──grid (S, ⌈V / BLOCK⌉)──► logits[s, t] = -inf where bit clear

Only the forbidden entries are written and the logits are never read, so a step costs one read of the
bitmask (V/8 bytes a row) plus the stores. Tokens past the bitmask's 32·W columns (a model vocabulary
padded beyond the tokenizer's) are forbidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _token_bitmask_kernel(
    logits_ptr, bitmask_ptr, vocab, num_words, stride_logits, stride_mask, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < vocab
    word_idx = cols // 32
    in_mask = in_vocab & (word_idx < num_words)
    words = tl.load(bitmask_ptr + row * stride_mask + word_idx, mask=in_mask, other=0)
    allowed = ((words >> (cols % 32)) & 1) != 0
    minus_inf = tl.full([BLOCK], float("-inf"), dtype=logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row.to(tl.int64) * stride_logits + cols, minus_inf, mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits: [S, V] float (last dim contiguous), bitmask: [S, W] int32 on the same device. Sets the
    forbidden logits to -inf in place and returns `logits`."""
    _check(logits, bitmask)
    rows, vocab = logits.shape
    if rows == 0 or vocab == 0:
        return logits
    _token_bitmask_kernel[(rows, triton.cdiv(vocab, BLOCK))](
        logits,
        bitmask,
        vocab,
        bitmask.shape[1],
        logits.stride(0),
        bitmask.stride(0),
        BLOCK=BLOCK,
        num_warps=4,
    )
    return logits


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Plain-torch `apply_token_bitmask`."""
    _check(logits, bitmask)
    rows, vocab = logits.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1).bool()  # [S, 32 W]
    if bits.shape[1] < vocab:
        bits = torch.cat([bits, bits.new_zeros(rows, vocab - bits.shape[1])], dim=1)
    return logits.masked_fill_(~bits[:, :vocab], float("-inf"))


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The kernel on a GPU, the reference elsewhere (CPU runs, and shapes the kernel does not take)."""
    if logits.is_cuda and logits.stride(1) == 1 and bitmask.is_contiguous():
        return apply_token_bitmask(logits, bitmask)
    return apply_token_bitmask_ref(logits, bitmask)


def _check(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or bitmask.dim() != 2 or logits.shape[0] != bitmask.shape[0]:
        raise ValueError(
            f"token bitmask takes logits [rows, vocab] and a bitmask [rows, words], got "
            f"{tuple(logits.shape)} and {tuple(bitmask.shape)}"
        )
    if bitmask.dtype != torch.int32 or not logits.is_floating_point():
        raise ValueError(
            f"token bitmask takes float logits and an int32 bitmask, got {logits.dtype}, {bitmask.dtype}"
        )
    if logits.device != bitmask.device:
        raise ValueError(f"logits on {logits.device} but bitmask on {bitmask.device}: copy the bitmask first")
