"""Calibration of the FP8 KV cache's scales: one per layer and KV head, for K and for V.

e4m3 keeps 3 mantissa bits at any magnitude between 2^-9 and 448, so a scale matters at the ends:
too small and the largest keys saturate, too large and small values lose bits to subnormals. A
calibration runs one prefill of CALIBRATION_TOKENS tokens through the model with a full-precision
scratch cache, reads the largest |K| and |V| each head wrote (post-RoPE, exactly what the cache will
hold) and sets scale = HEADROOM x amax / 448: values up to HEADROOM times the calibrated range are
kept, beyond that they saturate.

Two places run it:
  `fuserve build --kv-cache fp8`  once, on text shipped with fuserve (kv_calibration.txt: prose,
                                  dialogue, code, numbers, three scripts) through the model's own
                                  tokenizer, on the whole model (TP 1); each rank file then holds its
                                  heads' scales as `model.layers.<i>.self_attn.{k,v}_scale`
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
    model: LlamaForCausalLM, block_size: int, seed: int = 0, ids: torch.Tensor | None = None
) -> None:
    """Set every attention layer's k_scale and v_scale from one prefill of `ids` (default: the
    start-up's pseudo-random tokens), cut to the model's positions."""
    layers = model.model.layers
    device = model.rope_cos.device
    dtype = model.model.embed_tokens.weight.dtype
    if ids is None:
        ids = random_calibration_ids(
            model.arch.vocab_size, seed, min(CALIBRATION_TOKENS, model.rope_cos.shape[0])
        )
    ids = ids[: model.rope_cos.shape[0]].to(device)
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
    for layer, k, v in zip(layers, kv.k, kv.v, strict=True):
        attn = layer.self_attn
        for cache, scale in ((k, attn.k_scale), (v, attn.v_scale)):
            written = cache.flatten(0, 1)[:n].float()  # [n, Hkv, D]
            amax = written.abs().amax(dim=(0, 2)).clamp_min(1e-4)
            scale.copy_(amax * HEADROOM / FP8_MAX)
    empty = [torch.empty(0)] * len(layers)
    model.bind_kv_cache(empty, empty)


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
