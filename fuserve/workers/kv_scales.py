"""Start-up calibration of the FP8 KV cache's scales: one per layer and KV head, for K and for V.

e4m3 keeps 3 mantissa bits at any magnitude between 2^-9 and 448, so a scale matters at the ends:
too small and the largest keys saturate, too large and small values lose bits to subnormals. Each
rank runs one prefill of CALIBRATION_TOKENS fixed pseudo-random tokens through its model with a
full-precision scratch cache, reads the largest |K| and |V| each head wrote (post-RoPE, exactly what
the cache will hold) and sets scale = HEADROOM x amax / 448: values up to HEADROOM times the
calibrated range are kept, beyond that they saturate. Every rank runs the same forward (its
collectives pair up) and calibrates the heads it holds.
"""

from __future__ import annotations

import torch

from fuserve.workers.kernels.kv_cache_fp8 import FP8_MAX
from fuserve.workers.kv_cache import allocate_kv_cache
from fuserve.workers.models.llama import AttentionMetadata, LlamaForCausalLM

CALIBRATION_TOKENS = 256
HEADROOM = 4.0


@torch.inference_mode()
def calibrate_kv_scales(model: LlamaForCausalLM, block_size: int, seed: int = 0) -> None:
    """Set every attention layer's k_scale and v_scale from one calibration prefill."""
    layers = model.model.layers
    device = model.rope_cos.device
    dtype = model.model.embed_tokens.weight.dtype
    n = min(CALIBRATION_TOKENS, model.rope_cos.shape[0])
    blocks = -(-n // block_size)
    kv = allocate_kv_cache(model.arch, layers[0].self_attn.num_kv_heads, blocks, block_size, dtype, device)
    model.bind_kv_cache(kv.k, kv.v)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.arch.vocab_size, (n,), generator=gen).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        context_lens=torch.tensor([n], dtype=torch.int32, device=device),
        max_query_len=n,
        max_context_len=n,
    )
    model(ids, torch.arange(n, device=device), meta)
    for layer, k, v in zip(layers, kv.k, kv.v, strict=True):
        attn = layer.self_attn
        for cache, scale in ((k, attn.k_scale), (v, attn.v_scale)):
            written = cache.flatten(0, 1)[:n].float()  # [n, Hkv, D]
            amax = written.abs().amax(dim=(0, 2)).clamp_min(1e-4)
            scale.copy_(amax * HEADROOM / FP8_MAX)
    empty = [torch.empty(0)] * len(layers)
    model.bind_kv_cache(empty, empty)
