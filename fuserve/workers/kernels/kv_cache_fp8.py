"""The FP8 KV cache's format, shared by the kernels that write it and read it.

With `cache.kv_cache_dtype: fp8` the paged caches hold float8_e4m3fn: K and V are divided by one fp32
scale per KV head (per layer), saturated to +-448 and rounded once, so a cached token costs half the
bytes of bf16 and the pool holds twice the tokens. Readers dequantize in registers: a program of the
attention kernels owns one KV head, so its K scale folds into the softmax scale and its V scale
multiplies the output once.

The kernels take an fp8 cache as its bytes (a uint8 view) and reinterpret loaded tiles as e4m3: a
masked load's fill value cannot be cast to fp8 in Triton's interpreter (and the bytes are the same).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    """What a kernel takes as the cache pointer: an fp8 cache as uint8, any other as is."""
    return cache.view(torch.uint8) if is_fp8(cache) else cache


def check_kv_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, num_kv_heads: int
) -> bool:
    """Whether the cache is fp8; if so, that both scales are fp32 [Hkv] on its device."""
    if not is_fp8(k_cache):
        return False
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None or s.shape != (num_kv_heads,) or s.dtype != torch.float32 or s.device != k_cache.device:
            got = None if s is None else f"{s.dtype} {tuple(s.shape)} on {s.device}"
            raise ValueError(
                f"an fp8 KV cache needs {name}: fp32 [{num_kv_heads}] on {k_cache.device}, got {got}"
            )
    return True


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., Hkv, D] fp32 -> e4m3 of x * (1 / scale[head]), saturated: the kernels' rounding."""
    return (x.float() * (1.0 / scale)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached rows [..., Hkv, D] -> fp32, times scale[head] for an fp8 cache."""
    return x.float() * scale[:, None] if is_fp8(x) and scale is not None else x.float()


@triton.jit
def to_fp8_bytes(x):
    """fp32 -> e4m3 (saturated at +-448), as the byte a uint8 view of the cache stores."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
