"""Rotary position embedding (RoPE) fused with the write of K and V into the paged KV cache.

After the fused QKV projection, q, k and v are column slices of one [T, (Hq + 2*Hkv) * D] tensor.
Unfused, RoPE reads q and k and writes them back, and a scatter then reads k and v again to copy
them into the cache. Here one program per token reads q, k, v once, rotates q and k in fp32, and
writes rotated q to a new tensor and rotated k plus unchanged v straight into their cache slots.

Data flow for token t (one program, all heads of the token in one tile):

    positions[t] ──► cos_cache[pos], sin_cache[pos]            [D/2] fp32
    q[t] ──rotate──► q_out[t]                                  [Hq, D]
    k[t] ──rotate──► k_cache.view(-1, Hkv, D)[slot_mapping[t]] [Hkv, D]
    v[t] ──────────► v_cache.view(-1, Hkv, D)[slot_mapping[t]]  (skipped where slot_mapping[t] < 0)

The rotation is HuggingFace's `rotate_half` (neox) form: element i pairs with element i + D/2,
    out[:D/2] = x1 * cos - x2 * sin,   out[D/2:] = x2 * cos + x1 * sin,
computed in fp32 and rounded to the input dtype once.

An FP8 cache (float8_e4m3fn, kv_cache_fp8.py) stores k / k_scale[head] and v / v_scale[head],
saturated to +-448, rounded once from fp32; the attention kernels multiply the scales back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.kv_cache_fp8 import (
    cache_bytes,
    check_kv_scales,
    is_fp8,
    quantize_kv,
    to_fp8_bytes,
)
from fuserve.workers.kernels.pdl import pdl_enabled, pdl_launch_and_wait


@triton.jit
def _rotate_half(x1, x2, cos, sin):
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    q_out_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cos_pos,
    stride_sin_pos,
    num_q_heads,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    FP8_KV: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_launch_and_wait(USE_PDL)
    HALF: tl.constexpr = HEAD_DIM // 2
    token = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, HALF_PAD)
    half_mask = half < HALF

    pos = tl.load(positions_ptr + token)
    cos = tl.load(cos_ptr + pos * stride_cos_pos + half, mask=half_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin_pos + half, mask=half_mask, other=0.0)[None, :]

    # q: [Q_HEADS_PAD, HALF_PAD] halves -> q_out (contiguous [T, Hq, D])
    q_heads = tl.arange(0, Q_HEADS_PAD)
    q_mask = (q_heads < num_q_heads)[:, None] & half_mask[None, :]
    q_in = q_ptr + token * stride_q_token + q_heads[:, None] * stride_q_head + half[None, :]
    q1, q2 = _rotate_half(
        tl.load(q_in, mask=q_mask, other=0.0), tl.load(q_in + HALF, mask=q_mask, other=0.0), cos, sin
    )
    q_dst = q_out_ptr + token * num_q_heads * HEAD_DIM + q_heads[:, None] * HEAD_DIM + half[None, :]
    tl.store(q_dst, q1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        # cache rows are contiguous [Hkv, D] per slot
        kv_heads = tl.arange(0, KV_HEADS_PAD)
        kv_mask = (kv_heads < num_kv_heads)[:, None] & half_mask[None, :]
        cache_off = slot * num_kv_heads * HEAD_DIM + kv_heads[:, None] * HEAD_DIM + half[None, :]

        k_in = k_ptr + token * stride_k_token + kv_heads[:, None] * stride_k_head + half[None, :]
        k1, k2 = _rotate_half(
            tl.load(k_in, mask=kv_mask, other=0.0), tl.load(k_in + HALF, mask=kv_mask, other=0.0), cos, sin
        )
        v_in = v_ptr + token * stride_v_token + kv_heads[:, None] * stride_v_head + half[None, :]
        v1 = tl.load(v_in, mask=kv_mask)
        v2 = tl.load(v_in + HALF, mask=kv_mask)
        if FP8_KV:  # the caches arrive as their bytes (uint8): see kv_cache_fp8.py
            k_inv = 1.0 / tl.load(k_scale_ptr + kv_heads, mask=kv_heads < num_kv_heads, other=1.0)[:, None]
            v_inv = 1.0 / tl.load(v_scale_ptr + kv_heads, mask=kv_heads < num_kv_heads, other=1.0)[:, None]
            tl.store(k_cache_ptr + cache_off, to_fp8_bytes(k1 * k_inv), mask=kv_mask)
            tl.store(k_cache_ptr + cache_off + HALF, to_fp8_bytes(k2 * k_inv), mask=kv_mask)
            tl.store(v_cache_ptr + cache_off, to_fp8_bytes(v1.to(tl.float32) * v_inv), mask=kv_mask)
            tl.store(v_cache_ptr + cache_off + HALF, to_fp8_bytes(v2.to(tl.float32) * v_inv), mask=kv_mask)
        else:
            tl.store(k_cache_ptr + cache_off, k1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(k_cache_ptr + cache_off + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(v_cache_ptr + cache_off, v1, mask=kv_mask)
            tl.store(v_cache_ptr + cache_off + HALF, v2, mask=kv_mask)


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be 3-D [tokens, heads, head_dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    num_tokens, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [{num_tokens}, Hkv, {head_dim}]")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
    num_kv_heads = k.shape[1]
    expected_cache = (num_kv_heads, head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != expected_cache:
            raise ValueError(
                f"{name} must be [blocks, block_size, {num_kv_heads}, {head_dim}], got {cache.shape}"
            )
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if cache.dtype != q.dtype and not is_fp8(cache):
            raise TypeError(f"{name} dtype {cache.dtype} differs from q dtype {q.dtype} (and is not fp8)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_tokens,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 [{num_tokens}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if t.dim() != 2 or t.shape[1] != head_dim // 2 or t.dtype != torch.float32 or t.stride(1) != 1:
            raise ValueError(
                f"{name} must be fp32 [positions, {head_dim // 2}] with a contiguous last dimension, "
                f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}"
            )


def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k by their positions; write rotated k and v into the paged cache.

    q: [T, Hq, D], k, v: [T, Hkv, D] (row strides free, last dim contiguous); positions: [T] int64;
    cos_cache, sin_cache: [P, D/2] fp32; k_cache, v_cache: [N, BS, Hkv, D] contiguous;
    slot_mapping: [T] int64, slot = block * BS + offset, negative = padding token (not written).
    An fp8 cache takes k_scale, v_scale: [Hkv] fp32. Returns rotated q as a new contiguous [T, Hq, D]
    tensor of q.dtype.
    """
    _check_args(q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, slot_mapping)
    fp8 = check_kv_scales(k_cache, k_scale, v_scale, k.shape[1])
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    use_pdl = pdl_enabled(q)
    _rotary_kv_write_kernel[(num_tokens,)](
        q_ptr=q,
        k_ptr=k,
        v_ptr=v,
        positions_ptr=positions,
        cos_ptr=cos_cache,
        sin_ptr=sin_cache,
        k_cache_ptr=cache_bytes(k_cache),
        v_cache_ptr=cache_bytes(v_cache),
        slot_mapping_ptr=slot_mapping,
        q_out_ptr=q_out,
        k_scale_ptr=k_scale if fp8 else cos_cache,
        v_scale_ptr=v_scale if fp8 else cos_cache,
        stride_q_token=q.stride(0),
        stride_q_head=q.stride(1),
        stride_k_token=k.stride(0),
        stride_k_head=k.stride(1),
        stride_v_token=v.stride(0),
        stride_v_head=v.stride(1),
        stride_cos_pos=cos_cache.stride(0),
        stride_sin_pos=sin_cache.stride(0),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        FP8_KV=fp8,
        USE_PDL=use_pdl,
        num_warps=4,
        launch_pdl=use_pdl,
    )
    return q_out


def rotary_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch `rotary_kv_write`: same arguments, same in-place cache writes, same result."""
    half = q.shape[-1] // 2
    cos = cos_cache[positions][:, None, :]  # [T, 1, D/2]
    sin = sin_cache[positions][:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:  # fp32
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    written = slot_mapping >= 0
    slots = slot_mapping[written]
    if check_kv_scales(k_cache, k_scale, v_scale, num_kv_heads):
        assert k_scale is not None and v_scale is not None
        k_rows, v_rows = quantize_kv(rotate(k)[written], k_scale), quantize_kv(v[written].float(), v_scale)
    else:
        k_rows, v_rows = rotate(k)[written].to(k.dtype), v[written]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k_rows
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v_rows
    return rotate(q).to(q.dtype)
