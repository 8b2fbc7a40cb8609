"""Block tables cross to the other tensor-parallel ranks as diffs: each rank keeps the tables of the last
plan, and a plan carries, per sequence, how much of its last table still holds and the blocks after it.

A decode step's plan is mostly block tables: at batch 64 and 1k-token contexts 64 x 64 words, re-sent
every step though a table changes by one block every 16 tokens, and encoded and decoded in Python on
both sides. As a diff a steady decode sequence costs one word. A row of the sent plan's `block_tables`
is [kept, *new blocks]: the receiver's table for that sequence (by `seq_keys`) is its last one cut to
`kept` plus the new blocks. Both ends forget a sequence that is not in a plan, so one that comes back
later (preempted, or passed over for a step) is sent whole. A plan without `seq_keys` (built by hand:
the start-up profile, tests) crosses whole and leaves both ends' state as it was.
"""

from __future__ import annotations

import dataclasses

from fuserve.workers.step_plan import StepPlan


def _has_keys(plan: StepPlan) -> bool:
    return bool(plan.seq_keys) and len(plan.seq_keys) == len(plan.block_tables)


class TableDiffSender:
    def __init__(self) -> None:
        self._held: dict[int, list[int]] = {}  # what the receivers hold, by sequence key

    def encode(self, plan: StepPlan) -> StepPlan:
        if not _has_keys(plan):
            return plan
        rows: list[list[int]] = []
        held: dict[int, list[int]] = {}
        for key, table in zip(plan.seq_keys, plan.block_tables, strict=True):
            known = self._held.get(key, [])
            kept = len(known) if table[: len(known)] == known else _common_prefix(known, table)
            rows.append([kept, *table[kept:]])
            held[key] = table
        self._held = held
        return dataclasses.replace(plan, block_tables=rows)


class TableDiffReceiver:
    def __init__(self) -> None:
        self._held: dict[int, list[int]] = {}

    def apply(self, plan: StepPlan) -> StepPlan:
        if not _has_keys(plan):
            return plan
        tables: list[list[int]] = []
        held: dict[int, list[int]] = {}
        for key, row in zip(plan.seq_keys, plan.block_tables, strict=True):
            table = self._held.get(key, [])[: row[0]] + row[1:]
            tables.append(table)
            held[key] = table
        self._held = held
        plan.block_tables = tables
        return plan


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
