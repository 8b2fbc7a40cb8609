from __future__ import annotations

import pytest
import torch

from fuserve.sampling_params import SamplingParams
from fuserve.workers.sampler import Sampler, SampleRequest


def rows(n: int, **kw) -> list[SampleRequest]:
    return [SampleRequest(SamplingParams(**kw), [1, 2, 3], [4, 4, 5]) for _ in range(n)]


def test_greedy_and_top_k_1_are_argmax() -> None:
    logits = torch.randn(4, 50)
    sampler = Sampler()
    assert [r.token_id for r in sampler(logits.clone(), rows(4, temperature=0.0))] == logits.argmax(
        -1
    ).tolist()
    out = sampler(logits.clone(), rows(4, temperature=1.3, top_k=1))
    assert [r.token_id for r in out] == logits.argmax(-1).tolist()


def test_seeded_draws_repeat_and_ignore_batch_company() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    sampler = Sampler()
    a = sampler(logits.clone(), rows(3, temperature=1.0, seed=7))
    b = sampler(logits[1:2].clone(), rows(1, temperature=1.0, seed=7))
    assert a[1].token_id == b[0].token_id
    c = sampler(logits.clone(), rows(3, temperature=1.0, seed=7))
    assert [r.token_id for r in a] == [r.token_id for r in c]


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).clone()
    out = Sampler()(logits, rows(4000, temperature=1.0))
    freq = torch.bincount(torch.tensor([r.token_id for r in out]), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_mixed_batch_each_row_its_own_way() -> None:
    """Greedy, temperature-only, top-p, seeded and unseeded rows in one batch: only the top-p rows are
    filtered (the others skip the sort), and each row still draws from its own distribution."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 3000
    logits = probs.log().expand(3 * n + 2, 4).clone()
    batch = (
        rows(n, temperature=0.5)
        + rows(n, temperature=1.0, top_p=0.75)
        + rows(n, temperature=0.0)
        + rows(1, temperature=1.0, seed=11)
        + rows(1, temperature=0.5, seed=3)
    )
    out = [r.token_id for r in Sampler()(logits, batch)]
    sharp = probs**2 / (probs**2).sum()  # softmax(log p / 0.5)
    freq = torch.bincount(torch.tensor(out[:n]), minlength=4).float() / n
    assert torch.allclose(freq, sharp, atol=0.03)
    assert set(out[n : 2 * n]) == {0, 1}
    assert set(out[2 * n : 3 * n]) == {0}
    alone = Sampler()(probs.log().expand(2, 4).clone(), batch[-2:])
    assert out[-2:] == [r.token_id for r in alone]  # seeded rows ignore their batch company


def test_top_p_and_min_p_cut_the_tail() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(500, 4).clone()
    nucleus = {r.token_id for r in Sampler()(logits.clone(), rows(500, temperature=1.0, top_p=0.75))}
    assert nucleus == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75
    minp = {r.token_id for r in Sampler()(logits.clone(), rows(500, temperature=1.0, min_p=0.35))}
    assert minp == {0, 1}  # keeps p >= 0.35 * 0.5


def _kept_by_sorting(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens a row may draw, by the textbook definition: sort, keep the top k, then the shortest
    prefix of the renormalized top k whose mass reaches top_p, then those >= min_p x the best."""
    probs, order = logits.double().softmax(-1).sort(descending=True)
    if p.top_k > 0:
        probs = probs[: p.top_k] / probs[: p.top_k].sum()
    before = probs.cumsum(0) - probs
    keep = (before < p.top_p) if p.top_p < 1.0 else torch.ones_like(probs, dtype=torch.bool)
    keep &= probs >= p.min_p * probs[0]
    return set(order[: len(probs)][keep].tolist())


FILTERS = [
    dict(top_p=0.9),
    dict(top_p=0.5, top_k=40),
    dict(top_k=7),
    dict(min_p=0.05),
    dict(top_p=0.95, min_p=0.02),
    dict(top_k=300, top_p=0.8),
    dict(),
    dict(top_p=0.99),
]
# every top-p row also has a top-k: the nucleus is searched among the top k_max probabilities only
TOP_K_FIRST = [dict(top_p=0.5, top_k=40), dict(top_k=300, top_p=0.8), dict(top_k=7), dict(min_p=0.05), dict()]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
@pytest.mark.parametrize("filters", [FILTERS, TOP_K_FIRST], ids=["mixed", "top-k-first"])
def test_filters_keep_exactly_the_sorted_definition(device: str, filters: list[dict[str, float]]) -> None:
    """Without sorting (kernels/nucleus_threshold.py on a GPU), each row keeps the same tokens as the
    sort-based definition, for every mix of top-k, top-p and min-p in one batch."""
    from fuserve.workers.sampler import _filtered_probs

    gen = torch.Generator().manual_seed(5)
    vocab = 5000
    params = [SamplingParams(temperature=1.0, **f) for f in filters for _ in range(2)]
    logits = torch.randn(len(params), vocab, generator=gen) * torch.tensor([1.0, 3.0] * len(filters))[:, None]
    kept = _filtered_probs(logits.to(device), params).cpu()
    for row, p in enumerate(params):
        assert set(kept[row].nonzero().flatten().tolist()) == _kept_by_sorting(logits[row], p), (row, p)
    expected = logits.softmax(-1)
    torch.testing.assert_close(kept[kept > 0], expected[kept > 0])  # kept tokens keep their probability


def test_penalties_match_their_definitions() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 10)
    req = SampleRequest(SamplingParams(temperature=0.0, repetition_penalty=1.7, logprobs=10), [1, 2], [2, 3])
    got = Sampler()(logits.clone(), [req])[0].logprobs
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[1, 2, 2, 3]]), logits.clone()).log_softmax(-1)
    assert dict(got.top) == pytest.approx({i: float(want[0, i]) for i in range(10)}, abs=1e-5)

    req = SampleRequest(
        SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=10),
        [9],
        [3, 3, 4],
    )
    got = Sampler()(logits.clone(), [req])[0].logprobs
    expect = logits.clone()[0]
    expect[3] -= 0.5 + 0.25 * 2
    expect[4] -= 0.5 + 0.25
    assert dict(got.top) == pytest.approx(dict(enumerate(expect.log_softmax(-1).tolist())), abs=1e-5)


def test_logprobs_report_chosen_and_top_n() -> None:
    logits = torch.randn(2, 30)
    out = Sampler()(logits.clone(), rows(2, temperature=0.0, logprobs=3))
    ref = logits.log_softmax(-1)
    for i, r in enumerate(out):
        assert r.logprobs is not None
        assert r.logprobs.logprob == pytest.approx(float(ref[i].max()), abs=1e-6)
        assert [t for t, _ in r.logprobs.top] == ref[i].topk(3).indices.tolist()
