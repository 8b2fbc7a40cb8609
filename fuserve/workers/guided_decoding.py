"""The engine's grammar state: one llguidance matcher per guided sequence, and each step's bitmask.

    add(seq)          its grammar goes to the compiler; the sequence waits (the scheduler skips it)
    poll()            compiled grammars release their sequences; failed ones are returned
    advance(seq)      the matcher consumes the sequence's newly read-back tokens
    bitmask(rows)     [R, ⌈V/32⌉] int32, one row per logit row: a speculating sequence has one per draft
                      and one after them (all ones when unconstrained)
    valid_drafts(seq, drafts)   how many drafts the grammar accepts in a row (the rest are cut)

Where the bitmask is filled (fuserve/workers/engine.py): a step whose sampling rows include a guided
sequence is launched as its forward alone; while the device runs it, the engine reads back the previous
step's tokens, advances the matchers with them and fills the bitmask here, on the CPU; then the mask
kernel and the sampler are queued behind the forward. With async scheduling the bitmask's CPU work
therefore overlaps the forward instead of adding to the step; without it (CPU runs) it runs in line.
Rows are filled one after another on the engine's thread (llguidance's matchers drop the GIL): 0.1 ms
at 16 rows and 0.3 ms at 64 on the dev box (benchmarks/NOTES.md, "Guided decoding").
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures import Future
from dataclasses import dataclass

import llguidance
import torch

from fuserve.workers.grammar_compiler import GrammarCompiler
from fuserve.workers.sequence import Sequence


@dataclass(eq=False)
class _Guided:
    seq: Sequence
    template: Future
    matcher: llguidance.LLMatcher | None = None
    num_consumed: int = 0  # output tokens the matcher has consumed


class GuidedDecoding:
    def __init__(self, compiler: GrammarCompiler, pin_memory: bool) -> None:
        self.compiler = compiler
        self.num_words = (compiler.vocab_size + 31) // 32
        self.pin_memory = pin_memory
        self._by_seq: dict[str, _Guided] = {}
        self._pending: list[_Guided] = []
        self._buffer = torch.empty(0, self.num_words, dtype=torch.int32)

    @property
    def active(self) -> bool:
        return bool(self._by_seq)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def is_guided(self, seq: Sequence) -> bool:
        return seq.seq_id in self._by_seq

    def add(self, seq: Sequence) -> None:
        assert seq.params.grammar is not None
        g = _Guided(seq, self.compiler.submit(seq.params.grammar))
        self._by_seq[seq.seq_id] = g
        self._pending.append(g)
        seq.waiting_for_grammar = True

    def poll(self) -> list[tuple[Sequence, str]]:
        """Sequences whose grammar finished compiling may be scheduled now; those whose grammar failed
        are returned with the reason (the engine ends them)."""
        failed: list[tuple[Sequence, str]] = []
        still: list[_Guided] = []
        for g in self._pending:
            if not g.template.done():
                still.append(g)
                continue
            try:
                g.matcher = g.template.result().deep_copy()
            except Exception as err:
                failed.append((g.seq, str(err)))
                self._by_seq.pop(g.seq.seq_id, None)
            g.seq.waiting_for_grammar = False
        self._pending = still
        return failed

    def wait(self, timeout_s: float) -> None:
        """Block until a pending grammar compiles or the time passes (an engine with nothing else to do)."""
        if self._pending:
            concurrent.futures.wait(
                [g.template for g in self._pending], timeout_s, concurrent.futures.FIRST_COMPLETED
            )

    def advance(self, seq: Sequence) -> bool:
        """Consume the sequence's read-back tokens not yet consumed. False when the grammar rejects
        one (it can only when every token of a row was forbidden: an unsatisfiable grammar)."""
        g = self._by_seq.get(seq.seq_id)
        if g is None or g.matcher is None:
            return True
        new = seq.token_ids[seq.num_prompt_tokens + g.num_consumed : seq.settled_end()]
        g.num_consumed += len(new)
        return not new or g.matcher.consume_tokens(new)

    def is_done(self, seq: Sequence) -> bool:
        """The grammar is complete: it accepts no token but EOS."""
        g = self._by_seq.get(seq.seq_id)
        return g is not None and g.matcher is not None and g.matcher.is_stopped()

    def valid_drafts(self, seq: Sequence, drafts: list[int]) -> int:
        """How many of a sequence's drafts, in order, its grammar accepts: drafts after the first it
        rejects could never be kept, so speculation cuts them before the verify step."""
        g = self._by_seq.get(seq.seq_id)
        if g is None or g.matcher is None or not drafts:
            return len(drafts)
        return g.matcher.validate_tokens(drafts)

    def until_complete(self, seq: Sequence, kept: list[int]) -> list[int]:
        """The part of a verify step's kept run up to the token that completes the grammar. Decoding
        one token a step ends a guided sequence there (no step is spent on the EOS); a kept run can
        reach past it (the EOS sampled after the last draft), and those tokens are dropped so that
        speculation gives the same tokens. A token the grammar rejects stays: advance() ends on it."""
        g = self._by_seq.get(seq.seq_id)
        if g is None or g.matcher is None or len(kept) < 2:
            return kept
        m, n = g.matcher, 0
        for token in kept:
            if m.is_stopped():
                break
            if not m.try_consume_tokens([token]):
                n += 1  # the rejected token: kept for advance() to end on
                m.rollback(n - 1)
                return kept[:n]
            n += 1
        m.rollback(n)
        return kept[:n]

    def bitmask(self, rows_of: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        """The logit rows of a step, in order: per sampling sequence and its drafts (valid ones, see
        valid_drafts), a row after each prefix of the drafts: the grammar's allowed tokens there, or all.
        The matcher consumes the drafts for their rows and rolls them back: it advances only by the
        tokens the step keeps."""
        rows = sum(1 + len(drafts) for _, drafts in rows_of)
        if self._buffer.shape[0] < rows:
            # reused across steps: the previous step's copy to the device finished before its tokens were read
            size = max(rows, 2 * self._buffer.shape[0])
            self._buffer = torch.empty(size, self.num_words, dtype=torch.int32, pin_memory=self.pin_memory)
        out = self._buffer[:rows]
        # numpy's fill runs on this thread; torch's fill_ of >= 32k words wakes its intra-op pool, whose
        # threads spin after the fill and took the CPU from the rows' fill below: 4-16 ms a step in
        # scheduler ticks (4 ms) at 16-64 rows, against 0.1-0.3 ms with one thread
        out.numpy().fill(-1)
        row_bytes = self.num_words * 4
        row = 0
        for seq, drafts in rows_of:
            g = self._by_seq.get(seq.seq_id)
            if g is not None and g.matcher is not None and not seq.is_finished:
                m = g.matcher
                m.unsafe_compute_mask_ptr(out.data_ptr() + row * row_bytes, row_bytes)
                for j, token in enumerate(drafts, start=1):
                    if not m.consume_tokens([token]):
                        raise RuntimeError(
                            f"{seq.seq_id}: its grammar rejected a draft valid_drafts let through"
                        )
                    m.unsafe_compute_mask_ptr(out.data_ptr() + (row + j) * row_bytes, row_bytes)
                if drafts:
                    m.rollback(len(drafts))
            row += 1 + len(drafts)
        return out

    def remove(self, seq: Sequence) -> None:
        g = self._by_seq.pop(seq.seq_id, None)
        if g is not None and g in self._pending:
            self._pending.remove(g)
            seq.waiting_for_grammar = False
