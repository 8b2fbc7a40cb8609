"""Calibration of the FP8 KV cache's scales: one per layer and KV head, for K and for V.

e4m3 keeps 3 mantissa bits at any magnitude between 2^-9 and 448, so a scale matters at the ends:
too small and the largest keys saturate, too large and small values lose bits to subnormals. A
calibration runs one prefill of CALIBRATION_TOKENS tokens through the model with a full-precision
scratch cache, reads the largest |K| and |V| each head wrote (post-RoPE, exactly what the cache will
hold) and sets scale = HEADROOM x amax / 448: values up to HEADROOM times the calibrated range are
kept, beyond that they saturate.

Two places run it:
  `fuserve build --kv-cache fp8`  once, on the whole model (TP 1): on text shipped with fuserve
                                  (kv_calibration.txt: prose, dialogue, code, numbers, three scripts)
                                  through the model's own tokenizer, and on the start-up's random
                                  tokens, taking the larger amax of the two per head (the union
                                  saturates nowhere either would); SmolLM2-135M on 1,024 tokens of
                                  CPython's sources, perplexity vs fp32 KV: random +0.6 %, text
                                  +0.6 %, both +0.9 % (top-1 agreement 0.941 / 0.933 / 0.943); each
                                  rank file then holds its heads' scales as
                                  `model.layers.<i>.self_attn.{k,v}_scale`
  start-up, without built scales  on every rank, on fixed pseudo-random tokens (every rank runs the
                                  same forward, so its collectives pair up, and calibrates its heads)
"""

from __future__ import annotations

from pathlib import Path

import torch

from fuserve.workers.kernels.kv_cache_fp8 import FP8_MAX
from fuserve.workers.kv_cache import allocate_kv_cache
from fuserve.workers.models.llama import AttentionMetadata, LlamaForCausalLM
from fuserve.workers.tokenizer import Tokenizer

CALIBRATION_TOKENS = 256
HEADROOM = 4.0
CALIBRATION_TEXT = Path(__file__).with_name("kv_calibration.txt")
SCALE_NAMES = ("k_scale", "v_scale")


def random_calibration_ids(vocab_size: int, seed: int = 0, n: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """The start-up calibration's tokens: n seeded pseudo-random ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=gen)


def text_calibration_ids(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """The build's tokens: the first CALIBRATION_TOKENS of the shipped text (repeated if the tokenizer
    packs it into fewer), ids past the model's vocabulary dropped."""
    ids = [
        i for i in tokenizer.encode(CALIBRATION_TEXT.read_text(), add_special_tokens=False) if i < vocab_size
    ]
    if not ids:
        raise ValueError(f"{CALIBRATION_TEXT.name} encodes to no token of a {vocab_size}-token vocabulary")
    return torch.tensor((ids * -(-CALIBRATION_TOKENS // len(ids)))[:CALIBRATION_TOKENS])


@torch.inference_mode()
def calibrate_kv_scales(
    model: LlamaForCausalLM, block_size: int, seed: int = 0, sequences: list[torch.Tensor] | None = None
) -> None:
    """Set every attention layer's k_scale and v_scale from one prefill per token sequence (default:
    the start-up's pseudo-random tokens), each cut to the model's positions: the largest |K| and |V|
    any of them wrote, per head."""
    layers = model.model.layers
    positions = model.rope_cos.shape[0]
    if sequences is None:
        sequences = [random_calibration_ids(model.arch.vocab_size, seed, min(CALIBRATION_TOKENS, positions))]
    amax = torch.zeros(2, len(layers), layers[0].self_attn.num_kv_heads)  # K, V
    for ids in sequences:
        amax = torch.maximum(amax, _prefill_amax(model, block_size, ids[:positions]))
    for i, layer in enumerate(layers):
        for j, scale in enumerate((layer.self_attn.k_scale, layer.self_attn.v_scale)):
            scale.copy_(amax[j, i].clamp_min(1e-4) * HEADROOM / FP8_MAX)


def _prefill_amax(model: LlamaForCausalLM, block_size: int, ids: torch.Tensor) -> torch.Tensor:
    """[2, layers, KV heads]: the largest |K| and |V| one prefill of `ids` writes to each head, through
    a full-precision scratch cache (post-RoPE: what the cache will hold)."""
    layers = model.model.layers
    device = model.rope_cos.device
    dtype = model.model.embed_tokens.weight.dtype
    ids = ids.to(device)
    n = ids.shape[0]
    blocks = -(-n // block_size)
    kv = allocate_kv_cache(model.arch, layers[0].self_attn.num_kv_heads, blocks, block_size, dtype, device)
    model.bind_kv_cache(kv.k, kv.v)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        context_lens=torch.tensor([n], dtype=torch.int32, device=device),
        max_query_len=n,
        max_context_len=n,
    )
    model(ids, torch.arange(n, device=device), meta)
    amax = torch.stack(
        [
            torch.stack([c.flatten(0, 1)[:n].float().abs().amax(dim=(0, 2)).cpu() for c in cache])
            for cache in (kv.k, kv.v)
        ]
    )
    empty = [torch.empty(0)] * len(layers)
    model.bind_kv_cache(empty, empty)
    return amax


def kv_scale_state(calibrated: LlamaForCausalLM, rank_model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The scales of the KV heads `rank_model` holds (its rank's block of a TP group, or all of them),
    taken from a whole (TP 1) calibrated model, named as rank_model's buffers: what a rank file stores."""
    state = {}
    for i, (whole, part) in enumerate(zip(calibrated.model.layers, rank_model.model.layers, strict=True)):
        qkv = part.self_attn.qkv_proj
        first = (qkv.tp.rank // qkv.kv_replicas) * qkv.num_kv_heads
        for name in SCALE_NAMES:
            heads = getattr(whole.self_attn, name)[first : first + qkv.num_kv_heads]
            state[f"model.layers.{i}.self_attn.{name}"] = heads.float().contiguous().clone()
    return state


def is_kv_scale(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SCALE_NAMES
