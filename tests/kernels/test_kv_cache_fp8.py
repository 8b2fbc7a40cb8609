"""The FP8 KV cache: the RoPE + cache-write kernel stores e4m3 with per-head scales, and the paged
decode and prefill kernels read it, each against its torch reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.kv_cache_fp8 import FP8, dequantize_kv, quantize_kv
from fuserve.workers.kernels.paged_decode_attention import (
    DecodeLaunch,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from fuserve.workers.kernels.paged_prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from fuserve.workers.kernels.rotary import rotary_kv_write, rotary_kv_write_ref
from fuserve.workers.models.rope import rope_tables

TOL = {"rtol": 2e-5, "atol": 2e-5}  # fp32 queries: the same fp8 values, another summation order
E4M3_REL = 2**-4  # half an e4m3 step, relative


def _fp8_cache(paged_kv, lens: list[int], heads: int, dim: int, bs: int, device: torch.device):
    kv = paged_kv(lens, bs, heads, dim, torch.float32)
    k_scale = (
        torch.rand(heads, device=device) * 0.02 + 0.005
    )  # |k| ~ 3: e4m3 values up to ~600 -> saturation too
    v_scale = torch.rand(heads, device=device) * 0.02 + 0.005
    fp8 = (quantize_kv(kv.k_cache, k_scale), quantize_kv(kv.v_cache, v_scale))
    return kv, fp8, k_scale, v_scale


# the launch decode_launch picks, and the cache read as 16-bit words of two e4m3 values, unsplit and split
FP8_LAUNCHES = [None, DecodeLaunch(16, 1, fp8_pairs=True), DecodeLaunch(16, 4, fp8_pairs=True)]


@pytest.mark.parametrize("launch", FP8_LAUNCHES, ids=["auto", "pairs", "pairs-splits"])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 4), (8, 2)])
def test_decode_reads_fp8_cache(
    paged_kv, device: torch.device, num_q_heads: int, num_kv_heads: int, launch: DecodeLaunch | None
) -> None:
    kv, (k8, v8), ks, vs = _fp8_cache(paged_kv, [1, 21, 0, 90], num_kv_heads, 32, 8, device)
    q = torch.randn(4, num_q_heads, 32, device=device)
    args = (q, k8, v8, kv.block_tables, kv.context_lens, 32**-0.5, None)
    out = paged_decode_attention(*args, k_scale=ks, v_scale=vs, launch=launch)
    ref = paged_decode_attention_ref(*args, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, ref, **TOL)
    if launch is None:  # against the full-precision cache: within what e4m3 rounding moves attention
        exact = paged_decode_attention_ref(
            q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 32**-0.5
        )
        worst, rel = (out - exact).abs().max().item(), ((out - exact).norm() / exact.norm()).item()
        assert worst < 0.25 and rel < 0.08, (worst, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "launch",
    [
        None,
        DecodeLaunch(64, 1, num_warps=2, fp8_pairs=True),
        DecodeLaunch(64, 1, num_warps=4, fp8_pairs=True),
    ],
    ids=["auto", "pairs-2-warps", "pairs-4-warps"],
)
def test_decode_reads_fp8_cache_over_full_gpu(paged_kv, launch: DecodeLaunch | None) -> None:
    """More (sequence, KV head) programs than two an SM: the 2-warp launch an fp8 cache takes there."""
    device = torch.device("cuda")
    lens = [129, 1, 0, 300] * 128  # 512 sequences x 8 KV heads
    kv, (k8, v8), ks, vs = _fp8_cache(paged_kv, lens, 8, 128, 16, device)
    q = torch.randn(len(lens), 32, 128, device=device, dtype=torch.bfloat16)  # the engine's queries
    args = (q, k8, v8, kv.block_tables, kv.context_lens, 128**-0.5, None)
    out = paged_decode_attention(*args, k_scale=ks, v_scale=vs, launch=launch)
    ref = paged_decode_attention_ref(*args, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)  # bf16 probabilities and out


def test_prefill_reads_fp8_cache(paged_kv, device: torch.device) -> None:
    lens, q_lens = [5, 40, 17], [5, 12, 1]
    kv, (k8, v8), ks, vs = _fp8_cache(paged_kv, lens, 2, 32, 8, device)
    q = torch.randn(sum(q_lens), 8, 32, device=device)
    starts = torch.tensor([0, 5, 17, 18], dtype=torch.int32, device=device)
    args = (q, k8, v8, kv.block_tables, starts, kv.context_lens, 32**-0.5, 12)
    out = paged_prefill_attention(*args, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args, k_scale=ks, v_scale=vs), **TOL)


def test_rotary_writes_fp8_cache(device: torch.device) -> None:
    tokens, hq, hkv, dim, bs = 9, 4, 2, 32, 8
    cos, sin = (t.to(device) for t in rope_tables(dim, 10000.0, None, 64))
    q = torch.randn(tokens, hq, dim, device=device)
    k, v = torch.randn(tokens, hkv, dim, device=device) * 3, torch.randn(tokens, hkv, dim, device=device)
    positions = torch.randint(0, 64, (tokens,), device=device)
    slots = torch.randperm(4 * bs, device=device)[:tokens]
    slots[3] = -1  # a padding token: not written
    ks, vs = torch.tensor([0.01, 0.02], device=device), torch.tensor([0.005, 0.5], device=device)
    caches = []
    for write in (rotary_kv_write, rotary_kv_write_ref):
        kc = torch.zeros(4, bs, hkv, dim, dtype=FP8, device=device)
        vc = torch.zeros_like(kc)
        q_out = write(q, k, v, positions, cos, sin, kc, vc, slots, k_scale=ks, v_scale=vs)
        caches.append((q_out, kc, vc))
    (q_got, k_got, v_got), (q_want, k_want, v_want) = caches
    torch.testing.assert_close(q_got, q_want, **TOL)
    for got, want, s in ((k_got, k_want, ks), (v_got, v_want, vs)):
        g = dequantize_kv(got, s)
        # the same e4m3 bytes (the interpreter's fp32 -> fp8 cast rounds as the GPU's does: conftest)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert torch.isfinite(g).all() and g.abs().max() <= 448 * s.max()
    # what was written is v itself within e4m3's rounding, saturated at 448 x scale (head 0's 0.005)
    written = slots >= 0
    v_back = dequantize_kv(v_got, vs).view(-1, hkv, dim)[slots[written]]
    limit = 448 * vs[:, None]
    v_sat = torch.maximum(torch.minimum(v[written], limit), -limit)
    assert (v[written].abs() > limit).any()  # the saturation is exercised
    assert ((v_back - v_sat).abs() <= v_sat.abs() * E4M3_REL + vs[:, None] * 2**-9).all()


def test_fp8_cache_needs_scales(paged_kv, device: torch.device) -> None:
    kv, (k8, v8), ks, _ = _fp8_cache(paged_kv, [4], 2, 32, 8, device)
    q = torch.randn(1, 2, 32, device=device)
    with pytest.raises(ValueError, match="v_scale"):
        paged_decode_attention(q, k8, v8, kv.block_tables, kv.context_lens, 1.0, k_scale=ks)
