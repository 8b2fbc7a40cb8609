"""Overlap's bookkeeping (speculative/overlap.py), without a model: which kept drafts still apply after
the steps run since they were asked for, and how long a round waits for an answer drafted ahead."""

from __future__ import annotations

import pytest

from fuserve.sampling_params import SamplingParams
from fuserve.speculative.overlap import HIT_WAIT_MAX_S, HIT_WAIT_MIN_S, OVERLAP_MAX_SEQS, OverlapDrafts
from fuserve.speculative.proposer import ProposeRequest
from fuserve.workers.sequence import PLACEHOLDER, Sequence, SequenceStatus


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


class LateReply:
    """An overlapping proposer whose reply to a round comes at its `after`-th look (never if None)."""

    drafts_ahead = True

    def __init__(self, after: int | None) -> None:
        self.after, self.looks, self.pending = after, 0, False

    def submit(self, requests: list[ProposeRequest]) -> None:
        self.requests, self.looks, self.pending = requests, 0, True

    def collect(self, wait_s: float, spin: bool = False) -> list[list[int]] | None:
        self.looks += 1
        if self.after is None or self.looks < self.after:
            return None
        self.pending = False
        return [[7, 8, 9] for _ in self.requests]

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        raise AssertionError("an overlapping engine submits and collects")

    def release(self, seq_ids: list[str]) -> None:
        pass


@pytest.mark.parametrize("after", [None, 1, 5])
def test_the_step_behind_a_plain_step_takes_drafts_only_if_the_reply_beats_the_step(
    after: int | None,
) -> None:
    """propose_behind reads the pending round's reply only while the plain step in flight runs: a reply
    still out when the step ends leaves the round pending (the engine reads the step back first). Drafts
    it takes follow the draft's guess for the step's token (its first draft)."""
    from fuserve.configs import SpeculativeConfig
    from fuserve.speculative.speculation import Speculation

    proposer = LateReply(after)
    spec = Speculation(SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False), proposer)
    spec.overlap = True
    s = seq("a", [1, 2, 3])
    s.num_computed_tokens, s.status = 3, SequenceStatus.RUNNING
    spec._submit([(s, 3)])  # the round sent with the plain step now in flight
    s.token_ids.append(PLACEHOLDER)
    polls: list[int] = []

    def done() -> bool:  # the plain step ends at the third check
        polls.append(1)
        return len(polls) >= 3

    took = spec.propose_behind([s], done)
    assert took == (after is not None and after <= 3)
    if took:
        assert s.spec_token_ids == [8, 9] and spec.guesses_behind == {"a": 7}
    else:
        assert proposer.pending and s.spec_token_ids == [] and not spec.guesses_behind


def test_a_verify_planned_behind_a_plain_step_reads_that_step_s_token_on_the_device() -> None:
    """propose_behind's step in the scheduler and the plan: the drafts follow a placeholder, which the plan
    fills from the plain step's sample row; read back in order, the tokens land where they belong."""
    from fuserve.configs import SchedulerConfig
    from fuserve.workers.block_manager import BlockManager
    from fuserve.workers.scheduler import Scheduler
    from fuserve.workers.step_plan import build_step_plan

    bs = 4
    sched = Scheduler(SchedulerConfig(), BlockManager(num_blocks=16, block_size=bs))
    s = Sequence("a", list(range(10, 16)), SamplingParams(temperature=0.0), 0.0, max_tokens=20)
    sched.add(s)
    out = sched.schedule()  # the prompt, which yields 20
    sched.on_launched(out)
    sched.update_from_output(out, [20])
    plain = sched.schedule()
    sched.on_launched(plain)  # in flight: its token (position 7) is a placeholder
    s.spec_token_ids = [22, 23]  # the draft's drafts after its guess for that token
    verify = sched.schedule()
    [item] = verify.scheduled
    assert (item.start, item.num_known_tokens, item.num_rows) == (7, 1, 3)
    plan = build_step_plan(verify, bs)
    assert plan.input_ids == [PLACEHOLDER, 22, 23] and plan.positions == [7, 8, 9]
    assert (plan.fill_positions, plan.fill_rows) == ([0], [0])
    assert plan.draft_ids == [22, 23, -1]
    sched.on_launched(verify)
    sched.update_from_output(plain, [21])
    sched.update_from_output(verify, [[22, 40]])  # 22 kept, then the target's 40
    assert s.token_ids[6:] == [20, 21, 22, 40] and s.num_computed_tokens == 9
