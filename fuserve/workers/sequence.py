"""One sequence's state as the scheduler and block manager see it: tokens, progress, blocks.

Plain data with no torch: the scheduler, the block manager and their tests work on it alone.
A sequence is `prompt + output` tokens; `num_computed_tokens` of them have K/V in the cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from fuserve.sampling_params import SamplingParams

# Stands in the token list for a token the in-flight step is still sampling (async scheduling).
PLACEHOLDER = -1
_keys = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_FINISHED = SequenceStatus.FINISHED  # a module global: read per sequence several times a step


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    waiting_for_grammar: bool = False  # its grammar is compiling: the scheduler leaves it waiting
    pending_row: int = -1  # the in-flight step's sample row that fills the trailing placeholder
    # drafts proposed for the next step (speculative decoding): the step computes them after the last
    # token and the target keeps the ones it agrees with; set by the engine before each schedule()
    spec_token_ids: list[int] = field(default_factory=list)
    # the draft's second-best token beside each of the first drafts (speculative.second_best): the step
    # also computes each at its draft's position and keeps one where the target takes it instead
    spec_alt_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # an int naming the sequence in step plans (their block tables cross to other ranks as diffs)
    key: int = field(default_factory=lambda: next(_keys))
    queue_key: float = 0.0  # its place in the waiting queue, set when it joins (scheduler.py)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def settled_end(self) -> int:
        """Where the tokens read back end in `token_ids`: before an in-flight token's placeholder."""
        tokens = self.token_ids
        return len(tokens) - 1 if tokens and tokens[-1] == PLACEHOLDER else len(tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED

    def drop_placeholders(self) -> None:
        while self.token_ids and self.token_ids[-1] == PLACEHOLDER:
            self.token_ids.pop()

    @property
    def remaining_work(self) -> int:
        """Tokens this sequence still costs: uncomputed tokens plus tokens left to generate."""
        n = len(self.token_ids)  # read a few times a step for every sequence: no nested properties
        return max(n - self.num_computed_tokens - 1, 0) + self.max_tokens - n + len(self.prompt_token_ids)
