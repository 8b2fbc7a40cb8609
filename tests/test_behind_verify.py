"""The plain step planned behind a verify step (workers/behind_verify.py): its row, found on the device from
the verify's tokens, against the plain-Python rule, and the host's check of the device's count. The engine
path (launched, read back in order, greedy output unchanged) is in test_draft_channel.py's overlap tests."""

from __future__ import annotations

import random

import pytest
import torch

from fuserve.sampling_params import SamplingParams
from fuserve.speculative.rejection import accepted_run
from fuserve.workers.behind_verify import BehindVerify, kept_drafts, select, select_ref
from fuserve.workers.block_manager import BlockManager
from fuserve.workers.cuda_graphs import StepInputs
from fuserve.workers.sampler import SampledBatch
from fuserve.workers.scheduler import ScheduledSeq
from fuserve.workers.sequence import PLACEHOLDER, Sequence
from fuserve.workers.step_plan import plan_behind_verify

BS = 4


def step_inputs(table: list[int]) -> StepInputs:
    """One row's inputs as a graph bucket of 2 holds them (row 1 padding), filled with junk."""
    return StepInputs(
        torch.full((2,), 99, dtype=torch.int64),
        torch.full((2,), 99, dtype=torch.int64),
        torch.full((2,), 99, dtype=torch.int64),
        torch.full((2,), 99, dtype=torch.int32),
        torch.tensor([table, table], dtype=torch.int32),
    )


@pytest.mark.parametrize("seed", range(6))
def test_the_row_follows_the_drafts_kept_as_the_host_keeps_them(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        k = rng.randint(0, 4)
        drafts = [rng.randint(0, 9) for _ in range(k)]
        kept_now = rng.randint(0, k)
        # the verify's row tokens: the drafts up to a rejection, then anything
        rows = drafts[:kept_now] + [rng.randint(0, 9) for _ in range(k + 1 - kept_now)]
        first_row = rng.randint(0, 2)
        prev = torch.tensor([7] * first_row + rows + [8], dtype=torch.int64)
        position = rng.randint(1, 20)
        table = rng.sample(range(50), (position + k) // BS + 1)
        inputs = step_inputs(table)
        kept = select(inputs, prev, BehindVerify(first_row, drafts, position), BS)
        token, pos, slot, ctx = select_ref(rows, drafts, position, table, BS)
        assert int(kept) == len(accepted_run(rows, drafts)) - 1  # the host's rule
        assert (int(inputs.input_ids[0]), int(inputs.positions[0])) == (token, pos)
        assert (int(inputs.slot_mapping[0]), int(inputs.context_lens[0])) == (slot, ctx)
        assert int(inputs.input_ids[1]) == 99 and int(inputs.context_lens[1]) == 99  # padding untouched


def test_a_count_the_host_drew_already_is_used_as_it_is() -> None:
    """Synthetic acceptance (a benchmark) draws the count before the read-back: the row follows it even
    where the tokens say otherwise."""
    prev = torch.tensor([5, 6, 7, 8], dtype=torch.int64)
    inputs = step_inputs([3, 4, 5])
    kept = select(inputs, prev, BehindVerify(0, [1, 2, 3], 6, kept=2), BS)
    assert int(kept) == 2 and int(inputs.input_ids[0]) == 7 and int(inputs.positions[0]) == 8
    assert int(inputs.slot_mapping[0]) == 5 * BS + 0 and int(inputs.context_lens[0]) == 9
    assert int(kept_drafts(prev, torch.empty(0, dtype=torch.int64))) == 0


def test_the_plan_places_its_row_as_far_as_every_draft_kept() -> None:
    """Its slot's block is in the table before the verify is read back; the device then moves the row."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    seq = Sequence("a", list(range(10)), SamplingParams(temperature=0.0), 0.0, max_tokens=20)
    bm.allocate(seq)
    seq.num_computed_tokens = 9
    seq.token_ids.append(PLACEHOLDER)  # the verify in flight
    item = ScheduledSeq(seq, 4, start=9, spec_token_ids=[1, 2, 3])
    bm.append_slots(seq, item.start + 2 + 3)
    plan = plan_behind_verify(item, BS)
    assert plan.input_ids == [PLACEHOLDER] and plan.positions == [13] and plan.context_lens == [14]
    assert plan.slot_mapping == [seq.block_table[3] * BS + 1] and plan.argmax_only
    assert plan.behind_verify == BehindVerify(seq.pending_row, [1, 2, 3], 10, -1)


def test_a_count_that_is_not_the_host_s_fails_loudly() -> None:
    batch = SampledBatch(torch.tensor([3]), kept=torch.tensor([2]))
    batch.check_kept()  # the host's count not known yet: nothing to check
    batch.kept_expected = 2
    batch.check_kept()
    batch.kept_expected = 1
    with pytest.raises(RuntimeError, match="a bug in fuserve"):
        batch.check_kept()
