"""The paged KV cache's bookkeeping: which block holds which tokens, and who shares it.

Blocks live in one of three places:
  free list  -- hold nothing reusable;
  in use     -- ref_count > 0, listed in one or more sequences' block tables;
  evictable  -- ref_count == 0 but full of computed tokens whose hash is known, kept for prefix hits
                and reused least-recently-freed first when the free list runs dry.
A full block's hash covers its tokens and every token before it (a chain), so equal hashes mean
equal prefixes and the block can be shared by reference instead of recomputed.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from fuserve.workers.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))  # each token as 4 little-endian bytes
    return h.digest()


@dataclass
class BlockStats:
    num_blocks: int
    num_free: int
    num_evictable: int
    prefix_hit_tokens: int
    prefix_query_tokens: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of_block: list[bytes | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest hashed prefix; the last token is never a hit, so a step
        always computes at least one token and produces logits."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = b""
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            parent = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self.block_of_hash.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        reused_evictable = sum(1 for b in hits if self.ref_counts[b] == 0)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        return fresh <= self.num_free_blocks - reused_evictable

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        """Room for the sequence to hold `num_tokens` tokens in all."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    # ---- allocation -----------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self.free_ids:
            block = self.free_ids.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            old = self.hash_of_block[block]
            if old is not None and self.block_of_hash.get(old) == block:
                del self.block_of_hash[old]
            self.hash_of_block[block] = None
        else:
            raise RuntimeError("KV cache is out of blocks (the scheduler should have checked)")
        assert self.ref_counts[block] == 0, f"block {block} taken while in use"
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing cached prefix blocks."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        hits = self._prefix_hits(seq)
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.block_hashes = [self.hash_of_block[b] for b in hits]  # type: ignore[misc]
        for _ in range(self.blocks_needed(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free_block())
        cached = len(hits) * self.block_size
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        self.prefix_hit_tokens += cached
        self.prefix_query_tokens += seq.num_tokens

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table so the sequence can hold `num_tokens` tokens in all."""
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Shrink the block table to what `num_tokens` tokens need (speculative drafts the target
        rejected). Freed blocks hold no hashed tokens: only full blocks of computed tokens are hashed."""
        keep = self.blocks_needed(num_tokens)
        assert keep >= len(seq.block_hashes), "trimming a block published for prefix hits"
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            assert self.ref_counts[block] > 0, f"block {block} freed twice"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids.append(block)

    def commit_computed(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full of computed tokens, for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if self.hash_of_block[block] is None and h not in self.block_of_hash:
                self.hash_of_block[block] = h
                self.block_of_hash[h] = block

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; hashed blocks stay cached (evictable), others go free."""
        for block in reversed(seq.block_table):
            assert self.ref_counts[block] > 0, f"block {block} freed twice"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.hash_of_block[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_ids.append(block)
        seq.block_table = []
        seq.block_hashes = []

    def stats(self) -> BlockStats:
        return BlockStats(
            num_blocks=self.num_blocks,
            num_free=len(self.free_ids),
            num_evictable=len(self.evictable),
            prefix_hit_tokens=self.prefix_hit_tokens,
            prefix_query_tokens=self.prefix_query_tokens,
        )

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks
