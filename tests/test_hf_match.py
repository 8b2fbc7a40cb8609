"""The correctness oracle: greedy tokens and logprobs equal HF transformers' on the same weights.

The engine runs a batch of mixed-length prompts with a tiny block pool (forcing preemption), a
small token budget (forcing chunked prefill), and a second batch that reuses the first's prefixes
(forcing prefix-cache hits); every sequence must still match HF token for token for 32 steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict

STEPS = 32
LOGPROB_ATOL = 2e-4  # fp32 end to end: reference ops vs HF's attention differ by rounding only


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """HF's own forward with its KV cache, greedy; returns tokens and each chosen token's logprob."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(steps):
        logits = out.logits[0, -1].float()
        tok = int(logits.argmax())
        tokens.append(tok)
        logprobs.append(float(logits.log_softmax(-1)[tok]))
        out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


def assert_matches_hf(llm: LLM, hf: torch.nn.Module, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=0)
    results = llm.generate(prompts, params)
    for prompt, res in zip(prompts, results, strict=True):
        want_tokens, want_lp = hf_greedy(hf, prompt, STEPS)
        got = res.outputs[0]
        assert got.token_ids == want_tokens, f"prompt of {len(prompt)} tokens diverged from HF"
        got_lp = [lp.logprob for lp in got.logprobs]
        assert got_lp == pytest.approx(want_lp, abs=LOGPROB_ATOL)


def _prompts(rng: random.Random, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    lengths = [1, 3, 17, 30, 45, 64]
    first = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    # Second batch: prefixes of the first batch's prompts plus new tails -> prefix-cache hits.
    second = [first[3][:20] + [rng.randrange(vocab) for _ in range(5)], first[5][:48] + [7, 8, 9], first[4]]
    return first, second


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
@pytest.mark.parametrize("arch", ["llama3", "llama31", "mistral", "qwen2"])
def test_tiny_models_match_hf(tmp_path: Path, arch: str, async_scheduling: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_checkpoint(tmp_path / arch, arch, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    config = config_from_dict(
        {
            "model": {"path": str(folder), "max_model_len": 128},
            "cache": {"block_size": 4, "num_blocks": 48},
            "scheduler": {
                "max_num_batched_tokens": 24,
                "max_num_seqs": 8,
                "async_scheduling": async_scheduling,
            },
        }
    )
    llm = LLM(config)
    first, second = _prompts(random.Random(arch), 256)
    with torch.inference_mode():
        assert_matches_hf(llm, hf, first)
        assert_matches_hf(llm, hf, second)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the small pool should have forced preemption"
    assert stats.prefix_hit_tokens > 0, "the second batch should have hit the prefix cache"
    assert stats.num_waiting == stats.num_running == 0
    assert llm.engine.block_manager.num_free_blocks == stats.num_blocks, "blocks leaked"
    # a step's wall time splits into host work and the wait for the device; prefill steps are a part
    assert 0.0 <= stats.device_wait_seconds_total <= stats.step_seconds_total
    assert 0 < stats.prefill_steps < stats.num_steps
    assert 0.0 < stats.prefill_step_seconds_total < stats.step_seconds_total
