"""Top-p's cut-off without a sort (kernels/nucleus_threshold.py) against the sort-based reference."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.nucleus_threshold import (
    PIVOTS,
    _rounds,
    nucleus_cut,
    nucleus_threshold,
    nucleus_threshold_ref,
)


def _unambiguous_targets(probs: torch.Tensor, fractions: list[float]) -> torch.Tensor:
    """Per row, a target halfway between two consecutive sorted cumsums (in float64), so that fp32
    rounding in either sum order cannot move the cut-off."""
    cum = probs.double().sort(dim=-1, descending=True).values.cumsum(dim=-1)
    targets = []
    for row, fraction in enumerate(fractions):
        j = int(torch.searchsorted(cum[row], torch.tensor([fraction], dtype=torch.float64)))
        j = min(j, probs.shape[1] - 2)
        targets.append(float(cum[row, j] + cum[row, j + 1]) / 2 if j >= 0 else fraction)
    return torch.tensor(targets, dtype=torch.float32)


def test_search_covers_every_probability_bit_pattern() -> None:
    assert PIVOTS ** _rounds(PIVOTS) >= 0x3F800001 > PIVOTS ** (_rounds(PIVOTS) - 1)


@pytest.mark.parametrize("vocab", [1, 300, 2500])
def test_matches_sorting_on_random_rows(device: torch.device, vocab: int) -> None:
    scales = [0.5, 2.0, 4.0, 8.0, 1.0, 3.0]
    fractions = [0.9, 0.5, 0.95, 0.1, 0.99, 0.75]
    logits = torch.randn(len(scales), vocab) * torch.tensor(scales)[:, None]
    probs = logits.softmax(dim=-1)
    target = _unambiguous_targets(probs, fractions) if vocab > 1 else torch.tensor(fractions)
    got = nucleus_threshold(probs.to(device), target.to(device)).cpu()
    assert torch.equal(got, nucleus_threshold_ref(probs, target))
    for row in range(len(scales)):  # the definition itself, in float64
        p = probs[row].double()
        assert p[p >= got[row]].sum() >= target[row] > p[p > got[row]].sum()


def test_ties_zeros_and_edges(device: torch.device) -> None:
    probs = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],  # a tie at the cut: all four stay
            [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # one certain token
            [0.1, 0.2, 0.3, 0.0, 0.15, 0.25],
            [0.1, 0.2, 0.3, 0.0, 0.15, 0.25],
            [0.1, 0.2, 0.3, 0.0, 0.15, 0.25],  # a target over the row's whole sum: keep everything
        ]
    )
    target = torch.tensor([0.3, 0.9, 0.3, 0.56, 1.5])
    got = nucleus_threshold(probs.to(device), target.to(device)).cpu()
    assert got.tolist() == pytest.approx([0.25, 1.0, 0.3, 0.2, 0.0])
    assert torch.equal(got, nucleus_threshold_ref(probs, target))


def test_strided_rows(device: torch.device) -> None:
    """Rows of a wider buffer (a view, as the sampler may pass) are read with their stride."""
    wide = torch.randn(3, 700).softmax(dim=-1)
    probs = torch.zeros(3, 900)
    probs[:, :700] = wide
    target = _unambiguous_targets(wide, [0.8, 0.3, 0.6])
    got = nucleus_threshold(probs.to(device)[:, :700], target.to(device)).cpu()
    assert torch.equal(got, nucleus_threshold_ref(wide, target))


def test_known_rows_are_returned_and_the_rest_searched(device: torch.device) -> None:
    probs = torch.randn(4, 900).softmax(dim=-1)
    target = _unambiguous_targets(probs, [0.5, 0.9, 0.7, 0.2])
    known = torch.tensor([-1.0, 0.125, -1.0, 0.0])  # rows 1 and 3 "solved" (with made-up answers)
    got = nucleus_threshold(probs.to(device), target.to(device), known.to(device)).cpu()
    want = nucleus_threshold_ref(probs, target)
    assert got[0] == want[0] and got[2] == want[2]
    assert got[1] == 0.125 and got[3] == 0.0


@pytest.mark.parametrize("num_top", [1, 8, 40])
def test_cut_from_the_top_values_or_a_search(device: torch.device, num_top: int) -> None:
    """Peaked rows are solved by their top values; flat rows need the search; both equal sorting."""
    scales = torch.tensor([8.0, 0.3, 5.0, 1.0, 12.0, 0.1])
    probs = (torch.randn(6, 1200) * scales[:, None]).softmax(dim=-1)
    target = _unambiguous_targets(probs, [0.9, 0.9, 0.6, 0.5, 0.99, 0.3])
    top = probs.topk(num_top, dim=-1).values
    got = nucleus_cut(probs.to(device), target.to(device), top.to(device)).cpu()
    assert torch.equal(got, nucleus_threshold_ref(probs, target))


def test_wrong_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="float32"):
        nucleus_threshold_ref(torch.ones(2, 4, dtype=torch.float16), torch.ones(2))
    with pytest.raises(ValueError, match=r"target must be float32 \[2\]"):
        nucleus_threshold_ref(torch.ones(2, 4), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 64])
def test_llama3_vocabulary_on_gpu(batch: int) -> None:
    scales = torch.linspace(0.5, 6.0, batch)
    probs = (torch.randn(batch, 128256) * scales[:, None]).softmax(dim=-1)
    target = _unambiguous_targets(probs, torch.linspace(0.05, 0.99, batch).tolist())
    got = nucleus_threshold(probs.cuda(), target.cuda()).cpu()
    assert torch.equal(got, nucleus_threshold_ref(probs, target))
