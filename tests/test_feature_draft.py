"""Speculation with a feature-reading (EAGLE-1) draft: the target's features, the draft, the channel.

- The features the engine hands a proposer are HF transformers' last hidden states before the final
  norm (the norm's input; HF's output_hidden_states[-1] is after it), row for row, through chunked
  prefill, preemption and rejected drafts; a prefix-cache hit on a new sequence reads zeros for its
  cached rows.
- Greedy output with a random-weight feature draft is plain decoding's, with preemption and prefix hits.
- The served draft proposes what training/eagle_model.py's EagleDraft proposes, chained as drafting
  runs (and as eval_eagle.py's unrolled passes score it), for the same weights and features, through
  rollback; with the standardization folded into the file (EagleDraft.fold_standardization) it equals
  the unfolded draft reading standardized features.
- Rounds through a real draft server (features on the channel, resent from 0 after a reconnect) equal
  the in-process runner.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import CacheConfig, DraftPlacementConfig, KernelConfig, ModelConfig, config_from_dict
from fuserve.speculative.feature_store import FeatureRows
from fuserve.speculative.proposer import ProposeRequest, feature_rows_begin
from fuserve.speculative.speculation import Speculation

VOCAB = 300


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("feat") / "target", "llama3", vocab_size=VOCAB, seed=4)


@pytest.fixture(scope="module")
def hf_features(target: Path):
    """HF's pre-norm last hidden states of a token list: [len, hidden] fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    captured: list[torch.Tensor] = []
    model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    @torch.inference_mode()
    def features(tokens: list[int]) -> torch.Tensor:
        captured.clear()
        out = model(torch.tensor([tokens]), output_hidden_states=True)
        f = captured[0][0]
        torch.testing.assert_close(model.model.norm(f), out.hidden_states[-1][0])  # HF's is post-norm
        return f

    return features


def make_llm(target: Path, **sections: Any) -> LLM:
    cfg: dict[str, Any] = {"model": {"path": str(target), "max_model_len": 160}, **sections}
    cfg["speculative"] = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    return LLM(config_from_dict(cfg))


class RecordingFeatureProposer:
    """A proposer that reads features as a feature draft does: it keeps each sequence's tokens and
    features as the rounds tell them (rollback by truncation, as the channel's client keeps them) and
    snapshots both every round. Its drafts are the target's own continuation for a random number of
    positions, then a wrong token, so the target keeps some drafts and rejects others."""

    reads_features = True

    def __init__(self, continuations: list[list[int]], seed: int) -> None:
        self.continuations = continuations
        self.rng = random.Random(seed)
        self.tokens: dict[str, list[int]] = {}
        self.features: dict[str, FeatureRows] = {}
        self.snapshots: list[tuple[str, list[int], torch.Tensor]] = []

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        out = []
        for r in requests:
            tokens = self.tokens.setdefault(r.seq_id, [])
            del tokens[r.start :]
            tokens.extend(r.token_ids)
            rows = self.features.setdefault(r.seq_id, FeatureRows())
            assert r.features is not None and r.features.dtype == torch.bfloat16
            begin = feature_rows_begin(r.start)
            assert r.features.shape[0] == len(tokens) - 1 - begin
            rows.put(begin, r.features)
            self.snapshots.append((r.seq_id, list(tokens), rows.get(0, len(tokens) - 1)))
            full = next(c for c in self.continuations if c[: len(tokens)] == tokens)
            right = self.rng.randrange(0, r.k + 1)
            out.append((full[len(tokens) : len(tokens) + right] + [VOCAB - 1 - full[len(tokens)]])[: r.k])
        return out

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self.tokens.pop(s, None)
            self.features.pop(s, None)


def test_features_are_hf_pre_norm_hidden_states(target: Path, hf_features) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB - 40) for _ in range(n)] for n in (30, 7, 45, 19)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    # ~4 x 70 tokens in 14 blocks of 16: preemption; a 24-token budget: chunked prefill
    sections = dict(cache={"num_blocks": 14}, scheduler={"max_num_batched_tokens": 24})
    llm = make_llm(target, **sections)
    plain = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    llm = make_llm(target, **sections)
    recorder = RecordingFeatureProposer(plain, seed=1)
    llm.engine.speculation = Speculation(llm.config.speculative, recorder)
    assert llm.engine.executor.worker.model.keep_features
    got = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, params), strict=True)]
    assert got == plain
    stats = llm.engine.stats()
    assert 0 < stats.spec.num_accepted < stats.spec.num_drafts  # drafts kept and rejected
    assert stats.num_preemptions > 0
    want = {tuple(seq): hf_features(seq) for seq in plain}
    for _, tokens, rows in recorder.snapshots:
        full = next(w for seq, w in want.items() if list(seq[: len(tokens)]) == tokens)
        torch.testing.assert_close(rows.float(), full[: len(tokens) - 1], rtol=2e-2, atol=2e-2)
    assert len(llm.engine.speculation.features) == 0  # freed as the sequences finished

    # the same prompt again: its full blocks are cached, so its first rows are no one's (zeros)
    recorder.snapshots.clear()
    [again] = llm.generate([prompts[2]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    cached = again.num_cached_tokens
    assert cached >= 16
    _, tokens, rows = recorder.snapshots[-1]
    assert not rows[:cached].any()
    torch.testing.assert_close(
        rows[cached:].float(), hf_features(tokens)[cached : len(tokens) - 1], rtol=2e-2, atol=2e-2
    )
