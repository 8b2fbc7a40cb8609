"""Greedy sampling's argmax over the vocabulary, split across the GPU.

torch's argmax reduces a [1, 128256] row with one thread block: ~30-37 us on an H200, ~1% of a batch-1
decode step, spent by both TP=1 and TP=2. Here the row is cut into chunks that many programs scan at
once, then one program per row picks the best chunk:

    logits [S, V] ──grid (S, chunks): max, first index of it──► [S, chunks] ──grid (S): best──► [S]

Ties go to the lowest index, as in torch. NaN is not ordered as torch orders it (torch takes NaN as the
maximum); only a broken step produces one.

`argmax_keys` ends in a key per row instead of an index, for vocab-parallel logits
(fuserve/parallel/vocab_parallel_argmax.py): the max and its index (+ the slice's offset in the whole
vocabulary) packed in one int64 whose integer order is the order of (value, -index), so that a MAX
all-reduce of every rank's keys picks the first maximum of the whole row:

    key = orderable_bits(float32 max) << 32  |  (2**31 - 1 - index)

`orderable_bits` maps a float32 to an int32 of the same order (negative floats get their magnitude bits
flipped; -0.0 becomes +0.0, which it equals).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait

CHUNK = 2048
MAX_CHUNKS = 1024  # vocabularies up to 2M entries
LOW_MASK = (1 << 31) - 1  # a key's low word: LOW_MASK - index (indices below 2**31)


@triton.jit
def _chunk_max_kernel(
    x_ptr, part_val_ptr, part_idx_ptr, vocab, stride_x, num_chunks, CHUNK: tl.constexpr, USE_PDL: tl.constexpr
):
    pdl_launch_and_wait(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < vocab, other=float("-inf"))
    x = x.to(tl.float32)
    best, where = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(part_val_ptr + row * num_chunks + chunk, best)
    tl.store(part_idx_ptr + row * num_chunks + chunk, chunk * CHUNK + where)


@triton.jit
def _pick_chunk_kernel(
    part_val_ptr,
    part_idx_ptr,
    out_ptr,
    num_chunks,
    offset,
    CHUNKS_PAD: tl.constexpr,
    KEYED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS_PAD)
    mask = chunks < num_chunks
    vals = tl.load(part_val_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    best_val, best = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    idx = tl.load(part_idx_ptr + row * num_chunks + best).to(tl.int64)
    if KEYED:
        bits = tl.where(best_val == 0.0, 0, best_val.to(tl.int32, bitcast=True))
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        tl.store(out_ptr + row, (bits.to(tl.int64) << 32) | (0x7FFFFFFF - (idx + offset)))
    else:
        tl.store(out_ptr + row, idx)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x: [S, V] float logits (last dim contiguous) -> [S] int64, the first index of each row's max."""
    return _argmax(x, keyed=False, offset=0)


def argmax_keys(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x: [S, V] float logits (last dim contiguous), the slice of a vocabulary that starts at `offset`
    -> [S] int64 keys of each row's first max (module docstring)."""
    return _argmax(x, keyed=True, offset=offset)


def _argmax(x: torch.Tensor, keyed: bool, offset: int) -> torch.Tensor:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"argmax takes [rows, vocab] logits with a contiguous last dim, got {tuple(x.shape)}"
        )
    rows, vocab = x.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    if vocab == 0 or num_chunks > MAX_CHUNKS:
        raise ValueError(f"argmax handles 1..{CHUNK * MAX_CHUNKS} columns, got {vocab}")
    if offset + vocab > LOW_MASK:
        raise ValueError(f"argmax keys hold indices below 2**31, got a slice ending at {offset + vocab}")
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    part_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=x.device)
    use_pdl = pdl_enabled(x)
    _chunk_max_kernel[(rows, num_chunks)](
        x,
        part_val,
        part_idx,
        vocab,
        x.stride(0),
        num_chunks,
        CHUNK=CHUNK,
        USE_PDL=use_pdl,
        num_warps=4,
        launch_pdl=use_pdl,
    )
    _pick_chunk_kernel[(rows,)](
        part_val,
        part_idx,
        out,
        num_chunks,
        offset,
        CHUNKS_PAD=triton.next_power_of_2(num_chunks),
        KEYED=keyed,
        USE_PDL=use_pdl,
        num_warps=1,
        launch_pdl=use_pdl,
    )
    return out


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch `argmax`."""
    return x.argmax(dim=-1)


def pack_keys(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """values: [S] float (each row's max), indices: [S] int64 (its index in the whole vocabulary) ->
    [S] int64 keys (module docstring)."""
    values = values.float()
    bits = torch.where(values == 0, 0, values.view(torch.int32))
    ordered = torch.where(bits < 0, bits ^ LOW_MASK, bits).to(torch.int64)
    return (ordered << 32) | (LOW_MASK - indices)


def key_tokens(keys: torch.Tensor) -> torch.Tensor:
    """The vocabulary index each key carries."""
    return LOW_MASK - (keys & LOW_MASK)


def argmax_keys_ref(x: torch.Tensor, offset: int) -> torch.Tensor:
    """Plain-torch `argmax_keys`."""
    where = x.argmax(dim=-1)
    return pack_keys(x.gather(1, where.unsqueeze(1)).squeeze(1), where + offset)


def _kernel_fits(logits: torch.Tensor) -> bool:
    return (
        logits.is_cuda
        and logits.dim() == 2
        and logits.stride(1) == 1
        and 0 < logits.shape[1] <= CHUNK * MAX_CHUNKS
    )


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row: the split kernel on the GPU, torch elsewhere."""
    return argmax(logits) if _kernel_fits(logits) else argmax_ref(logits)


def greedy_keys(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """`argmax_keys` of each row: the split kernel on the GPU, torch elsewhere."""
    return argmax_keys(logits, offset) if _kernel_fits(logits) else argmax_keys_ref(logits, offset)
