"""Block tables as diffs between step plans (parallel/plan_diff.py): whatever the tables do from plan to
plan (grow, restart after a preemption, leave and come back, plans without keys in between), each
receiver's tables equal the sender's, and a steady decode sequence costs one word."""

from __future__ import annotations

import random

from fuserve.parallel.plan_broadcast import decode_plan, encode_plan
from fuserve.parallel.plan_diff import TableDiffReceiver, TableDiffSender
from fuserve.workers.step_plan import StepPlan


def plan(tables: dict[int, list[int]]) -> StepPlan:
    keys = list(tables)
    return StepPlan(
        input_ids=[1] * len(keys),
        positions=[0] * len(keys),
        slot_mapping=[0] * len(keys),
        query_start_loc=list(range(len(keys) + 1)),
        context_lens=[16 * len(t) for t in tables.values()],
        block_tables=[list(t) for t in tables.values()],
        sample_rows=list(range(len(keys))),
        seq_keys=keys,
    )


def test_receivers_rebuild_every_table_through_growth_preemption_and_returns() -> None:
    rng = random.Random(0)
    sender, receiver = TableDiffSender(), TableDiffReceiver()
    live: dict[int, list[int]] = {}
    next_block = 0
    for step in range(400):
        for key in list(live):
            r = rng.random()
            if r < 0.05:
                del live[key]  # finished
            elif r < 0.08:
                live[key] = []  # preempted: its blocks are gone, it starts again
            elif r < 0.3:
                live[key].append(next_block)
                next_block += 1
        if rng.random() < 0.3:
            live[rng.randrange(10_000)] = [next_block]
            next_block += 1
        scheduled = {k: t for k, t in live.items() if rng.random() < 0.9 and t}  # some sit a step out
        want = plan(scheduled)
        if step % 50 == 7:
            want.seq_keys = []  # a plan built by hand: crosses whole, nobody's state moves
        got = receiver.apply(decode_plan(*encode_plan(sender.encode(want))))
        assert got.block_tables == want.block_tables, f"step {step}"


def test_a_steady_decode_sequence_costs_one_word() -> None:
    sender = TableDiffSender()
    tables = {k: list(range(k * 100, k * 100 + 64)) for k in range(64)}
    first = sender.encode(plan(tables))
    assert sum(len(row) for row in first.block_tables) == 64 * 65
    again = sender.encode(plan(tables))
    assert again.block_tables == [[64]] * 64
    tables[3].append(9999)
    grown = sender.encode(plan(tables))
    assert grown.block_tables[3] == [64, 9999] and grown.block_tables[4] == [64]
