"""A draft model in the engine's own process (speculative.placement.in_engine, and every offline engine):
`fuserve.LLM` with `speculative.method: draft` drafts through the draft runner on the target's device, no
deployment and no channel, and every greedy token is the one the target says alone. The target's own
copy as its draft keeps every draft, also when a small KV pool preempts sequences mid-generation; a
draft of perturbed weights keeps some, and the output is still the target's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.speculative.draft_runner import DraftRunner
from fuserve.speculative.factory import build_proposer
from fuserve.speculative.ngram import NgramProposer

MODEL = {"name": "tiny", "max_model_len": 128}
PROMPTS = [[5, 9, 33, 7], [100, 101, 102, 103, 104, 105, 106], [42] * 3, list(range(20, 50))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("in-engine")
    target = make_checkpoint(folder / "target", "llama3", vocab_size=260, max_position_embeddings=256)
    return target, _perturbed(target, folder / "other")


def _perturbed(target: Path, folder: Path) -> Path:
    """The target with noise on its last layer's MLP: a draft that agrees with it often, not always (a
    draft of unrelated random weights never does, and would leave rollback of accepted drafts untried)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(target, folder)
    file = folder / "model.safetensors"
    weights = load_file(file)
    gen = torch.Generator().manual_seed(7)
    for name, w in weights.items():
        if name.startswith("model.layers.1.mlp."):
            weights[name] = w + 1.5 * w.std() * torch.randn(w.shape, generator=gen)
    save_file(weights, file, metadata={"format": "pt"})
    return folder


def _generate(target: Path, draft: Path | None, num_blocks: int = 64) -> tuple[list[list[int]], LLM]:
    """Greedy tokens of PROMPTS; a pool of `num_blocks` blocks of 8 tokens (the draft's too)."""
    config = {"model": {"path": str(target), **MODEL}, "cache": {"num_blocks": num_blocks, "block_size": 8}}
    if draft is not None:
        config["speculative"] = {
            "method": "draft",
            "draft": {"path": str(draft), "max_model_len": 128},
            "num_speculative_tokens": 3,
            "adaptive": False,
        }
    llm = LLM(config_from_dict(config))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    return [c.outputs[0].token_ids for c in llm.generate(PROMPTS, params)], llm


def test_factory_builds_each_method_in_the_engine(checkpoints: tuple[Path, Path]) -> None:
    target, other = checkpoints
    base = {"model": {"path": str(target), **MODEL}, "cache": {"num_blocks": 16}}
    cpu = torch.device("cpu")
    assert build_proposer(config_from_dict(base), cpu) is None
    ngram = config_from_dict({**base, "speculative": {"method": "ngram", "ngram_min": 1}})
    assert isinstance(build_proposer(ngram, cpu), NgramProposer)
    spec = {"method": "draft", "draft": {"path": str(other)}, "placement": {"device": "cuda"}}
    runner = build_proposer(config_from_dict({**base, "speculative": spec}), cpu)
    assert (
        isinstance(runner, DraftRunner) and runner.device == cpu
    )  # the target's device, not the placement's


@pytest.mark.parametrize("draft", ["itself", "other"])
def test_offline_drafts_keep_the_targets_tokens(checkpoints: tuple[Path, Path], draft: str) -> None:
    target, other = checkpoints
    want, _ = _generate(target, None)
    got, llm = _generate(target, target if draft == "itself" else other)
    assert got == want
    speculation = llm.engine.speculation
    assert speculation is not None and isinstance(speculation.proposer, DraftRunner)
    stats = speculation.snapshot()
    assert stats.num_drafts > 0 and stats.num_accepted > 0
    if draft == "itself":
        assert stats.num_accepted == stats.num_drafts  # its own copy drafts what it then says
    else:
        assert stats.num_accepted < stats.num_drafts


def test_offline_drafts_survive_preemption(checkpoints: tuple[Path, Path]) -> None:
    """A pool of 20 blocks of 8 tokens for four sequences of up to 70: some are preempted and start
    over, in the target and in the draft (the target's own copy, so a draft state that went wrong across
    the preemption shows as a rejected draft)."""
    target, _ = checkpoints
    want, _ = _generate(target, None)
    got, llm = _generate(target, target, 20)
    assert got == want
    assert llm.engine.scheduler.num_preemptions > 0
    stats = llm.engine.speculation.snapshot()  # type: ignore[union-attr]
    assert stats.num_drafts > 0 and stats.num_accepted == stats.num_drafts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_in_engine_draft_on_the_gpu(checkpoints: tuple[Path, Path]) -> None:
    """On a GPU the target takes its share of the device first; the draft sizes its pool from what it
    allocated itself (not the target's memory) within what is free, and runs its CUDA graphs."""
    target, _ = checkpoints
    model = {"path": str(target), **MODEL, "device": "cuda", "dtype": "float32"}
    spec = {"method": "draft", "draft": {"path": str(target), "max_model_len": 128, "dtype": "float32"},
            "num_speculative_tokens": 3, "adaptive": False}  # fmt: skip
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = LLM(config_from_dict({"model": model, "cache": {"num_blocks": 64}}))  # small: it stays allocated
    want = [c.outputs[0].token_ids for c in plain.generate(PROMPTS, params)]
    plain.engine.shutdown()
    config = {"model": model, "cache": {"gpu_memory_utilization": 0.3}, "speculative": spec}
    llm = LLM(config_from_dict(config))
    assert [c.outputs[0].token_ids for c in llm.generate(PROMPTS, params)] == want
    speculation = llm.engine.speculation
    assert speculation is not None and isinstance(speculation.proposer, DraftRunner)
    assert speculation.proposer.runner.graphs is not None and speculation.proposer.seqs.num_blocks > 8
    stats = speculation.snapshot()
    assert stats.num_drafts > 0 and stats.num_accepted == stats.num_drafts
