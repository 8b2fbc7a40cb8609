"""The FP8 KV cache end to end on a tiny checkpoint: the pool holds more tokens in the same memory,
the calibrated per-head scales keep the model's predictions, and chunked prefill plus decode read it."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.workers.models.perplexity import score_text

PROMPTS = [list(range(1, 30)), [5, 6, 7], list(range(100, 160))]


def _llm(folder: Path, kv_cache_dtype: str) -> LLM:
    return LLM(
        config_from_dict(
            {
                "model": {"path": str(folder), "max_model_len": 128},
                "cache": {"block_size": 4, "cpu_kv_cache_gib": 0.001, "kv_cache_dtype": kv_cache_dtype},
                "scheduler": {"max_num_batched_tokens": 16},  # chunked prefill over the fp8 cache
            }
        )
    )


def test_fp8_kv_cache_holds_more_tokens_and_keeps_predictions(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "llama3", "llama3", seed=1)
    full, fp8 = _llm(folder, "auto"), _llm(folder, "fp8")
    full_blocks, fp8_blocks = full.engine.executor.worker.num_blocks, fp8.engine.executor.worker.num_blocks
    assert fp8_blocks >= 4 * full_blocks  # fp32 on CPU -> 1 byte: 4x the tokens in the same 1 MiB
    attn = fp8.engine.executor.worker.model.model.layers[0].self_attn
    assert attn.k_cache.dtype.itemsize == 1 and (attn.k_scale != 1).all() and (attn.v_scale != 1).all()

    text = list(range(1, 120))
    nll_full, top_full = score_text(full.engine.executor.worker.model, text)
    nll_fp8, top_fp8 = score_text(fp8.engine.executor.worker.model, text)
    assert float(nll_fp8.mean()) == pytest.approx(float(nll_full.mean()), rel=0.01)
    assert float((top_fp8 == top_full).float().mean()) >= 0.9

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [r.outputs[0].token_ids for r in full.generate(PROMPTS, params)]
    got = [r.outputs[0].token_ids for r in fp8.generate(PROMPTS, params)]
    for g, w in zip(got, want, strict=True):  # near-uniform random logits drift apart later
        assert len(g) == 24 and g[:8] == w[:8]
