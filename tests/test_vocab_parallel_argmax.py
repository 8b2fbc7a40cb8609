"""Greedy tokens from vocab-parallel logits (fuserve/parallel/vocab_parallel_argmax.py), ranks simulated
in one process: the max over every rank's keys must be torch's argmax over the gathered row, ties and
signs included. The cross-process runs are the TP=2 engine tests in test_tensor_parallel.py."""

from __future__ import annotations

import pytest
import torch

from fuserve.parallel.tp_context import TPContext
from fuserve.parallel.vocab_parallel_argmax import (
    local_argmax_keys,
    vocab_parallel_argmax,
    vocab_parallel_argmax_ref,
)
from fuserve.workers.kernels.argmax import key_tokens, pack_keys


def _simulated(slices: list[torch.Tensor]) -> torch.Tensor:
    """What the MAX all-reduce of every rank's keys gives each rank."""
    starts = [sum(s.shape[1] for s in slices[:r]) for r in range(len(slices))]
    keys = torch.stack([local_argmax_keys(s, start) for s, start in zip(slices, starts, strict=True)])
    return key_tokens(keys.max(dim=0).values)


def test_keys_order_as_value_then_lower_index() -> None:
    values = torch.tensor([-float("inf"), -3.5, -1.0, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    for i in range(len(values)):
        for j in range(len(values)):
            for a, b in ((5, 9), (9, 5), (7, 7)):
                ki, kj = (
                    pack_keys(values[i : i + 1], torch.tensor([a])),
                    pack_keys(values[j : j + 1], torch.tensor([b])),
                )
                want = (values[i].item(), -a) > (values[j].item(), -b)  # -0.0 == 0.0, as floats compare
                assert bool(ki > kj) == want, (values[i], a, values[j], b)
    assert key_tokens(pack_keys(values, torch.arange(8) * 1000 + 3)).tolist() == list(range(3, 8003, 1000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("widths", [(50, 50), (64, 63), (40, 40, 40, 39)])
def test_ranks_agree_with_argmax_of_gathered_row(dtype: torch.dtype, widths: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(widths))
    logits = (torch.randn(6, sum(widths), generator=g) * 3 - 2).to(dtype)
    logits[1] = logits[1].abs().neg()  # every value negative
    logits[2, [3, sum(widths) - 1]] = logits[2].max() + 1  # a tie across ranks: the lower index wins
    logits[3, 10:20] = logits[3].max() + 1  # a tie inside one rank's slice
    logits[4] = -float("inf")  # nothing but -inf: index 0, as torch
    slices = list(logits.split(list(widths), dim=1))
    assert torch.equal(_simulated(slices), vocab_parallel_argmax_ref(slices))


def test_a_rank_of_padding_only_never_wins() -> None:
    slices = [torch.full((2, 5), -1e30), torch.empty(2, 0)]
    assert _simulated(slices).tolist() == [0, 0]


def test_one_rank_is_plain_argmax() -> None:
    logits = torch.randn(3, 17)
    assert torch.equal(vocab_parallel_argmax(logits, 0, TPContext()), logits.argmax(dim=-1))
