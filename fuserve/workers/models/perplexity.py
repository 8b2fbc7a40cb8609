"""How well a model predicts a fixed text, for accuracy checks of quantized weights.

Quantization trades bytes for accuracy; its tests and benchmarks measure the cost on the same tokens
as the change in perplexity (exp of the mean NLL) and as top-1 agreement (how often the quantized
model's greedy next token, fed the true text, equals the reference model's). One prefill forward over
the whole text through the model's own paged-attention path, on a scratch KV cache of the dtype the
model serves with (so an FP8 cache is measured too): the engine's cache is put back after.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fuserve.workers.kv_cache import allocate_kv_cache
from fuserve.workers.models.llama import AttentionMetadata, LlamaForCausalLM


@torch.inference_mode()
def score_text(
    model: LlamaForCausalLM, ids: list[int], block_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position but the last: the NLL (fp32) of the next token ids[1:] given the tokens before
    it, and the model's greedy next token (int64); both [len(ids) - 1]."""
    layers = model.model.layers
    device = model.rope_cos.device
    dtype = model.model.embed_tokens.weight.dtype
    n = len(ids)
    blocks = -(-n // block_size)
    saved = [(layer.self_attn.k_cache, layer.self_attn.v_cache) for layer in layers]
    if saved[0][0].numel():  # the dtype of the cache the model serves with (fp8 included)
        dtype = saved[0][0].dtype
    kv = allocate_kv_cache(model.arch, layers[0].self_attn.num_kv_heads, blocks, block_size, dtype, device)
    model.bind_kv_cache(kv.k, kv.v)
    try:
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
            context_lens=torch.tensor([n], dtype=torch.int32, device=device),
            max_query_len=n,
            max_context_len=n,
        )
        tokens = torch.tensor(ids, device=device)
        hidden = model(tokens, torch.arange(n, device=device), meta)
        logits = model.compute_logits(hidden).float()[:-1]
        return F.cross_entropy(logits, tokens[1:], reduction="none"), logits.argmax(dim=-1)
    finally:
        model.bind_kv_cache([k for k, _ in saved], [v for _, v in saved])


# held-out text on every machine with Python
STDLIB_MODULES = ("textwrap", "shlex", "fnmatch", "colorsys", "bisect", "heapq", "glob", "string")


def stdlib_text() -> str:
    """CPython standard-library sources, concatenated: fixed text for accuracy checks, available offline."""
    parts = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        parts.append(Path(spec.origin).read_text())
    return "\n".join(parts)


def perplexity(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> float:
    return math.exp(float(score_text(model, ids, block_size)[0].mean()))
