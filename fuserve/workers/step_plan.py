"""A step plan: everything a model rank needs to run one step, as plain lists.

Built by rank 0 from the scheduler's output; it is also what rank 0 broadcasts to the other
tensor-parallel ranks, so it holds ids and indices only, never Python objects of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuserve.speculative.rejection import NO_DRAFT
from fuserve.workers.sampler import SampleRequest, argmax_only, has_penalty
from fuserve.workers.scheduler import SchedulerOutput
from fuserve.workers.sequence import PLACEHOLDER


@dataclass
class StepPlan:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # which sequences (by index) sample
    seq_keys: list[int] = field(default_factory=list)  # per sequence, Sequence.key (plan_diff.py)
    # Speculative decoding (empty when no sequence speculates): per sampling sequence, its number of
    # drafts, whose positions end its chunk; it takes logits at each draft and after the last one.
    num_drafts: list[int] = field(default_factory=list)
    # per sampling sequence (beside num_drafts), its alternatives (speculative/alternatives.py): they end
    # its chunk, after the drafts, each at its draft's position; each gives a logit row
    num_alternatives: list[int] = field(default_factory=list)
    # per logit row, the draft it verifies (speculative/rejection.py), NO_DRAFT for none; rank 0 only
    draft_ids: list[int] = field(default_factory=list)
    sample_requests: list[SampleRequest] = field(default_factory=list)  # per logit row; rank 0 only
    # Tokens the previous, still running step is sampling: input_ids[fill_positions[i]] comes from that
    # step's sample row fill_rows[i], on the device (async scheduling only).
    fill_positions: list[int] = field(default_factory=list)
    fill_rows: list[int] = field(default_factory=list)
    # every sampling row takes the plain argmax of its logits (sampler.argmax_only): the ranks find the
    # tokens together from their logits slices, and all of them hold the tokens afterwards
    argmax_only: bool = False
    # (source, destination) slots, flattened, whose K/V is copied before the forward (kept alternatives)
    kv_copies: list[int] = field(default_factory=list)
    # decode rows only (as_decode_rows of a step with alternatives): each row's last key is read at its
    # own slot_mapping entry, not through the block table; made by each rank from its plan, never sent
    own_last_keys: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_logit_rows(self) -> int:
        """Rows of the step's logits: one per sampling sequence, plus one per draft and alternative."""
        return len(self.sample_rows) + sum(self.num_drafts) + sum(self.num_alternatives)

    @property
    def has_alternatives(self) -> bool:
        """Some rows sit at a position other than their slot's: attention then reads `positions`."""
        return any(self.num_alternatives)

    def logit_token_indices(self) -> list[int]:
        """Which of the step's tokens give logits: each sampling sequence's last token, and its drafts
        (and alternatives) when it speculates."""
        q = self.query_start_loc
        if not self.num_drafts:
            return [q[b + 1] - 1 for b in self.sample_rows]
        alts = self.num_alternatives or [0] * len(self.num_drafts)
        return [
            i
            for b, k, m in zip(self.sample_rows, self.num_drafts, alts, strict=True)
            for i in range(q[b + 1] - 1 - k - m, q[b + 1])
        ]

    @property
    def max_query_len(self) -> int:
        q = self.query_start_loc
        return max((q[i + 1] - q[i] for i in range(len(q) - 1)), default=0)

    def as_decode_rows(self) -> StepPlan | None:
        """A verify step as a decode step of one row per token, or None where some token gives no
        logits (a prefill chunk shares the step). The step's KV is written for every token before
        attention runs, so row j of a sequence with q new tokens and context C attends to C - q + 1 + j
        tokens: causal among the drafts with nothing but per-row lengths. The decode CUDA graphs then
        serve verification (the eager varlen path cost 14 ms a step at batch 1 on an H100, against
        5.5 ms for a plain decode step)."""
        if not self.num_drafts or self.num_logit_rows != self.num_tokens:
            return None
        q = self.query_start_loc
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        for b, table in enumerate(self.block_tables):
            # a row sees the keys up to its position: its own the last (at its slot, where alternatives
            # sit after the chain: `own_last_keys`)
            context_lens.extend(p + 1 for p in self.positions[q[b] : q[b + 1]])
            block_tables.extend([table] * (q[b + 1] - q[b]))
        return StepPlan(
            input_ids=self.input_ids,
            positions=self.positions,
            slot_mapping=self.slot_mapping,
            query_start_loc=list(range(self.num_tokens + 1)),
            context_lens=context_lens,
            block_tables=block_tables,
            sample_rows=list(range(self.num_tokens)),
            fill_positions=self.fill_positions,
            fill_rows=self.fill_rows,
            own_last_keys=self.has_alternatives,
        )


def build_step_plan(out: SchedulerOutput, block_size: int) -> StepPlan:
    """Runs once a step over every scheduled sequence, so a decode (one token, no drafts: nearly every
    sequence of a large batch) takes a path without slices, ranges or generators: at 256-1,024
    sequences a step this loop was a tenth of the engine core's host time (benchmarks/NOTES.md)."""
    plan = StepPlan(kv_copies=out.kv_copies)
    speculating = any(item.spec_token_ids for item in out.scheduled)
    branching = any(item.spec_alt_ids for item in out.scheduled)
    input_ids, positions, slots = plan.input_ids, plan.positions, plan.slot_mapping
    query_start, total = plan.query_start_loc, 0
    for b, item in enumerate(out.scheduled):
        seq, start, n = item.seq, item.start, item.num_new_tokens
        drafts = item.spec_token_ids
        table = seq.block_table
        if n == 1 and not drafts:
            token = seq.token_ids[start]
            if token == PLACEHOLDER:
                plan.fill_positions.append(len(input_ids))
                plan.fill_rows.append(seq.pending_row)
            input_ids.append(token)
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            alts = item.spec_alt_ids
            tokens = seq.token_ids[start : start + item.num_known_tokens]
            if tokens[-1] == PLACEHOLDER:  # drafts may follow it (Speculation.propose_behind)
                plan.fill_positions.append(len(input_ids) + len(tokens) - 1)
                plan.fill_rows.append(seq.pending_row)
            if drafts:
                tokens += drafts + alts
            input_ids.extend(tokens)
            if alts:  # each alternative at its draft's position, after the chain's slots
                chain_end = start + n - len(alts)
                positions.extend(range(start, chain_end))
                positions.extend(range(chain_end - len(drafts), chain_end - len(drafts) + len(alts)))
            else:
                positions.extend(range(start, start + n))
            slots.extend(
                table[p // block_size] * block_size + p % block_size for p in range(start, start + n)
            )
        total += n
        query_start.append(total)
        plan.context_lens.append(start + n)
        plan.block_tables.append(list(table))
        plan.seq_keys.append(seq.key)
        if item.samples:
            plan.sample_rows.append(b)
            # the output so far only where a penalty reads it: copying every sequence's whole output
            # each step grew the host's step time with the generation's length
            num_out = len(seq.token_ids) - len(seq.prompt_token_ids)
            output = seq.output_token_ids if has_penalty(seq.params) else []
            # row j's token follows j drafts (a seeded draw keys on it); alternative i's follows i + 1
            for j in [*range(len(drafts) + 1), *range(1, len(item.spec_alt_ids) + 1)]:
                plan.sample_requests.append(
                    SampleRequest(seq.params, seq.prompt_token_ids, output, j, num_out)
                )
            if speculating:
                plan.num_drafts.append(len(drafts))
                plan.draft_ids.extend([*drafts, NO_DRAFT, *[NO_DRAFT] * len(item.spec_alt_ids)])
            if branching:
                plan.num_alternatives.append(len(item.spec_alt_ids))
    plan.argmax_only = bool(plan.sample_requests) and argmax_only(plan.sample_requests)
    return plan
