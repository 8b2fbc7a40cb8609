"""Overlap's bookkeeping (speculative/overlap.py), without a model: which kept drafts still apply after
the steps run since they were asked for, and how long a round waits for an answer drafted ahead."""

from __future__ import annotations

import pytest

from fuserve.sampling_params import SamplingParams
from fuserve.speculative.overlap import HIT_WAIT_MAX_S, HIT_WAIT_MIN_S, OVERLAP_MAX_SEQS, OverlapDrafts
from fuserve.speculative.proposer import ProposeRequest
from fuserve.workers.sequence import PLACEHOLDER, Sequence


def seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, list(tokens), SamplingParams(temperature=0.0), 0.0, max_tokens=64)


def kept_after_round(s: Sequence, drafts: list[int]) -> OverlapDrafts:
    """A round sent for `s` as it is now (it holds nothing before), and its reply read."""
    kept = OverlapDrafts(sent=[ProposeRequest(s.seq_id, 0, list(s.token_ids), len(drafts))])
    assert kept.absorb([drafts], None) == []
    return kept


def test_drafts_apply_while_the_tokens_gained_are_their_head() -> None:
    s = seq("a", [1, 2, 3])
    kept = kept_after_round(s, [10, 11, 12, 13])
    assert kept.drafts_now(s, 3) == [10, 11, 12] and not kept.made_before_a_plain_step(s)
    s.token_ids.append(10)  # a plain step wrote the first draft: the rest still apply
    assert kept.made_before_a_plain_step(s)
    assert kept.drafts_now(s, 4) == [11, 12, 13]
    s.token_ids.append(PLACEHOLDER)  # a step in flight: its token is not known yet
    assert kept.drafts_now(s, 1) == [11]
    s.token_ids[-1] = 99  # it wrote another token: none applies, and they are dropped
    assert kept.drafts_now(s, 4) == [] and "a" not in kept.drafted


def test_drafts_used_up_apply_no_more() -> None:
    s = seq("a", [1])
    kept = kept_after_round(s, [5, 6])
    s.token_ids += [5, 6]  # a verify kept both: nothing is left after them
    assert kept.drafts_now(s, 2) == [] and not kept.drafted


def test_a_read_round_keeps_live_sequences_and_reports_the_evicted() -> None:
    sent = [ProposeRequest("a", 0, [1, 2], 2), ProposeRequest("b", 3, [4], 2), ProposeRequest("c", 0, [7], 1)]
    kept = OverlapDrafts(sent=sent)
    assert kept.absorb([[8, 9], None, [3]], live={"a", "b"}) == ["b"]
    assert kept.drafted == {"a": (2, [8, 9])} and kept.sent == []
    kept.forget(live=set())
    assert not kept.drafted


def test_a_round_waits_only_where_an_answer_may_have_been_drafted_ahead() -> None:
    kept = OverlapDrafts()
    assert kept.wait_s(["a"], 1) == 0.0  # a first round: nothing was drafted ahead for it
    kept.may_hit["a"] = True  # its last verify kept every draft
    assert HIT_WAIT_MIN_S <= kept.wait_s(["a"], 1) <= HIT_WAIT_MAX_S
    kept.fastest_reply_s = 1e-5
    assert kept.wait_s(["a"], 1) == pytest.approx(HIT_WAIT_MIN_S)
    assert kept.wait_s(["a"], OVERLAP_MAX_SEQS + 1) == float("inf")  # a batch waits for its drafts
