"""Paged decode attention: one query token per sequence against its whole paged KV context.

The KV cache is a pool of blocks [N, BS, Hkv, D]; sequence b's token n lives in block
`block_tables[b, n // BS]` at offset `n % BS`. Decode is bound by reading K and V, so the kernel
is built around reading each K/V byte exactly once:

- GQA-aware: a program owns one KV head and all G = Hq / Hkv query heads that share it. The G
  query rows (padded to 16 for `tl.dot`) are scored against each K tile in one dot.
- Split-K (flash-decoding): each sequence cuts its own context into `num_splits` runs of whole
  BLOCK_N-token tiles, each handled by its own program, so small batches fill the GPU. The split
  count comes from shapes alone, but the cut from the sequence's length on the device: under a CUDA
  graph `max_context_len` is the whole model length, and a cut by it would leave the programs of a
  short context empty but one. Each program keeps an online softmax (running max m, sum l,
  unnormalised acc); a second kernel merges the partials of each (sequence, query head). With one
  split the first kernel normalises and writes the output itself and the second is not launched.

    grid (B, Hkv, splits):  q[b, heads of kvh] · K[tokens of split]ᵀ ─softmax─► · V  ──► m, l, acc
    grid (B, Hq)         :  merge the splits' (m, l, acc) ──► out[b, h]

The launch is CUDA-graph-capturable: shapes alone (batch, heads, `max_context_len` or the block
table's width) pick the grid; context lengths are read on the device only. Rows with
context_lens[b] == 0 produce zeros. Block-table entries past ceil(context_lens[b] / BS) are never
read. Scores use exp2 with log2(e) folded into the scale.

A row may take its last key from a given cache slot instead of its block table (`last_key_slots`):
a verify step of tree speculative decoding runs as decode rows, and an alternative row at position q
sees keys 0..q-1 of its sequence through the table but its own key where it was written, at its
slot_mapping entry, away from the table. Only that one token's address changes, in the tile that holds
it; without the slots the kernel compiles as before.

An fp8 cache (kv_cache_fp8.py) is read as bytes, converted in registers; the KV head's K scale
joins the softmax scale and its V scale multiplies the output. On a GPU it is read as 16-bit words
instead (`DecodeLaunch.fp8_pairs`, _e4m3_pairs_to_f16): each word the values of dimensions 2j and
2j + 1, so q, the tiles and the output are cut into even and odd dimensions and each dot runs twice
at half the depth, in fp16.

The Triton interpreter (CPU) computes bf16 dots wrongly, so there the tiles are upcast to fp32
before `tl.dot` (`UPCAST`); on the GPU bf16/fp16 dots run natively with fp32 accumulation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.kv_cache_fp8 import cache_bytes, check_kv_scales, dequantize_kv, is_fp8
from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait

LOG2E = 1.4426950408889634


@triton.jit
def _split_tiles(context_len, num_splits, BLOCK_N: tl.constexpr):
    """Tiles per split of one sequence (at least one: an empty context gives one empty split). A context
    with a tile for every split gets at least two a split: programs of one tile then cost more in their
    fixed part and in the merge than they gain (4,096 tokens over 64 splits, four H100s, 2026-11-26)."""
    tiles = tl.cdiv(context_len, BLOCK_N)
    per_split = tl.cdiv(tiles, num_splits)
    per_split = tl.where(tiles >= num_splits, tl.maximum(per_split, 2), per_split)
    return tl.maximum(per_split, 1)


@triton.jit
def _e4m3_pairs_to_f16(pairs, CVT: tl.constexpr):
    """Two e4m3 bytes a 16-bit word (the even dimension low) -> two fp16 tiles (even, odd dimensions).

    Why not `.to(tl.float8e4nv)`: the V tile is a dot's B operand whose k index (tokens) is strided in
    memory, so read as bytes it was gathered from shared memory a byte at a time, and each value took a
    `cvt` into fp16 and two more into bf16 on the XU pipe (62% busy, issue-bound at three warps a
    scheduler: ncu, one H200, 2026-11-30). As 16-bit words the tile reaches the dot operand as any 16-bit
    tile does. CVT (a GPU): one `cvt.rn.f16x2.e4m3x2` a word, the values themselves. Otherwise (the
    interpreter, which runs no PTX) shifts and masks: the sign and the seven exponent and mantissa bits
    moved into fp16's places, exact for every finite byte, subnormals included, at 2^-8 of the value."""
    if CVT:
        even, odd = tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
            "=h,=h,h",
            [pairs],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
        return even, odd
    x = pairs.to(tl.uint16, bitcast=True)
    even = ((x << 7) & 0x3F80) | ((x << 8) & 0x8000)
    odd = ((x >> 1) & 0x3F80) | (x & 0x8000)
    return even.to(tl.float16, bitcast=True), odd.to(tl.float16, bitcast=True)


# Integer arguments that follow the load (the number of splits and the block table's width grow with the
# longest context) must not specialize: each new "equals 1" / "divisible by 16" fact of one would compile
# the kernel again mid-serving.
@triton.jit(do_not_specialize=["num_splits", "stride_block_tables"])
def _paged_decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    k_scale_ptr,
    v_scale_ptr,
    last_key_slots_ptr,
    scale_log2,
    stride_q_batch,
    stride_q_head,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_block_tables,
    num_q_heads,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,
    FP8_PAIRS: tl.constexpr,
    LAST_KEY_SLOTS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    qk_scale = scale_log2
    if FP8_KV:
        qk_scale = scale_log2 * tl.load(k_scale_ptr + kv_head)

    context_len = tl.load(context_lens_ptr + batch)
    span = _split_tiles(context_len, num_splits, BLOCK_N) * BLOCK_N
    start = split * span
    end = tl.minimum(start + span, context_len)

    rows = tl.arange(0, GROUP_PAD)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    halves = tl.arange(0, HEAD_DIM // 2)
    if FP8_PAIRS:
        # the cache read as 16-bit words, each the pair of dimensions (2j, 2j + 1): q and the output are
        # cut the same way, and K's 2^-8 (_e4m3_pairs_to_f16) and the softmax scale go into q
        q_even_ptrs = q_ptr + batch * stride_q_batch + heads[:, None] * stride_q_head + 2 * halves[None, :]
        pair_unit = 256.0 if UPCAST else 1.0  # what _e4m3_pairs_to_f16's values are short of
        q_fold = qk_scale * pair_unit
        q_even = tl.load(q_even_ptrs, mask=row_mask[:, None], other=0.0).to(tl.float32) * q_fold
        q_odd = tl.load(q_even_ptrs + 1, mask=row_mask[:, None], other=0.0).to(tl.float32) * q_fold
        if not UPCAST:
            q_even, q_odd = q_even.to(tl.float16), q_odd.to(tl.float16)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM // 2], dtype=tl.float32)  # the even dimensions
        acc_odd = tl.zeros([GROUP_PAD, HEAD_DIM // 2], dtype=tl.float32)
    else:
        q = tl.load(
            q_ptr + batch * stride_q_batch + heads[:, None] * stride_q_head + dims[None, :],
            mask=row_mask[:, None],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + batch.to(tl.int64) * stride_block_tables
    head_offset = kv_head * stride_cache_head
    if LAST_KEY_SLOTS:
        # the token read from its own slot (-1: none, the table holds them all) and that slot's address;
        # its table entry is not read: an alternative's key may lie past the table's blocks
        last_slot = tl.load(last_key_slots_ptr + batch).to(tl.int64)
        own_token = tl.where(last_slot >= 0, context_len - 1, -1)
        own_offset = (last_slot // BLOCK_SIZE) * stride_cache_block + (last_slot % BLOCK_SIZE) * (
            stride_cache_offset
        )

    # every tile holds at least one valid token (n0 < end), so m_i is finite after the first one
    for n0 in range(start, end, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        table_mask = token_mask
        if LAST_KEY_SLOTS:
            table_mask = token_mask & (tokens != own_token)
        blocks = tl.load(block_table + tokens // BLOCK_SIZE, mask=table_mask, other=0).to(tl.int64)
        slot_offsets = blocks * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_offset
        if LAST_KEY_SLOTS:
            slot_offsets = tl.where(tokens == own_token, own_offset, slot_offsets)
        if FP8_PAIRS:
            kv_offsets = ((slot_offsets + head_offset) // 2)[:, None] + halves[None, :]
            k_even, k_odd = _e4m3_pairs_to_f16(
                tl.load(k_cache_ptr + kv_offsets, mask=token_mask[:, None], other=0), not UPCAST
            )
            if UPCAST:
                k_even, k_odd = k_even.to(tl.float32), k_odd.to(tl.float32)
            scores = tl.dot(q_even, tl.trans(k_even), input_precision=DOT_PRECISION)
            scores = tl.dot(q_odd, tl.trans(k_odd), scores, input_precision=DOT_PRECISION)
        else:
            kv_offsets = (slot_offsets + head_offset)[:, None] + dims[None, :]
            k = tl.load(k_cache_ptr + kv_offsets, mask=token_mask[:, None], other=0.0)
            if FP8_KV:
                k = k.to(tl.float8e4nv, bitcast=True).to(q.dtype)
            if UPCAST:
                k = k.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        scores = tl.where(token_mask[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        if FP8_PAIRS:
            v_even, v_odd = _e4m3_pairs_to_f16(
                tl.load(v_cache_ptr + kv_offsets, mask=token_mask[:, None], other=0), not UPCAST
            )
            if UPCAST:
                v_even, v_odd = v_even.to(tl.float32), v_odd.to(tl.float32)
            p = p.to(v_even.dtype)
            acc = acc * alpha[:, None] + tl.dot(p, v_even, input_precision=DOT_PRECISION)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd, input_precision=DOT_PRECISION)
        else:
            v = tl.load(v_cache_ptr + kv_offsets, mask=token_mask[:, None], other=0.0)
            if FP8_KV:
                v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if FP8_PAIRS:
        v_mult = tl.load(v_scale_ptr + kv_head) * pair_unit
        acc, acc_odd = acc * v_mult, acc_odd * v_mult
    elif FP8_KV:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    if SINGLE_SPLIT:
        norm = tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # empty context: acc == 0 -> zeros
        out_rows = out_ptr + batch * num_q_heads * HEAD_DIM + heads[:, None] * HEAD_DIM
        out_ty = out_ptr.dtype.element_ty
        if FP8_PAIRS:
            tl.store(out_rows + 2 * halves[None, :], (acc / norm).to(out_ty), mask=row_mask[:, None])
            tl.store(out_rows + 2 * halves[None, :] + 1, (acc_odd / norm).to(out_ty), mask=row_mask[:, None])
        else:
            tl.store(out_rows + dims[None, :], (acc / norm).to(out_ty), mask=row_mask[:, None])
    else:
        part = (batch * num_q_heads + heads) * num_splits + split  # [GROUP_PAD] index into [B, Hq, S]
        tl.store(part_m_ptr + part, m_i, mask=row_mask)
        tl.store(part_l_ptr + part, l_i, mask=row_mask)
        part_rows = part_acc_ptr + part[:, None] * HEAD_DIM
        if FP8_PAIRS:
            tl.store(part_rows + 2 * halves[None, :], acc, mask=row_mask[:, None])
            tl.store(part_rows + 2 * halves[None, :] + 1, acc_odd, mask=row_mask[:, None])
        else:
            tl.store(part_rows + dims[None, :], acc, mask=row_mask[:, None])


# The same argument does not specialize here, as in the split kernel.
@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_reduce_kernel(
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    context_lens_ptr,
    num_q_heads,
    num_splits,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Merges the splits in chunks of a fixed SPLITS_BLOCK, so one compiled kernel serves any number
    of splits (a power-of-two pad of the split count compiled once per new power, under load)."""
    pdl_launch_and_wait(USE_PDL)
    batch = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + batch)
    span = _split_tiles(context_len, num_splits, BLOCK_N) * BLOCK_N
    num_active = tl.cdiv(context_len, span)  # splits past the context wrote nothing useful
    base = (batch * num_q_heads + head) * num_splits

    lanes = tl.arange(0, SPLITS_BLOCK)
    m_lanes = tl.full([SPLITS_BLOCK], -3.0e38, tl.float32)  # finite with no active split: no inf - inf
    for start in range(0, num_active, SPLITS_BLOCK):
        splits = start + lanes
        m_lanes = tl.maximum(
            m_lanes, tl.load(part_m_ptr + base + splits, mask=splits < num_active, other=-3.0e38)
        )
    m_max = tl.max(m_lanes, axis=0)
    dims = tl.arange(0, HEAD_DIM)
    l_lanes = tl.zeros([SPLITS_BLOCK], dtype=tl.float32)
    acc_rows = tl.zeros([SPLITS_BLOCK, HEAD_DIM], dtype=tl.float32)
    for start in range(0, num_active, SPLITS_BLOCK):  # SPLITS_BLOCK partials at once, not one by one
        splits = start + lanes
        active = splits < num_active
        m = tl.load(part_m_ptr + base + splits, mask=active, other=float("-inf"))
        weight = tl.where(active, tl.exp2(m - m_max), 0.0)
        l_lanes += weight * tl.load(part_l_ptr + base + splits, mask=active, other=0.0)
        rows = (base + splits)[:, None] * HEAD_DIM + dims[None, :]
        acc_rows += weight[:, None] * tl.load(part_acc_ptr + rows, mask=active[:, None], other=0.0)
    l_total = tl.sum(l_lanes, axis=0)
    acc = tl.sum(acc_rows, axis=0)
    out = acc / tl.where(l_total > 0.0, l_total, 1.0)
    tl.store(out_ptr + (batch * num_q_heads + head) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N tokens per inner step, programs wanted to fill the device, min tokens per split of the
    longest context: it bounds the merge's work)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 64, 2 * _num_sms(index), 128
    # the interpreter: small tiles and a few programs, so that tests see several splits
    return 16, 8, 32


def decode_num_splits(batch: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Split-K programs per (sequence, KV head), from shapes only (never tensor values: CUDA-graph
    safe): enough (sequence, KV head, split) programs to fill the device, and no more splits than the
    longest context has minimum-size runs. 1 means no split."""
    _, programs_wanted, min_split = _tile_config(device)
    splits_wanted = triton.cdiv(programs_wanted, max(batch * num_kv_heads, 1))
    return max(1, min(splits_wanted, triton.cdiv(max_context_len, min_split)))


@dataclass(frozen=True)
class DecodeLaunch:
    """How one call is cut into programs: BLOCK_N tokens per inner step, split-K programs per (sequence,
    KV head), and the compiler's warps and pipeline stages per program."""

    block_n: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2
    fp8_pairs: bool = False  # an fp8 cache read as 16-bit words of two values (_e4m3_pairs_to_f16)


def decode_launch(
    batch: int, num_kv_heads: int, max_context_len: int, device: torch.device, fp8_cache: bool = False
) -> DecodeLaunch:
    """The launch for these shapes (never tensor values: CUDA-graph safe).

    Where the (sequence, KV head) programs alone fill every SM but fit one wave of 128-token tiles
    (Llama-3-8B at TP=2 and batch 33-64, at TP=1 and batch 17-32), they run unsplit with 128-token
    tiles, 8 warps and no pipelining: 13.5 us a layer against 17.3 for two splits of 64-token tiles at
    TP=2, batch 64, context 192 (one H100, results/decode-attention-sweep-2026-11-27-h100-13e8dca.json).
    Past two programs an SM (TP=1, batch 64) the 128-token tiles lost (24-25 us against 22.8). There an
    fp8 cache's programs run 2 warps: 192-195 us a layer against 247-250 with 4 at 1,024 sequences in
    three sweeps (results/decode-attention-sweep-2026-11-27-h100-fp8-*.json), and the offline 128/128
    fp8 run gave 25,958 output tok/s against 25,068-25,159 (one H100,
    results/offline-ab-2026-11-28-h100-fp8-decode-2-warps-b14eb34.json).

    On a GPU an fp8 cache is read as 16-bit words of two values (`fp8_pairs`) in every launch: one H200,
    each shape's launch (results/decode-attention-sweep-2026-11-30-h200-fp8-defaults-2c931d4.json), 1,024
    sequences 130 us a layer against 188 (0.75 of the copy floor against 0.52), 8B batch 64 at TP=1
    13.7 against 20.7 and at TP=2 10.6 against 12.5, batch 64 at 2,048 tokens 61.5 against 80.6, batch 8
    10.1 against 13.1, batch 1 10.3 against 12.5; only 70B's batch 1 (8 query heads a KV head, 64 splits)
    lost, 12.8 against 12.0. The offline 128/128 fp8 run: +1.3%
    (results/offline-ab-2026-11-30-h200-fp8-pairs-43fa15b.json)."""
    block_n, programs_wanted, _ = _tile_config(device)  # on a GPU: two programs an SM
    programs = batch * num_kv_heads
    words = device.type == "cuda" and fp8_cache
    if device.type == "cuda" and programs_wanted // 2 <= programs <= programs_wanted:
        return DecodeLaunch(128, 1, num_warps=8, num_stages=1, fp8_pairs=words)
    if words and programs > programs_wanted:
        return DecodeLaunch(block_n, 1, num_warps=2, fp8_pairs=True)
    splits = decode_num_splits(batch, num_kv_heads, max_context_len, device)
    return DecodeLaunch(block_n, splits, fp8_pairs=words)


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [batch, Hq, D], last dim contiguous; got {tuple(q.shape)} {q.stride()}")
    batch, num_q_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
            f"[blocks, block_size, Hkv, {head_dim}]"
        )
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(f"k_cache and v_cache need equal strides, last dim contiguous: {k_cache.stride()}")
    if k_cache.dtype != v_cache.dtype or (k_cache.dtype != q.dtype and not is_fp8(k_cache)):
        raise TypeError(
            f"q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}: one dtype, or fp8 caches"
        )
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two, got {block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 [{batch}, M], got {block_tables.dtype} {block_tables.shape}"
        )
    if block_tables.stride(1) != 1:
        raise ValueError(
            f"block_tables needs a contiguous last dimension, got strides {block_tables.stride()}"
        )
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(
            f"context_lens must be int32 [{batch}], got {context_lens.dtype} {context_lens.shape}"
        )
    if not context_lens.is_contiguous():
        raise ValueError("context_lens must be contiguous")


def _check_last_key_slots(last_key_slots: torch.Tensor | None, q: torch.Tensor) -> None:
    """Shapes, dtype and device only: the values stay on the device (CUDA-graph safe)."""
    if last_key_slots is None:
        return
    batch = q.shape[0]
    if (
        last_key_slots.shape != (batch,)
        or last_key_slots.dtype != torch.int64
        or last_key_slots.device != q.device
        or not last_key_slots.is_contiguous()
    ):
        raise ValueError(
            f"last_key_slots must be contiguous int64 [{batch}] on {q.device}, got {last_key_slots.dtype} "
            f"{tuple(last_key_slots.shape)} on {last_key_slots.device}"
        )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    launch: DecodeLaunch | None = None,
    last_key_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q Kᵀ) V over each sequence's paged context. q: [B, Hq, D] -> [B, Hq, D].

    k_cache, v_cache: [N, BS, Hkv, D]; block_tables: [B, M] int32; context_lens: [B] int32 (0 allowed:
    zeros out). `max_context_len` bounds every context length (defaults to M * BS) and, with the
    shapes, fixes the number of splits. An fp8 cache takes k_scale, v_scale: [Hkv] fp32. `launch`
    overrides `decode_launch`'s choice (benchmarks/sweep_decode_attention.py compares choices).

    last_key_slots: [B] int64 or None. Where last_key_slots[b] >= 0, row b's last key (index
    context_lens[b] - 1) is read from that cache slot (block * BS + offset), not through its table: a
    tree verify step's alternative row sees its own key, written away from its sequence's blocks. A
    negative entry (padding's -1) keeps the table; a decode step's own slot_mapping changes nothing.
    """
    _check_args(q, k_cache, v_cache, block_tables, context_lens)
    _check_last_key_slots(last_key_slots, q)
    fp8 = check_kv_scales(k_cache, k_scale, v_scale, k_cache.shape[2])
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size

    launch = launch or decode_launch(batch, num_kv_heads, max_context_len, q.device, is_fp8(k_cache))
    block_n, num_splits = launch.block_n, launch.num_splits
    on_gpu = q.device.type == "cuda"
    use_pdl = pdl_enabled(q)
    if num_splits > 1:
        part_shape = (batch, num_q_heads, num_splits)
        part_m = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((*part_shape, head_dim), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused

    pairs = fp8 and launch.fp8_pairs
    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q_ptr=q,
        k_cache_ptr=cache_bytes(k_cache).view(torch.int16) if pairs else cache_bytes(k_cache),
        v_cache_ptr=cache_bytes(v_cache).view(torch.int16) if pairs else cache_bytes(v_cache),
        block_tables_ptr=block_tables,
        context_lens_ptr=context_lens,
        out_ptr=out,
        part_m_ptr=part_m,
        part_l_ptr=part_l,
        part_acc_ptr=part_acc,
        k_scale_ptr=k_scale if fp8 else context_lens,
        v_scale_ptr=v_scale if fp8 else context_lens,
        last_key_slots_ptr=context_lens if last_key_slots is None else last_key_slots,
        scale_log2=scale * LOG2E,
        stride_q_batch=q.stride(0),
        stride_q_head=q.stride(1),
        stride_cache_block=k_cache.stride(0),
        stride_cache_offset=k_cache.stride(1),
        stride_cache_head=k_cache.stride(2),
        stride_block_tables=block_tables.stride(0),
        num_q_heads=num_q_heads,
        num_splits=num_splits,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        SINGLE_SPLIT=num_splits == 1,
        UPCAST=not on_gpu or q.dtype == torch.float32,  # fp32 queries dot in fp32 on the GPU too
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8_KV=fp8,
        FP8_PAIRS=pairs,
        LAST_KEY_SLOTS=last_key_slots is not None,
        USE_PDL=use_pdl,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        launch_pdl=use_pdl,
    )
    if num_splits > 1:
        _paged_decode_reduce_kernel[(batch, num_q_heads)](
            out_ptr=out,
            part_m_ptr=part_m,
            part_l_ptr=part_l,
            part_acc_ptr=part_acc,
            context_lens_ptr=context_lens,
            num_q_heads=num_q_heads,
            num_splits=num_splits,
            BLOCK_N=block_n,
            HEAD_DIM=head_dim,
            SPLITS_BLOCK=16,
            USE_PDL=use_pdl,
            num_warps=1 if head_dim <= 64 else 2,
            launch_pdl=use_pdl,
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    last_key_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch `paged_decode_attention`: gather each sequence's K/V, masked softmax in fp32.

    Vectorised over the batch with no host sync. Garbage block-table entries are clamped to a valid
    block id and their tokens masked out (and zeroed, so NaN garbage cannot leak through 0 * NaN).
    A row's last key from `last_key_slots` joins as one extra key column, its table position masked:
    softmax does not care where a key sits, and the table need not reach that position.
    """
    batch, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    group = num_q_heads // num_kv_heads
    num_table_blocks = block_tables.shape[1]
    if max_context_len is not None:
        num_table_blocks = min(num_table_blocks, math.ceil(max_context_len / block_size))
    tables = block_tables[:, :num_table_blocks].long().clamp(0, num_blocks - 1)
    length = num_table_blocks * block_size
    positions = torch.arange(length, device=q.device)[None, :]
    lens = context_lens[:, None].long()
    valid = positions < lens  # [B, L]
    if last_key_slots is not None:
        own = (last_key_slots[:, None] >= 0) & (lens > 0)  # [B, 1]: the last key comes from its slot
        valid = torch.cat([valid & ~(own & (positions == lens - 1)), own], dim=1)  # [B, L + 1]
        own_slots = last_key_slots.clamp(0, num_blocks * block_size - 1)

    def gather(cache: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:  # -> [B, L(+1), Hkv, D] fp32
        x = dequantize_kv(cache[tables].reshape(batch, length, num_kv_heads, head_dim), s)
        if last_key_slots is not None:
            own_x = dequantize_kv(cache.reshape(-1, num_kv_heads, head_dim)[own_slots], s)
            x = torch.cat([x, own_x[:, None]], dim=1)
        return torch.where(valid[:, :, None, None], x, 0.0)  # invalid tokens zeroed

    check_kv_scales(k_cache, k_scale, v_scale, num_kv_heads)
    k, v = gather(k_cache, k_scale), gather(v_cache, v_scale)
    qf = q.float().reshape(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty contexts: all -inf -> NaN -> 0
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)
