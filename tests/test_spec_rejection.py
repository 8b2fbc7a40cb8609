"""Rejection sampling keeps the target's distribution exactly, whatever the drafts; greedy keeps its tokens.

The sampler's rows are verified against drafts drawn from a deliberately different distribution (so
drafts are both kept and rejected); the tokens must follow the target's filtered distribution by
Pearson's chi-square at significance 0.001 (tests/chi_square.py). The same test must reject two wrong
rules: keeping every draft, and drawing from the full target after a rejection (the classic slip that
leaves the rejected token in).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from chi_square import chi_square, critical_value

from fuserve.sampling_params import SamplingParams
from fuserve.speculative import rejection
from fuserve.speculative.rejection import NO_DRAFT, accepted_run, rejection_sample
from fuserve.workers.sampler import Sampler, SampleRequest, _filtered_probs

SIGNIFICANCE = 0.001
NUM_ROWS = 20000
TARGET_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -3.0, -4.0])
DRAFT_PROBS = torch.tensor([0.05, 0.05, 0.1, 0.3, 0.2, 0.1, 0.1, 0.1])  # far from the target
PARAMS = SamplingParams(temperature=0.8, top_k=6)


def target_probs() -> list[float]:
    probs = _filtered_probs((TARGET_LOGITS / PARAMS.temperature).unsqueeze(0), [PARAMS])[0]
    return (probs / probs.sum()).tolist()


def accept_always(probs, draft_ids, uniform, noise):  # noqa: ANN001, ANN201
    return rejection_sample(probs, draft_ids, torch.zeros_like(uniform), noise)


def redraw_from_full_target(probs, draft_ids, uniform, noise):  # noqa: ANN001, ANN201
    x = draft_ids.clamp(min=0)
    p_x = probs.gather(1, x.unsqueeze(1)).squeeze(1) / probs.sum(-1)
    accept = (draft_ids >= 0) & (uniform < p_x)
    return torch.where(accept, x, (probs / noise).argmax(-1))


def sampled_counts(rule: Callable | None, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    if rule is not None:
        monkeypatch.setattr("fuserve.workers.sampler.rejection_sample", rule)
    torch.manual_seed(0)
    vocab = len(TARGET_LOGITS)
    drafts = torch.multinomial(DRAFT_PROBS, NUM_ROWS, replacement=True).tolist()
    logits = TARGET_LOGITS.expand(NUM_ROWS, vocab).clone()
    rows = [SampleRequest(PARAMS, [1], []) for _ in range(NUM_ROWS)]
    tokens = Sampler().sample(logits, rows, drafts).tokens
    kept = sum(t == d for t, d in zip(tokens.tolist(), drafts, strict=True))
    assert 0.05 * NUM_ROWS < kept < 0.95 * NUM_ROWS, "drafts must be both kept and rejected"
    return torch.bincount(tokens, minlength=vocab).tolist()


def test_rejection_sampling_keeps_the_target_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    stat, df = chi_square(sampled_counts(None, monkeypatch), target_probs())
    assert stat < critical_value(df, SIGNIFICANCE), (stat, df)


@pytest.mark.parametrize("wrong_rule", [accept_always, redraw_from_full_target])
def test_the_same_check_catches_a_wrong_rule(wrong_rule: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    stat, df = chi_square(sampled_counts(wrong_rule, monkeypatch), target_probs())
    assert stat > critical_value(df, SIGNIFICANCE), (stat, df)


def test_rows_without_a_draft_draw_plainly_and_zero_mass_drafts_are_never_kept() -> None:
    torch.manual_seed(1)
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).expand(4000, 4).clone()
    noise = torch.empty_like(probs).exponential_()
    drafts = torch.tensor([0, 3] * 2000)  # tokens the target never draws
    out = rejection_sample(probs.clone(), drafts, torch.rand(4000), noise)
    assert set(out.tolist()) == {1, 2}
    plain = rejection_sample(probs.clone(), torch.full((4000,), NO_DRAFT), torch.rand(4000), noise)
    assert plain.tolist() == (probs / noise).argmax(-1).tolist()


def test_a_certain_draft_is_always_kept() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.0]]).expand(100, 3).clone()
    out = rejection_sample(probs, torch.ones(100, dtype=torch.int64), torch.rand(100), torch.ones(100, 3))
    assert out.tolist() == [1] * 100


def test_greedy_rows_keep_a_draft_exactly_when_it_is_the_argmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 30)
    best = logits.argmax(-1).tolist()
    drafts = [best[0], best[1] + 1, best[2], NO_DRAFT, best[4], best[5]]
    rows = [SampleRequest(SamplingParams(temperature=0.0), [1], []) for _ in range(6)]
    tokens = Sampler().sample(logits.clone(), rows, drafts).tokens.tolist()
    assert tokens == best


def test_accepted_run_stops_after_the_first_mismatch() -> None:
    assert accepted_run([5, 6, 7], [5, 6]) == [5, 6, 7]  # all kept, plus the bonus token
    assert accepted_run([5, 9, 7], [5, 6]) == [5, 9]  # second draft rejected: the target's token
    assert accepted_run([4, 6, 7], [5, 6]) == [4]
    assert accepted_run([8], []) == [8]
    assert rejection.NO_DRAFT < 0
