"""The draft model's per-sequence state: its tokens, how many of them have KV, and their KV blocks.

Pure Python, no torch: the draft runner asks it where each round's tokens go and writes the KV there.

A round for one sequence says "keep `tokens[:start]`, then append `token_ids`" (rollback by
truncation). The tokens past `start` that the draft held were its own drafts of the last round; those
the target accepted come back at the head of `token_ids`, so their KV is kept instead of recomputed
(`apply` compares before truncating). The last token is always left uncomputed: the round needs its
logits to draft from.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class DraftSequence:
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens[:num_computed] have KV in the cache
    block_table: list[int] = field(default_factory=list)


class DraftSequences:
    """Every sequence the draft holds, in least-recently-used order, and the free KV blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.seqs: OrderedDict[str, DraftSequence] = OrderedDict()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def apply(self, seq_id: str, start: int, token_ids: list[int]) -> DraftSequence | None:
        """The sequence as `tokens[:start] + token_ids`, with the KV still valid for it kept.
        None when `start` asks for tokens this draft does not hold (it restarted, or evicted the
        sequence): its state is dropped, and the caller resends it from start 0."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            if start > 0:
                return None
            seq = self.seqs[seq_id] = DraftSequence()
        elif start > len(seq.tokens):
            self.release([seq_id])
            return None
        self.seqs.move_to_end(seq_id)
        held = seq.tokens
        same = 0
        limit = min(len(token_ids), len(held) - start)
        while same < limit and held[start + same] == token_ids[same]:
            same += 1
        del held[start + same :]
        held.extend(token_ids[same:])
        seq.num_computed = max(0, min(seq.num_computed, start + same, len(held) - 1))
        return seq

    def reserve(self, seq_id: str, num_tokens: int, protect: set[str]) -> bool:
        """Blocks for `num_tokens` tokens of the sequence, evicting the least recently used sequences
        outside `protect` when the pool runs dry; extra blocks it held beyond that go back. False when
        even that does not make room (the sequence is then dropped)."""
        seq = self.seqs[seq_id]
        need = self.blocks_needed(num_tokens)
        while len(seq.block_table) > need:
            self.free_blocks.append(seq.block_table.pop())
        missing = need - len(seq.block_table)
        while missing > len(self.free_blocks):
            victim = next((s for s in self.seqs if s not in protect and s != seq_id), None)
            if victim is None:
                self.release([seq_id])
                return False
            self.release([victim])
        for _ in range(missing):
            seq.block_table.append(self.free_blocks.popleft())
        return True

    def slot(self, seq: DraftSequence, position: int) -> int:
        bs = self.block_size
        return seq.block_table[position // bs] * bs + position % bs

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self.free_blocks.extend(seq.block_table)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)
