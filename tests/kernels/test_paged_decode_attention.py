"""paged_decode_attention against its torch reference: GQA, holes in block tables, empty rows, split-K."""

from __future__ import annotations

import math

import pytest
import torch

from fuserve.workers.kernels import paged_decode_attention as decode_module
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
    assert decode_launch(64, 4, 4096, gpu, fp8_cache=True).num_warps == 8
    assert decode_launch(1024, 8, 4096, gpu) == DecodeLaunch(64, 1)  # over-full, bf16: 4 warps
    assert decode_launch(1024, 8, 4096, gpu, fp8_cache=True) == DecodeLaunch(64, 1, num_warps=2)
    split = decode_launch(1, 8, 4096, gpu, fp8_cache=True)  # batch 1: splits, 4 warps, fp8 or not
    assert split.num_splits > 1 and split == decode_launch(1, 8, 4096, gpu)


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
