"""A draft's head over a vocabulary subset: its logits are the full head's logits at those rows, its
greedy token is the best of the subset as a target id (or of the subset and the live sequences' context
tokens) with the softmax probability it gives that token, its second-best token (speculative.second_best)
is the best other token id of the same candidates while its best stays greedy's, and a vocabulary that
does not fit the model is refused with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fuserve.speculative.subset_head import (
    ContextTokens,
    SubsetHead,
    read_vocab_file,
    top_two,
    write_vocab_file,
)

V, H = 1000, 64


def test_logits_are_the_full_heads_at_the_subset_rows_and_greedy_maps_back() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=gen)
    ids = torch.randperm(V, generator=gen)[:150].sort().values
    hidden = torch.randn(7, H, generator=gen)
    head = SubsetHead(weight, ids)
    full = F.linear(hidden, weight)
    torch.testing.assert_close(head.logits(hidden), full[:, ids], rtol=1e-6, atol=1e-5)
    want = ids[full[:, ids].argmax(-1)]
    assert torch.equal(head.greedy(hidden), want)
    assert set(head.greedy(hidden).tolist()) <= set(ids.tolist())
    # where the full head's argmax is in the subset, the subset head picks that same token
    hidden_in = weight[ids[3]].unsqueeze(0) * 10  # a row pointing at subset token ids[3]
    assert int(head.greedy(hidden_in)) == int(F.linear(hidden_in, weight).argmax()) == int(ids[3])
    assert head.weight.is_contiguous() and head.weight.shape == (150, H)


def test_context_tokens_extend_the_candidates_while_a_sequence_holds_them() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(V, H, generator=gen)
    ids = torch.arange(0, V, 10)  # the subset: multiples of 10
    head = SubsetHead(weight, ids)
    context = ContextTokens(head)
    assert context.candidates() is None
    context.add("a", [10, 20, 7, 7, 501])  # 10 and 20 are in the subset already
    context.add("b", [501, 33])
    got = context.candidates()
    assert got is not None and sorted(got[0].tolist()) == [7, 33, 501]
    torch.testing.assert_close(got[1], weight[got[0]])
    assert context.candidates() is got  # unchanged: not gathered again
    hidden = weight[33].unsqueeze(0) * 10  # points at token 33, outside the subset
    assert int(head.greedy(hidden)) != 33
    assert int(head.greedy(hidden, got)) == int(F.linear(hidden, weight).argmax()) == 33
    context.drop("b")  # 501 is still a's; 33 goes
    got = context.candidates()
    assert got is not None and sorted(got[0].tolist()) == [7, 501]
    context.drop("a")
    assert context.candidates() is None and not context.holders


def head_with_context(seed: int) -> tuple[torch.Tensor, torch.Tensor, SubsetHead, Any, torch.Tensor]:
    """(weight, subset ids, head, its context tokens' candidates, 9 hidden rows); row 0 points, with
    confidence, at context token 33."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=gen)
    ids = torch.arange(0, V, 10)
    head = SubsetHead(weight, ids)
    context = ContextTokens(head)
    context.add("a", [7, 33, 501])
    hidden = torch.randn(9, H, generator=gen) * 3
    hidden[0] = weight[33] * 10
    return weight, ids, head, context.candidates(), hidden


def test_greedy_with_confidence_gives_greedys_token_and_its_softmax_over_the_candidates() -> None:
    weight, ids, head, extra, hidden = head_with_context(2)
    for candidates in (None, extra):
        tokens, conf = head.greedy_with_confidence(hidden, candidates)
        assert torch.equal(tokens, head.greedy(hidden, candidates))
        pool = ids if candidates is None else torch.cat([ids, candidates[0]])
        probs = torch.softmax(F.linear(hidden, weight[pool]), dim=-1)
        torch.testing.assert_close(conf, probs.max(-1).values)
        assert torch.equal(pool[probs.argmax(-1)], tokens)
    assert int(tokens[0]) == 33 and float(conf[0]) > 0.99 and float(conf[1:].min()) < 0.99


def test_best_two_is_greedys_token_and_the_best_other_token_of_the_same_candidates() -> None:
    weight, ids, head, extra, hidden = head_with_context(3)
    for candidates in (None, extra):
        pool = ids if candidates is None else torch.cat([ids, candidates[0]])
        top = F.linear(hidden, weight[pool]).topk(2, dim=-1).indices  # the reference: no ties here
        for with_confidence in (False, True):
            best, second, conf = head.best_two(hidden, candidates, with_confidence)
            assert torch.equal(best, head.greedy(hidden, candidates))
            assert torch.equal(best, pool[top[:, 0]]) and torch.equal(second, pool[top[:, 1]])
            assert bool((second != best).all())
            if with_confidence:
                assert conf is not None
                torch.testing.assert_close(conf, head.greedy_with_confidence(hidden, candidates)[1])
            else:
                assert conf is None
    assert int(best[0]) == 33

    # ties go as greedy's: to the first column, for the best and then for the second
    best, second, _ = head.best_two(torch.zeros(2, H), extra)
    assert best.tolist() == head.greedy(torch.zeros(2, H), extra).tolist() == [0, 0]
    assert second.tolist() == [10, 10]

    # a candidate list naming the best token twice (ContextTokens never does): the second is another id
    twice = (torch.tensor([40, 7]), weight[[40, 7]])
    pointed = weight[40].unsqueeze(0) * 10
    best, second, _ = head.best_two(pointed, twice)
    distinct = torch.cat([ids, torch.tensor([7])])
    want = distinct[F.linear(pointed, weight[distinct]).topk(2, dim=-1).indices[0]]
    assert int(best) == 40 == int(want[0]) and int(second) == int(want[1]) != 40


def test_top_two_over_the_whole_vocabulary() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, V, generator=gen)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie for the best: the lower id wins it
    before = logits.clone()
    best, second = top_two(logits)
    assert torch.equal(logits, before)  # masked in a copy
    assert torch.equal(best, logits.argmax(-1))
    assert best[0] == 5 and second[0] == 9
    assert torch.equal(second[1:], logits[1:].topk(2, dim=-1).indices[:, 1])
    with pytest.raises(ValueError, match="two candidates"):
        top_two(torch.zeros(3, 1))


def test_a_vocabulary_that_does_not_fit_the_model_is_refused() -> None:
    weight = torch.zeros(V, H)
    with pytest.raises(ValueError, match="outside the model's 1000 tokens"):
        SubsetHead(weight, torch.tensor([1, 5, V]))
    with pytest.raises(ValueError, match="ascending"):
        SubsetHead(weight, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="ascending"):
        SubsetHead(weight, torch.tensor([], dtype=torch.int64))


def test_vocab_file_round_trip(tmp_path: Path) -> None:
    assert read_vocab_file(tmp_path) is None
    ids = torch.tensor([0, 7, 49151])
    write_vocab_file(tmp_path, ids.to(torch.uint16), "three tokens")
    assert torch.equal(read_vocab_file(tmp_path), ids)
