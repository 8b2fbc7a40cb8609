"""paged_decode_attention against its torch reference: GQA, holes in block tables, empty rows, split-K,
last keys read from their own cache slots (a tree verify step's alternatives)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from fuserve.workers.kernels import paged_decode_attention as decode_module
from fuserve.workers.kernels.kv_cache_fp8 import quantize_kv
from fuserve.workers.kernels.paged_decode_attention import (
    DecodeLaunch,
    decode_launch,
    decode_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)

# fp32: both sides accumulate in fp32 in a different order. bf16/fp16: the reference keeps the
# probabilities in fp32, the GPU kernel rounds them to the input dtype for the P·V dot, and the
# output is rounded once more.
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 4e-3, "atol": 4e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(
    paged_kv,
    context_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    max_context_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kv = paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(context_lens), num_q_heads, head_dim, dtype=dtype, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5, max_context_len)
    out = paged_decode_attention(*args)
    assert out.shape == q.shape and out.dtype == dtype
    return out, paged_decode_attention_ref(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(2, 2), (8, 2), (8, 1)])  # GQA 1 / 4 / 8
def test_decode_matches_ref(
    num_q_heads: int, num_kv_heads: int, block_size: int, dtype: torch.dtype, paged_kv, device: torch.device
):
    # a 1-token context, lengths off the block size, an empty (CUDA-graph padding) row
    out, ref = _run(paged_kv, [1, 21, 0, 40], num_q_heads, num_kv_heads, 32, block_size, dtype, device)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_context_len", [None, 300, 4096])
def test_decode_long_context_splits(
    dtype: torch.dtype, max_context_len: int | None, paged_kv, device: torch.device
):
    """A context long enough for several split-K runs; the other rows end in early splits. 4096: a CUDA
    graph's bound, far past every context, which each sequence still cuts by its own length."""
    context_lens, num_kv_heads, block_size = [300, 7, 0], 1, 16
    max_len = max_context_len or (math.ceil(300 / block_size) + 2) * block_size
    assert decode_num_splits(len(context_lens), num_kv_heads, max_len, device) >= 2
    out, ref = _run(paged_kv, context_lens, 4, num_kv_heads, 64, block_size, dtype, device, max_context_len)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize(("block_n", "num_splits"), [(16, 1), (16, 5), (32, 3)])
def test_an_explicit_launch_gives_the_same_attention(
    block_n: int, num_splits: int, paged_kv, device: torch.device
):
    """Every launch a benchmark may choose (benchmarks/sweep_decode_attention.py) computes the same."""
    context_lens, block_size = [300, 7, 0, 64], 16
    kv = paged_kv(context_lens, block_size, 2, 32, torch.float32)
    q = torch.randn(len(context_lens), 8, 32, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 32**-0.5, 512)
    out = paged_decode_attention(*args, launch=DecodeLaunch(block_n, num_splits, num_warps=2, num_stages=1))
    torch.testing.assert_close(out, paged_decode_attention_ref(*args), **TOLERANCE[torch.float32])


def test_decode_all_rows_empty(paged_kv, device: torch.device):
    out, ref = _run(paged_kv, [0, 0], 4, 2, 32, 8, torch.float32, device, max_context_len=64)
    assert torch.all(out == 0) and torch.all(ref == 0)


def test_decode_ref_matches_sdpa(paged_kv, device: torch.device):
    """The reference itself: equal to SDPA over the gathered contiguous K/V of each sequence."""
    context_lens, num_q_heads, num_kv_heads, head_dim, block_size = [5, 19], 8, 2, 32, 8
    kv = paged_kv(context_lens, block_size, num_kv_heads, head_dim, torch.float32)
    q = torch.randn(2, num_q_heads, head_dim, device=device)
    ref = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.3)
    for b, n in enumerate(context_lens):
        blocks = kv.block_tables[b, : math.ceil(n / block_size)].long()
        k = kv.k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].transpose(0, 1)  # [Hkv, n, D]
        v = kv.v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].transpose(0, 1)
        k, v = k.repeat_interleave(4, 0), v.repeat_interleave(4, 0)
        expected = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v, scale=0.3)[:, 0]
        torch.testing.assert_close(ref[b], expected, rtol=1e-5, atol=1e-5)


def test_decode_num_splits_from_shapes_only(device: torch.device):
    """Fewer sequences and longer contexts give more splits; a short context gives one."""
    long_single = decode_num_splits(1, 1, 16384, device)
    assert long_single > 1
    assert decode_num_splits(1, 1, 16, device) == 1
    assert decode_num_splits(64, 8, 16384, device) <= long_single
    assert decode_num_splits(1, 1, 64, device) <= decode_num_splits(1, 1, 16384, device)


def test_decode_launch_rule_on_an_h100(monkeypatch: pytest.MonkeyPatch):
    """The launches the GPU measurements chose, on an H100's 132 SMs (no GPU needed: shapes only)."""
    monkeypatch.setattr(decode_module, "_tile_config", lambda device: (64, 2 * 132, 128))
    gpu = torch.device("cuda", 0)
    assert decode_launch(64, 4, 4096, gpu) == DecodeLaunch(128, 1, num_warps=8, num_stages=1)  # 8B TP=2
    assert decode_launch(64, 4, 4096, gpu, fp8_cache=True) == DecodeLaunch(128, 1, 8, 1, fp8_pairs=True)
    assert decode_launch(1024, 8, 4096, gpu) == DecodeLaunch(64, 1)  # over-full, bf16: 4 warps
    assert decode_launch(1024, 8, 4096, gpu, fp8_cache=True) == DecodeLaunch(
        64, 1, num_warps=2, fp8_pairs=True
    )
    split = decode_launch(1, 8, 4096, gpu, fp8_cache=True)  # batch 1: splits, 4 warps, fp8 or not
    assert split.num_splits > 1 and split == dataclasses.replace(
        decode_launch(1, 8, 4096, gpu), fp8_pairs=True
    )
    assert not any(
        decode_launch(b, 8, 4096, torch.device("cpu"), fp8_cache=True).fp8_pairs for b in (1, 1024)
    )


def test_decode_rejects_bad_shapes(device: torch.device):
    q = torch.randn(2, 6, 32, device=device)
    cache = torch.zeros(4, 8, 4, 32, device=device)
    tables = torch.zeros(2, 3, dtype=torch.int32, device=device)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode_attention(q, cache, cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention(q[:, :4], cache, cache, tables.long(), lens, 1.0)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("context_lens", "num_q_heads", "num_kv_heads", "head_dim"),
    [
        ([1, 129, 4097, 0, 1000, 16, 17, 2048], 32, 8, 128),  # Llama-3-8B heads
        ([16384], 8, 1, 128),  # Llama-3-70B per GPU at TP=8, one long context: many splits
        ([63] * 33 + [0] * 7, 16, 16, 64),  # MHA, a big batch with padding rows
        # Llama-3-8B at TP=2, batch 64: 256 programs, one wave of unsplit 128-token tiles on an H100
        ([192] * 60 + [3000, 1, 0, 777], 16, 4, 128),
    ],
)
def test_decode_large_gpu(
    context_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, paged_kv
):
    out, ref = _run(
        paged_kv, context_lens, num_q_heads, num_kv_heads, head_dim, 16, dtype, torch.device("cuda")
    )
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


def test_more_splits_than_one_merge_chunk(
    paged_kv, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge takes the splits 16 at a time: of 38 splits the 600-token row fills 19 with two tiles
    each (a tile for every split: two a split), two chunks, the last one partial; the 40-token row fills
    3 with one tile each, inside the first chunk. Both give the reference's output."""
    from fuserve.workers.kernels import paged_decode_attention as module

    monkeypatch.setattr(module, "_tile_config", lambda device: (16, 128, 16))
    lens = [600, 40]
    assert decode_num_splits(2, 1, max(lens), device) > 32
    out, ref = _run(paged_kv, lens, 2, 1, 32, 16, torch.float32, device)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def _own_last_keys(
    paged_kv,
    lens: list[int],
    own: list[bool],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    fp8: bool = False,
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """A paged cache in which each row b with own[b] (and keys) holds keys 0..lens[b]-2 in its table and
    its last key in a slot of a block no table holds, as a tree verify step's alternative row: its table
    slot for that key holds NaN, or, where the keys before it fill whole blocks, the table has no block
    for it (a garbage id). Returns the cache, last_key_slots (that slot; -1 for the other rows, padding
    too) and the fp8 scales as keyword arguments."""
    own = [o and n > 0 for n, o in zip(lens, own, strict=True)]
    table_lens = [n - o for n, o in zip(lens, own, strict=True)]
    spare_blocks = sum(own) // block_size + 2
    kv = paged_kv(
        table_lens, block_size, num_kv_heads, head_dim, torch.float32 if fp8 else dtype, spare_blocks
    )
    device = kv.k_cache.device
    used = torch.zeros(kv.k_cache.shape[0], dtype=torch.bool)
    for b, n in enumerate(table_lens):
        used[kv.block_tables[b, : math.ceil(n / block_size)].long().cpu()] = True
    spare = (~used).nonzero()[:, 0]
    spare_slots = (spare[:, None] * block_size + torch.arange(block_size)).flatten()
    chosen = spare_slots[torch.randperm(len(spare_slots))[: sum(own)]].tolist()
    slots = torch.tensor([chosen.pop() if o else -1 for o in own], dtype=torch.int64, device=device)
    written = slots[slots >= 0]
    for cache in (kv.k_cache, kv.v_cache):
        new = torch.randn(len(written), num_kv_heads, head_dim, device=device)
        cache.view(-1, num_kv_heads, head_dim)[written] = new.to(cache.dtype)
    kv.context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    if not fp8:
        return kv, slots, {}
    k_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
    v_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
    kv.k_cache, kv.v_cache = quantize_kv(kv.k_cache, k_scale), quantize_kv(kv.v_cache, v_scale)
    return kv, slots, {"k_scale": k_scale, "v_scale": v_scale}


# every launch decode_launch can pick: its choice here (one split of 16-token tiles), several splits, the
# GPU's one wave of unsplit 128-token tiles, and its 2-warp launch of an over-full fp8 cache
OWN_LAST_KEY_LAUNCHES = [
    None,
    DecodeLaunch(16, 4),
    DecodeLaunch(128, 1, num_warps=8, num_stages=1),
    DecodeLaunch(64, 1, num_warps=2),
    DecodeLaunch(16, 4, fp8_pairs=True),
]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "launch", OWN_LAST_KEY_LAUNCHES, ids=["auto", "splits", "tiles128", "warps2", "fp8-pairs"]
)
def test_decode_reads_last_keys_from_their_slots(
    launch: DecodeLaunch | None, dtype: torch.dtype, fp8: bool, paged_kv, device: torch.device
):
    """Rows 0 and 1 take their last key from a block outside their tables: row 0's table slot for it holds
    NaN, row 1's 16 keys before it fill two whole blocks (its table's next entry is garbage). Row 2 is
    padding (-1, empty); row 3 reads all its keys through its table (-1). GQA group 4; with several splits
    the last of row 0's 70 keys falls in the third."""
    kv, slots, scales = _own_last_keys(
        paged_kv, [70, 17, 0, 9], [True, True, False, False], 8, 2, 32, dtype, fp8
    )
    q = torch.randn(4, 8, 32, dtype=dtype, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 32**-0.5, None)
    out = paged_decode_attention(*args, **scales, launch=launch, last_key_slots=slots)
    ref = paged_decode_attention_ref(*args, **scales, last_key_slots=slots)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    assert torch.all(out[2] == 0) and not out.isnan().any()


def test_decode_ref_last_key_slot_is_the_key_moved_into_the_table(paged_kv, device: torch.device):
    """The reference itself: a row reading its last key from slot s equals plain decode of the same keys
    with that key's K/V copied to the table's slot for it (NaN till then), or to a fresh block where the
    table has none. Row 0's only key comes from its slot; row 2 keeps its table. The kernel agrees."""
    lens, block_size, num_kv_heads, head_dim = [1, 30, 12], 8, 2, 32
    kv, slots, _ = _own_last_keys(
        paged_kv, lens, [True, True, False], block_size, num_kv_heads, head_dim, torch.float32
    )
    q = torch.randn(3, 4, head_dim, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.3)
    got = paged_decode_attention_ref(*args, last_key_slots=slots)
    out = paged_decode_attention(*args, last_key_slots=slots)

    k_moved, v_moved, tables = kv.k_cache.clone(), kv.v_cache.clone(), kv.block_tables.clone()
    for b in (0, 1):
        last = lens[b] - 1
        if last % block_size == 0:  # the keys before it fill whole blocks: the row gets a fresh one
            fresh = torch.full_like(k_moved[:1], float("nan"))
            k_moved, v_moved = torch.cat([k_moved, fresh]), torch.cat([v_moved, fresh])
            tables[b, last // block_size] = k_moved.shape[0] - 1
        table_slot = int(tables[b, last // block_size]) * block_size + last % block_size
        for cache, moved in ((kv.k_cache, k_moved), (kv.v_cache, v_moved)):
            rows, moved_rows = (c.view(-1, num_kv_heads, head_dim) for c in (cache, moved))
            assert moved_rows[table_slot].isnan().all()
            moved_rows[table_slot] = rows[slots[b]]
    expected = paged_decode_attention_ref(q, k_moved, v_moved, tables, kv.context_lens, 0.3)
    assert not expected.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


def _table_last_key_slots(kv, block_size: int) -> torch.Tensor:
    """Each row's slot of its last key as its block table gives it (a decode step's slot_mapping), -1
    for empty (padding) rows."""
    last = (kv.context_lens.long() - 1).clamp(min=0)
    blocks = kv.block_tables.long().gather(1, (last // block_size)[:, None])[:, 0]
    return torch.where(kv.context_lens > 0, blocks * block_size + last % block_size, -1)


@pytest.mark.parametrize("launch", [None, DecodeLaunch(16, 4)], ids=["auto", "splits"])
def test_decode_table_slots_as_last_key_slots_change_nothing(
    launch: DecodeLaunch | None, paged_kv, device: torch.device
):
    """A plain decode step passing its slot_mapping (the table's own slots of the last keys, -1 for
    padding) gets what it gets without last_key_slots: the kernel bit for bit."""
    block_size = 8
    kv = paged_kv([1, 21, 0, 40], block_size, 2, 32, torch.float32)
    q = torch.randn(4, 8, 32, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 32**-0.5)
    slots = _table_last_key_slots(kv, block_size)
    assert slots[2] == -1 and (slots[[0, 1, 3]] >= 0).all()
    plain = paged_decode_attention(*args, launch=launch)
    assert torch.equal(paged_decode_attention(*args, launch=launch, last_key_slots=slots), plain)
    ref = paged_decode_attention_ref(*args)
    torch.testing.assert_close(
        paged_decode_attention_ref(*args, last_key_slots=slots), ref, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(plain, ref, **TOLERANCE[torch.float32])


def test_decode_rejects_bad_last_key_slots(paged_kv, device: torch.device):
    kv = paged_kv([5, 9], 8, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 1.0)
    for bad in (
        torch.zeros(2, dtype=torch.int32, device=device),
        torch.zeros(3, dtype=torch.int64, device=device),
    ):
        with pytest.raises(ValueError, match="last_key_slots must be"):
            paged_decode_attention(*args, last_key_slots=bad)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    ("context_lens", "num_q_heads", "num_kv_heads", "fp8"),
    [
        ([1, 129, 4097, 0, 1000, 16, 17, 2048], 32, 8, False),  # Llama-3-8B heads, few rows: splits
        ([192] * 60 + [3000, 1, 0, 777], 16, 4, False),  # one wave of unsplit 128-token tiles
        ([129, 1, 0, 300] * 128, 32, 8, False),  # over-full: unsplit 64-token tiles
        ([129, 1, 0, 300] * 128, 32, 8, True),  # over-full fp8: 2 warps
    ],
)
def test_decode_last_key_slots_large_gpu(
    context_lens: list[int], num_q_heads: int, num_kv_heads: int, fp8: bool, paged_kv
):
    """bf16 queries, every third row's last key from its own slot, on each launch decode_launch picks."""
    device, block_size = torch.device("cuda"), 16
    own = [b % 3 == 0 for b in range(len(context_lens))]
    kv, slots, scales = _own_last_keys(
        paged_kv, context_lens, own, block_size, num_kv_heads, 128, torch.bfloat16, fp8
    )
    assert (slots >= 0).any()
    q = torch.randn(len(context_lens), num_q_heads, 128, dtype=torch.bfloat16, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 128**-0.5, None)
    out = paged_decode_attention(*args, **scales, last_key_slots=slots)
    ref = paged_decode_attention_ref(*args, **scales, last_key_slots=slots)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.bfloat16])
