"""A checkpoint whose config asks for math fuserve does not compute is refused at load, by name.

Before, Mistral's `sliding_window` was ignored (tokens diverged from HF past the window) and
`hidden_act: gelu` ran as SiLU, both without a word. A sliding window that never takes effect (at
least max_model_len) is served, and matches HF token for token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.workers.models.fidelity import UnsupportedConfigError, check_implemented

BASE = {"model_type": "llama", "hidden_act": "silu", "num_hidden_layers": 2}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary"),
        ({"model_type": "mistral", "sliding_window": 32}, "sliding_window 32"),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1},
            "sliding_window 32",
        ),
        (
            {
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 32,
                "layer_types": ["full_attention", "sliding_attention"],
            },
            "sliding_window 32",
        ),
    ],
)
def test_unimplemented_fields_are_refused_by_name(overrides: dict, fragment: str) -> None:
    with pytest.raises(UnsupportedConfigError, match=fragment):
        check_implemented({**BASE, **overrides}, max_model_len=64)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_type": "mistral", "sliding_window": None},
        {"model_type": "mistral", "sliding_window": 64},  # never shorter than a served sequence
        {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32},
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2},
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"hidden_act": "swish", "mlp_bias": False, "pretraining_tp": 2, "attention_dropout": 0.1},
    ],
)
def test_fields_fuserve_computes_or_that_do_not_matter_pass(overrides: dict) -> None:
    check_implemented({**BASE, **overrides}, max_model_len=64)


def test_loading_refuses_a_sliding_window_and_a_gelu_model(tmp_path: Path) -> None:
    mistral = make_checkpoint(tmp_path / "mistral", "mistral", sliding_window=16)
    with pytest.raises(UnsupportedConfigError, match="set model.max_model_len to at most 16"):
        LLM(config_from_dict({"model": {"path": str(mistral), "max_model_len": 64}}))
    gelu = make_checkpoint(tmp_path / "gelu", "llama3", hidden_act="gelu")
    with pytest.raises(UnsupportedConfigError, match="hidden_act 'gelu'"):
        LLM(config_from_dict({"model": {"path": str(gelu), "max_model_len": 64}}))


def test_a_window_no_sequence_reaches_is_served_and_matches_hf(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_checkpoint(tmp_path / "mistral", "mistral", sliding_window=32)
    llm = LLM(config_from_dict({"model": {"path": str(folder), "max_model_len": 32}}))
    prompt = list(range(3, 13))
    ours = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert ours[0].outputs[0].token_ids == ref[0, len(prompt) :].tolist()
