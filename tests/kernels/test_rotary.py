"""rotary_kv_write against its torch reference: rotated q, and rotated k / plain v in the paged cache."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.rotary import rotary_kv_write, rotary_kv_write_ref

# both rotate in fp32 and round once; fp32 differs only where the GPU fuses a multiply-add
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},
}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cos_sin(max_positions: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
    return freqs.cos().to(device), freqs.sin().to(device)


def _case(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_padding: int,
):
    """q, k, v as column slices of one fused QKV output; NaN caches; shuffled slots, some -1."""
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width + 8, dtype=dtype, device=device)[:, :width]  # +8: rows wider than qkv
    q_end, k_end = num_q_heads * head_dim, (num_q_heads + num_kv_heads) * head_dim
    q = qkv[:, :q_end].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_end:k_end].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, k_end:].view(num_tokens, num_kv_heads, head_dim)
    max_positions = 4 * num_tokens + 64
    positions = torch.randint(0, max_positions, (num_tokens,), device=device)
    cos, sin = _cos_sin(max_positions, head_dim, device)
    num_blocks = num_tokens // block_size + 3
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    slot_mapping = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slot_mapping[torch.randperm(num_tokens, device=device)[:num_padding]] = -1
    return q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping


def _check(case: tuple, dtype: torch.dtype) -> None:
    q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping = case
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    q_out = rotary_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    q_ref = rotary_kv_write_ref(q, k, v, positions, cos, sin, k_cache_ref, v_cache_ref, slot_mapping)
    assert q_out.shape == q.shape and q_out.dtype == dtype and q_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref, **TOLERANCE[dtype])
    # slots of padding tokens and of no token stay NaN in both caches
    torch.testing.assert_close(k_cache, k_cache_ref, equal_nan=True, **TOLERANCE[dtype])
    torch.testing.assert_close(v_cache, v_cache_ref, equal_nan=True, rtol=0, atol=0)
    written = int((slot_mapping >= 0).sum())
    assert int((~k_cache[:, :, 0, 0].isnan()).sum()) == written


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(
    ("num_tokens", "num_q_heads", "num_kv_heads", "head_dim", "block_size", "num_padding"),
    [
        (1, 4, 4, 32, 8, 0),  # one token, MHA
        (13, 8, 2, 64, 16, 3),  # GQA 4, padding tokens
        (9, 9, 3, 64, 8, 2),  # SmolLM2-135M-like: heads not a power of two
        (6, 8, 1, 128, 16, 0),  # GQA 8
        (5, 4, 2, 48, 8, 1),  # head_dim / 2 not a power of two
    ],
)
def test_rotary_kv_write_matches_ref(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_padding: int,
    dtype: torch.dtype,
    device: torch.device,
):
    case = _case(num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, num_padding)
    _check(case, dtype)


def test_rotary_ref_is_hf_rotate_half(device: torch.device):
    """The reference is HF's apply_rotary_pos_emb (neox pairs (i, i + D/2)) in fp32."""
    q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping = _case(
        7, 4, 2, 32, 8, torch.float32, device, 0
    )
    q_out = rotary_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    cos_full = torch.cat((cos[positions], cos[positions]), dim=-1)[:, None, :]
    sin_full = torch.cat((sin[positions], sin[positions]), dim=-1)[:, None, :]
    torch.testing.assert_close(q_out, q * cos_full + rotate_half(q) * sin_full, **TOLERANCE[torch.float32])
    k_hf = k * cos_full + rotate_half(k) * sin_full
    torch.testing.assert_close(k_cache.view(-1, 2, 32)[slot_mapping], k_hf, **TOLERANCE[torch.float32])


def test_rotary_kv_write_rejects_wrong_index_dtype(device: torch.device):
    q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping = _case(
        3, 2, 2, 32, 8, torch.float32, device, 0
    )
    with pytest.raises(ValueError, match="positions must be int64"):
        rotary_kv_write(q, k, v, positions.int(), cos, sin, k_cache, v_cache, slot_mapping)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        rotary_kv_write(q, k, v, positions, cos, sin, k_cache.transpose(0, 1), v_cache, slot_mapping)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("num_tokens", "num_q_heads", "num_kv_heads"), [(4096, 32, 8), (333, 8, 1), (64, 64, 8)]
)
def test_rotary_kv_write_large_gpu(num_tokens: int, num_q_heads: int, num_kv_heads: int, dtype: torch.dtype):
    case = _case(
        num_tokens, num_q_heads, num_kv_heads, 128, 16, dtype, torch.device("cuda"), num_tokens // 10
    )
    _check(case, dtype)
