"""paged_prefill_attention against its torch reference: varlen causal attention over the paged cache,
where each sequence's queries are the last tokens of its context (fresh prompts, chunked prefill,
prefix-cache hits and speculative verify alike), and tree verify, where rows carry their own positions."""

from __future__ import annotations

import itertools

import pytest
import torch

from fuserve.workers.kernels.paged_prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
    query_block,
    query_tiles,
    tile_map_size,
)

# as for decode: fp32 differs by summation order; bf16/fp16 by the probabilities' rounding for the
# P·V dot on the GPU and the output's rounding
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 4e-3, "atol": 4e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (query tokens, context length) per sequence
MIXED_BATCH = [
    (1, 1),  # a one-token prompt
    (17, 17),  # a fresh prompt, not a multiple of the block size
    (5, 40),  # chunked prefill / prefix-cache hit: 35 tokens already cached
    (4, 29),  # speculative verify: k + 1 = 4 queries
    (33, 33),  # several query tiles
    (1, 50),  # one query over a long context
    (3, 33),  # first query at position 30: the diagonal band starts 2 keys before a key-tile edge (32)
]


def _run(
    paged_kv,
    seqs: list[tuple[int, int]],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    max_query_len: int | None,
    q_row_pad: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    kv = paged_kv([ctx for _, ctx in seqs], block_size, num_kv_heads, head_dim, dtype)
    query_start_loc = torch.tensor(
        [0, *itertools.accumulate(q for q, _ in seqs)], dtype=torch.int32, device=device
    )
    num_tokens = int(query_start_loc[-1])
    # q_row_pad > 0: q is a column slice of a wider tensor (token stride > Hq * D)
    q = torch.randn(num_tokens, num_q_heads * head_dim + q_row_pad, dtype=dtype, device=device)
    q = q[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.context_lens, head_dim**-0.5)
    out = paged_prefill_attention(*args, max_query_len=max_query_len)
    assert out.shape == q.shape and out.dtype == dtype
    return out, paged_prefill_attention_ref(*args, max_query_len=max_query_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(2, 2), (8, 2), (8, 1)])  # GQA 1 / 4 / 8
def test_prefill_matches_ref(
    num_q_heads: int, num_kv_heads: int, block_size: int, dtype: torch.dtype, paged_kv, device: torch.device
):
    max_query_len = max(q for q, _ in MIXED_BATCH)
    out, ref = _run(
        paged_kv, MIXED_BATCH, num_q_heads, num_kv_heads, 32, block_size, dtype, device, max_query_len
    )
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_default_max_query_len_and_strided_q(dtype: torch.dtype, paged_kv, device: torch.device):
    """No max_query_len (the grid covers all T tokens), q as a strided view, odd GQA (3 heads per KV head)."""
    seqs = [(9, 9), (3, 70), (1, 1)]
    out, ref = _run(paged_kv, seqs, 6, 2, 64, 16, dtype, device, max_query_len=None, q_row_pad=64)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


def test_prefill_through_a_padded_tile_map_matches_ref(paged_kv, device: torch.device):
    """The CUDA-graph launch: a fixed one-dimensional grid from a host-built tile map, sized for more
    tokens and sequences than the step holds, with empty sequence slots (q_len 0, context 0) after the
    real ones and query rows of no sequence at the end (a padded bucket)."""
    seqs = [(17, 17), (1, 40), (5, 29), (33, 33)]
    num_q_heads, num_kv_heads, head_dim, block_size = 8, 2, 32, 8
    kv = paged_kv([ctx for _, ctx in seqs] + [1, 1], block_size, num_kv_heads, head_dim, torch.float16)
    starts = [0, *itertools.accumulate(q for q, _ in seqs)]
    real, padded = starts[-1], starts[-1] + 7
    query_start_loc = torch.tensor(starts + [real, real], dtype=torch.int32, device=device)
    context_lens = kv.context_lens.clone()
    context_lens[len(seqs) :] = 0
    q = torch.randn(padded, num_q_heads, head_dim, dtype=torch.float16, device=device)
    block_q = query_block(num_q_heads, num_kv_heads, device)
    size = tile_map_size(padded, len(seqs) + 2, block_q)
    tiles = query_tiles(starts, block_q, size)
    assert len(tiles) == 2 * size and tiles[-2:] == [-1, 0]
    tile_map = torch.tensor(tiles, dtype=torch.int32, device=device).view(size, 2)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, context_lens, head_dim**-0.5)
    out = paged_prefill_attention(*args, tile_map=tile_map)
    ref = paged_prefill_attention_ref(*args, tile_map=tile_map)
    torch.testing.assert_close(out[:real], ref[:real], **TOLERANCE[torch.float16])


def test_tile_map_bound_holds_and_overflow_is_refused() -> None:
    """cdiv(T, BLOCK_Q) + B entries hold the tiles of any B sequences of T tokens in all."""
    for lens in ([1] * 16, [16] * 4, [17, 1, 1, 15], [64], [3, 29, 1, 31]):
        starts = [0, *itertools.accumulate(lens)]
        size = tile_map_size(starts[-1], len(lens), 16)
        tiles = query_tiles(starts, 16, size)
        pairs = list(zip(tiles[::2], tiles[1::2], strict=True))
        want = [(b, t) for b, n in enumerate(lens) for t in range(-(-n // 16))]
        assert pairs[: len(want)] == want and set(pairs[len(want) :]) <= {(-1, 0)}
    with pytest.raises(ValueError, match="needs 3 query tiles"):
        query_tiles([0, 16, 17, 18], 16, 2)


def test_prefill_ref_matches_sdpa_for_fresh_prompts(paged_kv, device: torch.device):
    """The reference itself: a fresh prompt is plain causal attention over its own tokens."""
    seqs, num_heads, head_dim = [(11, 11), (6, 6)], 2, 32
    kv = paged_kv([ctx for _, ctx in seqs], 8, num_heads, head_dim, torch.float32)
    q = torch.randn(17, num_heads, head_dim, device=device)
    query_start_loc = torch.tensor([0, 11, 17], dtype=torch.int32, device=device)
    ref = paged_prefill_attention_ref(
        q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.context_lens, 0.2
    )
    for b, (start, end) in enumerate([(0, 11), (11, 17)]):
        n = end - start
        blocks = kv.block_tables[b, : (n + 7) // 8].long()
        k = kv.k_cache[blocks].reshape(-1, num_heads, head_dim)[:n].transpose(0, 1)
        v = kv.v_cache[blocks].reshape(-1, num_heads, head_dim)[:n].transpose(0, 1)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k, v, is_causal=True, scale=0.2
        )
        torch.testing.assert_close(ref[start:end], sdpa.transpose(0, 1), rtol=1e-5, atol=1e-5)


# tree verify: (prefix p, chain k, alternatives m) per sequence; rows [root, c1..ck, a1..am] at slots
# p..p+k+m, positions [p, p+1..p+k, p+1..p+m]
TREE_BATCH = [
    (40, 3, 3),  # one query tile (BLOCK_Q 8 at GQA 4 on the CPU), one unmasked key tile
    # 16 rows, two query tiles; the second's rows c8, c9, a1..a6 are out of position order: its first
    # row (position 36) would put full_end at 32, its smallest position (29) puts it at 0
    (28, 9, 6),
    (66, 2, 1),  # root at 66: two unmasked key tiles
]


def _tree_rows(trees: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """(query tokens, context length) per sequence and the rows' positions, back to back."""
    seqs, positions = [], []
    for p, k, m in trees:
        seqs.append((1 + k + m, p + 1 + k + m))
        positions += [p, *range(p + 1, p + k + 1), *range(p + 1, p + m + 1)]
    return seqs, positions


def _tree_args(paged_kv, trees, num_q_heads, num_kv_heads, head_dim, dtype, device, block_size=8):
    seqs, positions = _tree_rows(trees)
    kv = paged_kv([ctx for _, ctx in seqs], block_size, num_kv_heads, head_dim, dtype)
    starts = [0, *itertools.accumulate(q for q, _ in seqs)]
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    q = torch.randn(starts[-1], num_q_heads, head_dim, dtype=dtype, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.context_lens, head_dim**-0.5)
    return args, torch.tensor(positions, dtype=torch.int64, device=device), kv, starts


@pytest.mark.parametrize("use_tile_map", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_tree_positions_match_ref(dtype: torch.dtype, use_tile_map: bool, paged_kv, device):
    """Tree verify rows (alternatives see the prefix below their position and themselves), GQA 4,
    int64 positions as the model passes them; also through a tile map (the CUDA-graph launch)."""
    num_q_heads, num_kv_heads = 8, 2
    args, positions, _, starts = _tree_args(
        paged_kv, TREE_BATCH, num_q_heads, num_kv_heads, 32, dtype, device
    )
    extra = {"max_query_len": max(b - a for a, b in itertools.pairwise(starts))}
    if use_tile_map:
        block_q = query_block(num_q_heads, num_kv_heads, device)
        size = tile_map_size(starts[-1], len(TREE_BATCH), block_q)
        tiles = torch.tensor(query_tiles(starts, block_q, size), dtype=torch.int32, device=device)
        extra = {"tile_map": tiles.view(size, 2)}
    out = paged_prefill_attention(*args, **extra, query_positions=positions)
    ref = paged_prefill_attention_ref(*args, **extra, query_positions=positions)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    # the positions change the alternatives' outputs (else the test would prove little)
    plain = paged_prefill_attention_ref(*args)
    assert not torch.allclose(ref[starts[0] + 4 : starts[1]], plain[starts[0] + 4 : starts[1]])


def test_prefill_ref_tree_rows_are_causal_attention_over_their_own_context(paged_kv, device):
    """The reference's rule, checked independently: each row equals softmax attention over an
    explicitly built context, the keys at slots 0..position-1 plus the row's own K/V."""
    num_q_heads, num_kv_heads, head_dim, block_size, scale = 4, 2, 32, 8, 32**-0.5
    trees = [(12, 2, 3), (5, 1, 2), (20, 3, 1)]
    args, positions, kv, starts = _tree_args(
        paged_kv, trees, num_q_heads, num_kv_heads, head_dim, torch.float32, device, block_size
    )
    q = args[0]
    ref = paged_prefill_attention_ref(*args, query_positions=positions)
    for b, (context_len, (start, end)) in enumerate(
        zip(kv.context_lens.tolist(), itertools.pairwise(starts), strict=True)
    ):
        blocks = kv.block_tables[b, : -(-context_len // block_size)].long()
        k = kv.k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
        v = kv.v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
        for row in range(start, end):
            pos, slot = int(positions[row]), context_len - (end - row)
            ctx_k = torch.cat([k[:pos], k[slot : slot + 1]]).repeat_interleave(2, dim=1)  # [pos + 1, Hq, D]
            ctx_v = torch.cat([v[:pos], v[slot : slot + 1]]).repeat_interleave(2, dim=1)
            probs = torch.softmax(torch.einsum("hd,khd->hk", q[row], ctx_k) * scale, dim=-1)
            want = torch.einsum("hk,khd->hd", probs, ctx_v)
            torch.testing.assert_close(ref[row], want, rtol=1e-5, atol=1e-5)


def test_prefill_positions_equal_to_slots_change_nothing(paged_kv, device: torch.device):
    """Positions equal to the slot indices (int32 here) give exactly the output without positions,
    kernel and reference; (2, 33) starts its rows at slot 31, where the two paths' full_end differ."""
    seqs = [(17, 17), (5, 40), (2, 33), (1, 50)]
    kv = paged_kv([ctx for _, ctx in seqs], 8, 2, 32, torch.float16)
    starts = [0, *itertools.accumulate(q for q, _ in seqs)]
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    q = torch.randn(starts[-1], 8, 32, dtype=torch.float16, device=device)
    slots = [ctx - n + i for n, ctx in seqs for i in range(n)]
    positions = torch.tensor(slots, dtype=torch.int32, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.context_lens, 32**-0.5)
    for fn in (paged_prefill_attention, paged_prefill_attention_ref):
        torch.testing.assert_close(fn(*args, query_positions=positions), fn(*args), rtol=0, atol=0)


def test_prefill_position_zero_sees_only_its_own_key(paged_kv, device: torch.device):
    """Rows at position 0 see only their own slot (output = its V), even when that slot is past the
    first key tile: the rows have no visible key there, and the online softmax must not make NaN."""
    kv = paged_kv([40], 8, 1, 16, torch.float32)
    q = torch.randn(40, 2, 16, device=device)
    query_start_loc = torch.tensor([0, 40], dtype=torch.int32, device=device)
    positions = torch.zeros(40, dtype=torch.int64, device=device)
    positions[::3] = torch.arange(0, 40, 3, device=device)  # every third row at its slot: plain causal
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.context_lens, 0.25)
    out = paged_prefill_attention(*args, query_positions=positions)
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args, query_positions=positions))
    v = kv.v_cache[kv.block_tables[0, :5].long()].reshape(40, 1, 16)
    own = torch.arange(40, device=device) % 3 != 0
    own[0] = True
    torch.testing.assert_close(out[own], v[own].expand(-1, 2, -1))


def test_prefill_rejects_bad_index_dtypes(device: torch.device):
    q = torch.randn(3, 4, 32, device=device)
    cache = torch.zeros(4, 8, 2, 32, device=device)
    tables = torch.zeros(1, 2, dtype=torch.int32, device=device)
    lens = torch.full((1,), 3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="query_start_loc must be int32"):
        paged_prefill_attention(q, cache, cache, tables, torch.tensor([0, 3], device=device), lens, 1.0)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        starts = torch.tensor([0, 3], dtype=torch.int32, device=device)
        paged_prefill_attention(q[..., :24], cache[..., :24], cache[..., :24], tables, starts, lens, 1.0)
    with pytest.raises(ValueError, match="query_positions must be"):
        starts = torch.tensor([0, 3], dtype=torch.int32, device=device)
        positions = torch.zeros(3, device=device)  # float
        paged_prefill_attention(q, cache, cache, tables, starts, lens, 1.0, query_positions=positions)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("seqs", "num_q_heads", "num_kv_heads"),
    [
        ([(4096, 4096)], 32, 8),  # one long fresh prompt, Llama-3-8B heads
        ([(512, 512)] * 8, 8, 1),  # Llama-3-70B per GPU at TP=8
        (
            [(1, 1), (300, 2100), (7, 1000), (129, 129), (5, 5000), (3, 129), (0, 17)],
            32,
            8,
        ),  # mixed; an idle row
    ],
)
def test_prefill_large_gpu(
    seqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, dtype: torch.dtype, paged_kv
):
    out, ref = _run(paged_kv, seqs, num_q_heads, num_kv_heads, 128, 16, dtype, torch.device("cuda"), None)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.gpu
@requires_gpu
def test_prefill_tree_positions_large_gpu(paged_kv):
    """Tree verify on the GPU, bf16, Llama-3-8B heads; 16 to 44 rows a sequence (BLOCK_Q is 16)."""
    args, positions, _, _ = _tree_args(
        paged_kv, [(2000, 15, 20), (63, 7, 8), (4100, 3, 40)], 32, 8, 128, torch.bfloat16,
        torch.device("cuda"), block_size=16,
    )  # fmt: skip
    out = paged_prefill_attention(*args, query_positions=positions)
    ref = paged_prefill_attention_ref(*args, query_positions=positions)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.bfloat16])
