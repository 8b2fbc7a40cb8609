"""Paged prefill attention: varlen causal attention whose K/V come from the paged KV cache.

One launch serves a whole batch of sequences with different query counts. Sequence b owns query
rows q[query_start_loc[b] : query_start_loc[b+1]] (q_len_b of them), and these are the LAST q_len_b
tokens of its context of context_lens[b] tokens, whose K/V `rotary_kv_write` has already put in
the cache. Query i sits at position context_lens[b] - q_len_b + i and sees keys 0..that position.
Fresh prompts (q_len == context), chunked prefill, prefix-cache hits and speculative verify
(k + 1 queries) are all this one case.

Tree speculative decoding verifies a chain and its alternatives in one pass: rows [root, c1..ck,
a1..am] sit at slots p..p+k+m but alternative a_i continues the prefix at position p+i, not at its
slot. There the caller passes each row's position (`query_positions`), and a row sees the keys
below its position plus the key at its own slot (where position == slot this is the causal rule).

Tiling (flash-attention style, online softmax in fp32):

    grid (query tiles, B, Hkv): a program takes BLOCK_Q query tokens × the G = Hq / Hkv heads that
    share one KV head, flattened to BLOCK_M = BLOCK_Q * G_PAD rows (row r: token r // G_PAD, head
    r % G_PAD), so each K/V tile is read once for the whole group.

    keys [0, full_end)       : visible to every row of the tile, no mask
    keys [full_end, kv_end)  : causal mask  key_pos <= query_pos  (the diagonal band)

With positions, full_end comes from the tile's smallest position (its rows need not be in position
order) and the mask is key < position | key == slot; kv_end still follows the slots. The first
masked tile may then hold no visible key for some row, so those tiles keep the running max finite.

K/V rows are gathered token by token through the block table (block = table[n // BS], offset
n % BS), so block tables may be any permutation, and entries past the context are never read.
Query tiles past a sequence's q_len return at once; the grid's first dimension comes from
`max_query_len` (or the total token count, which needs no host sync).

Under a CUDA graph the grid is fixed at capture, while the step's query lengths are not: there the
launcher takes a tile map (`query_tiles`, built on the host): one (sequence, query tile) pair per
program of a one-dimensional grid, padded with (-1, 0) entries that return at once. Its size,
cdiv(T, BLOCK_Q) + B, bounds the tiles of any B sequences holding T tokens, so a graph captured for
T tokens and B sequence slots serves every step that fits them, at the cost of B idle programs.

An fp8 cache (kv_cache_fp8.py) is read as bytes, converted in registers; the KV head's K scale
joins the softmax scale and its V scale multiplies the output.

The Triton interpreter (CPU) computes bf16 dots wrongly, so there the tiles are upcast to fp32
before `tl.dot` (`UPCAST`); on the GPU bf16/fp16 dots run natively with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.kv_cache_fp8 import cache_bytes, check_kv_scales, dequantize_kv, is_fp8

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    k_head_ptr,
    v_head_ptr,
    block_table,
    n0,
    kv_end,
    query_pos,
    row_pos,
    scale_log2,
    stride_cache_block,
    stride_cache_offset,
    dims,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
):
    """One K/V tile (keys n0 .. n0 + BLOCK_N) of the online softmax: returns the new (m_i, l_i, acc).

    k_head_ptr / v_head_ptr point at the program's KV head in the caches. Without CAUSAL_MASK every
    key of the tile must be visible to every row (no loads masked); with it, keys past each row's
    position or past kv_end are masked out. query_pos is each row's slot index; with HAS_POSITIONS a
    row sees keys below its row_pos plus the key at its slot, and may see none of this tile.
    """
    keys = n0 + tl.arange(0, BLOCK_N)
    if CAUSAL_MASK:
        key_mask = keys < kv_end
        blocks = tl.load(block_table + keys // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    else:
        blocks = tl.load(block_table + keys // BLOCK_SIZE).to(tl.int64)
    token_offsets = blocks * stride_cache_block + (keys % BLOCK_SIZE) * stride_cache_offset
    kv_offsets = token_offsets[:, None] + dims[None, :]
    if CAUSAL_MASK:
        k = tl.load(k_head_ptr + kv_offsets, mask=key_mask[:, None], other=0.0)
        v = tl.load(v_head_ptr + kv_offsets, mask=key_mask[:, None], other=0.0)
    else:
        k = tl.load(k_head_ptr + kv_offsets)
        v = tl.load(v_head_ptr + kv_offsets)
    if FP8_KV:
        k = k.to(tl.float8e4nv, bitcast=True).to(q.dtype)
        v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if CAUSAL_MASK:
        if HAS_POSITIONS:
            visible = (keys[None, :] < row_pos[:, None]) | (keys[None, :] == query_pos[:, None])
            visible = visible & key_mask[None, :]
        else:
            visible = (keys[None, :] <= query_pos[:, None]) & key_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_ref = m_new  # what the exponents subtract
    if CAUSAL_MASK:
        if HAS_POSITIONS:
            # a row with no visible key yet: subtract 0, not -inf (exp2(-inf - -inf) is NaN)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# The block table's width (its row stride) follows the longest context in the step: specialized, each
# new "equals 1" / "divisible by 16" fact of it would compile the kernel again mid-serving.
@triton.jit(do_not_specialize=["stride_block_tables"])
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    out_ptr,
    k_scale_ptr,
    v_scale_ptr,
    tile_map_ptr,
    query_positions_ptr,
    scale_log2,
    stride_q_token,
    stride_q_head,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_block_tables,
    num_q_heads,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,
    TILE_MAP: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    if TILE_MAP:
        batch = tl.load(tile_map_ptr + 2 * tl.program_id(0))
        q_tile = tl.load(tile_map_ptr + 2 * tl.program_id(0) + 1)
        if batch < 0:
            return
    else:
        q_tile = tl.program_id(0)
        batch = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + batch)
    q_len = tl.load(query_start_loc_ptr + batch + 1) - q_start
    q0 = q_tile * BLOCK_Q
    if q0 >= q_len:
        return
    context_len = tl.load(context_lens_ptr + batch)
    first_pos = context_len - q_len + q0  # position of the tile's first query token

    rows = tl.arange(0, BLOCK_M)
    row_token = q0 + rows // GROUP_PAD
    row_head = kv_head * GROUP + rows % GROUP_PAD
    row_mask = (row_token < q_len) & (rows % GROUP_PAD < GROUP)
    query_pos = context_len - q_len + row_token  # each row's slot index
    row_pos = query_pos
    if HAS_POSITIONS:
        row_pos = tl.load(query_positions_ptr + q_start + row_token, mask=row_token < q_len, other=0)
        # clamped to [0, slot] so no row reaches past the tile's keys; rows of no token keep their slot
        row_pos = tl.where(
            row_token < q_len, tl.maximum(tl.minimum(row_pos.to(tl.int32), query_pos), 0), query_pos
        )
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (
        (q_start + row_token).to(tl.int64)[:, None] * stride_q_token
        + (row_head * stride_q_head)[:, None]
        + dims[None, :]
    )
    q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_table = block_tables_ptr + batch.to(tl.int64) * stride_block_tables
    k_head_ptr = k_cache_ptr + kv_head * stride_cache_head
    v_head_ptr = v_cache_ptr + kv_head * stride_cache_head
    qk_scale = scale_log2
    if FP8_KV:
        qk_scale = scale_log2 * tl.load(k_scale_ptr + kv_head)

    # keys below full_end are visible to every row; the last row sees keys up to kv_end - 1
    kv_end = tl.minimum(context_len, first_pos + BLOCK_Q)
    if HAS_POSITIONS:
        # each row sees the keys below its position: below the smallest, every row sees them
        full_end = (tl.min(row_pos, axis=0) // BLOCK_N) * BLOCK_N
    else:
        full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_head_ptr, v_head_ptr, block_table, n0, kv_end, query_pos,
            row_pos, qk_scale, stride_cache_block, stride_cache_offset, dims,
            BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL_MASK=False,
            UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, FP8_KV=FP8_KV, HAS_POSITIONS=HAS_POSITIONS,
        )  # fmt: skip
    # the first masked tile holds key full_end <= first_pos, visible to every row: m_i stays finite
    # (with positions it need not be; there _attend_tile guards the rows that have seen no key yet,
    # and every row sees its own slot, so none ends with l_i == 0)
    for n0 in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_head_ptr, v_head_ptr, block_table, n0, kv_end, query_pos,
            row_pos, qk_scale, stride_cache_block, stride_cache_offset, dims,
            BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, CAUSAL_MASK=True,
            UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, FP8_KV=FP8_KV, HAS_POSITIONS=HAS_POSITIONS,
        )  # fmt: skip

    out = acc / l_i[:, None]
    if FP8_KV:
        out = out * tl.load(v_scale_ptr + kv_head)
    out_offsets = (
        (q_start + row_token).to(tl.int64)[:, None] * (num_q_heads * HEAD_DIM)
        + (row_head * HEAD_DIM)[:, None]
        + dims[None, :]
    )
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def _tile_config(device: torch.device, group_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) per program.

    GPU: swept on an H100 (bf16, D=128, block 16; 2026-11-22) over BLOCK_M 64/128, BLOCK_N
    32/64/128, 4/8 warps, 1-4 stages; 64×64, 4 warps, 2 stages was best or within 8% of best for
    1×4096 and 8×512 prompts at GQA 4 and 8.
    """
    if device.type != "cuda":
        return max(32, group_pad), 32, 4, 1  # the interpreter: small tiles keep tests quick
    return max(64, group_pad), 64, 4, 2


def query_block(num_q_heads: int, num_kv_heads: int, device: torch.device) -> int:
    """Query tokens per program (BLOCK_Q) for this head layout on this device: what a tile map counts in."""
    group_pad = triton.next_power_of_2(num_q_heads // num_kv_heads)
    return _tile_config(device, group_pad)[0] // group_pad


def tile_map_size(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Entries of a tile map that fits any `num_seqs` sequences holding `num_tokens` query tokens."""
    return triton.cdiv(num_tokens, block_q) + num_seqs


def query_tiles(query_start_loc: list[int], block_q: int, size: int) -> list[int]:
    """The tile map of a step, flattened: (sequence, query tile) per program, padded to `size` entries
    with (-1, 0)."""
    pairs = [
        v
        for b in range(len(query_start_loc) - 1)
        for tile in range(triton.cdiv(query_start_loc[b + 1] - query_start_loc[b], block_q))
        for v in (b, tile)
    ]
    if len(pairs) > 2 * size:
        raise ValueError(f"the step needs {len(pairs) // 2} query tiles, more than the map's {size}")
    return pairs + [-1, 0] * (size - len(pairs) // 2)


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [tokens, Hq, D], last dim contiguous; got {tuple(q.shape)} {q.stride()}")
    num_q_heads, head_dim = q.shape[1:]
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
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two, got {block_size}")
    batch = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if context_lens.dim() != 1 or context_lens.dtype != torch.int32 or not context_lens.is_contiguous():
        raise ValueError(
            f"context_lens must be contiguous int32 [B], got {context_lens.dtype} {context_lens.shape}"
        )
    if query_start_loc.shape != (batch + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(
            f"query_start_loc must be int32 [B + 1 = {batch + 1}], got "
            f"{query_start_loc.dtype} {query_start_loc.shape}"
        )
    if not query_start_loc.is_contiguous():
        raise ValueError("query_start_loc must be contiguous")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 [{batch}, M], got {block_tables.dtype} {block_tables.shape}"
        )
    if block_tables.stride(1) != 1:
        raise ValueError(
            f"block_tables needs a contiguous last dimension, got strides {block_tables.stride()}"
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tile_map: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its paged context.

    q: [T, Hq, D] (the batch's query tokens back to back); k_cache, v_cache: [N, BS, Hkv, D];
    block_tables: [B, M] int32; query_start_loc: [B + 1] int32 (cumulative query counts, last = T);
    context_lens: [B] int32, each >= that sequence's query count. `max_query_len` bounds every
    query count (defaults to T). An fp8 cache takes k_scale, v_scale: [Hkv] fp32. `tile_map`: [G, 2]
    int32 from `query_tiles` (the grid is then G programs a KV head, `max_query_len` unused).
    `query_positions`: [T] int64 or int32 (the model's RoPE positions, as they are: no copy), for tree
    verify, where a row's position may lie below its slot index s = context_len - q_len + i; the row
    then sees keys below its position and the key at s. Positions must lie in [0, s] (the kernel
    clamps to it); None, or positions equal to the slots, is plain causal attention. Returns
    [T, Hq, D] of q.dtype; rows of no sequence are left unwritten.
    """
    _check_args(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    fp8 = check_kv_scales(k_cache, k_scale, v_scale, k_cache.shape[2])
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = context_lens.shape[0]
    group = num_q_heads // num_kv_heads
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = num_tokens

    group_pad = triton.next_power_of_2(group)
    block_m, block_n, num_warps, num_stages = _tile_config(q.device, group_pad)
    block_q = block_m // group_pad
    grid = (triton.cdiv(max_query_len, block_q), batch, num_kv_heads)
    if tile_map is not None:
        if tile_map.dim() != 2 or tile_map.shape[1] != 2 or tile_map.dtype != torch.int32:
            raise ValueError(f"tile_map must be int32 [G, 2], got {tile_map.dtype} {tuple(tile_map.shape)}")
        grid = (tile_map.shape[0], 1, num_kv_heads)
    if query_positions is not None:
        if (
            query_positions.shape != (num_tokens,)
            or query_positions.dtype not in (torch.int32, torch.int64)
            or query_positions.stride(0) != 1
            or query_positions.device != q.device
        ):
            raise ValueError(
                f"query_positions must be contiguous int32/int64 [{num_tokens}] on {q.device}, got "
                f"{query_positions.dtype} {tuple(query_positions.shape)} on {query_positions.device}"
            )
    _paged_prefill_kernel[grid](
        q_ptr=q,
        k_cache_ptr=cache_bytes(k_cache),
        v_cache_ptr=cache_bytes(v_cache),
        block_tables_ptr=block_tables,
        query_start_loc_ptr=query_start_loc,
        context_lens_ptr=context_lens,
        out_ptr=out,
        k_scale_ptr=k_scale if fp8 else context_lens,
        v_scale_ptr=v_scale if fp8 else context_lens,
        tile_map_ptr=tile_map if tile_map is not None else context_lens,
        query_positions_ptr=query_positions if query_positions is not None else context_lens,
        scale_log2=scale * LOG2E,
        stride_q_token=q.stride(0),
        stride_q_head=q.stride(1),
        stride_cache_block=k_cache.stride(0),
        stride_cache_offset=k_cache.stride(1),
        stride_cache_head=k_cache.stride(2),
        stride_block_tables=block_tables.stride(0),
        num_q_heads=num_q_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        UPCAST=q.device.type != "cuda",
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8_KV=fp8,
        TILE_MAP=tile_map is not None,
        HAS_POSITIONS=query_positions is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tile_map: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch `paged_prefill_attention`: per sequence, gather K/V from its blocks, causal
    softmax in fp32 (query i at slot s = context_len - q_len + i sees keys 0..s; with
    `query_positions`, the keys below its position, clamped to [0, s], and the key at s)."""
    num_q_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    check_kv_scales(k_cache, k_scale, v_scale, num_kv_heads)
    starts = query_start_loc.tolist()
    for b, context_len in enumerate(context_lens.tolist()):
        q_len = starts[b + 1] - starts[b]
        if q_len == 0:
            continue
        blocks = block_tables[b, : -(-context_len // block_size)].long()
        k = dequantize_kv(k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len], k_scale)
        v = dequantize_kv(v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len], v_scale)
        k = k.repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        qb = q[starts[b] : starts[b + 1]].float()  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        slot = torch.arange(context_len - q_len, context_len, device=q.device)
        keys = torch.arange(context_len, device=q.device)[None, :]
        visible = keys <= slot[:, None]  # [q_len, ctx]
        if query_positions is not None:
            pos = torch.minimum(query_positions[starts[b] : starts[b + 1]].long(), slot)
            visible = (keys < pos[:, None]) | (keys == slot[:, None])
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[b] : starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
