"""The engine's copy of each sequence's target features, for a feature-reading draft.

    step done:   record(out, features, sampled)   row i of the step -> its sequence's position
                                                  (prompt chunks and decodes: every row; a verify
                                                  step: the last token and the drafts the target kept)
    next round:  rows(seq, begin, end)            f_begin .. f_{end-1}: what the draft reads

f_i is the target's last decoder layer output at position i, before the final norm, in bf16 (half of
fp32's bytes, as training stored them). A sequence's rows stay until it finishes: a preempted one is
recomputed from its prefix-cache hits, which compute no rows, so its earlier rows are what it still has.

A sequence whose prompt starts with prefix-cache hits computes no rows for them, and a draft reading
zeros there lost acceptance (CPU, shipped draft, 6 chat prompts: 1.93 accepted tokens a step without
prefix caching, 1.90 with a system prompt's hit, 1.83 for a repeated prompt). So the rows of each
published block are also kept by the block's hash, in a least-recently-used cache with a byte budget:
equal hashes mean equal token prefixes, so equal features (up to batch numerics), and a hash never
goes stale, so KV eviction need not be tracked. A sequence's rows before its first step (its hits) are
filled from it, block by block. Only rows the target computed are cached: a block with rows that read
zero (a miss) is not, and a verify step puts only the rows of the drafts it kept while a block is
published only once all its tokens are kept, so a cached block's rows are final. The engine tells the
store its block size when the speculation is attached. Without prefix caching nothing is published and
nothing is cached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from fuserve.speculative.alternatives import alternative_kept
from fuserve.workers.scheduler import SchedulerOutput
from fuserve.workers.sequence import Sequence

CACHE_BYTES = 256 << 20  # ~4,000 blocks of 16 rows for a 2,048-wide target


class FeatureRows:
    """One sequence's rows 0..len-1, [len, dim] bf16, in a buffer that doubles as it grows (a
    sequence gains a row or a few a step: a concatenation per step would copy all of them each time)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, 0, dtype=torch.bfloat16)
        self.length = 0
        self.holes: list[tuple[int, int]] = []  # ranges never put (read zero), in order, below length

    def put(self, start: int, rows: torch.Tensor) -> None:
        """Rows `start..start+len(rows)-1`; any rows held past them are dropped (they were for tokens
        no longer in the sequence, or are about to be recomputed), any gap before `start` reads zero."""
        end = start + rows.shape[0]
        if self.buffer.shape[1] != rows.shape[1] or end > self.buffer.shape[0]:
            grown = torch.zeros(max(end, 2 * self.buffer.shape[0], 16), rows.shape[1], dtype=torch.bfloat16)
            if self.buffer.shape[1] == rows.shape[1]:
                grown[: self.length] = self.buffer[: self.length]
            self.buffer = grown
        if start > self.length:
            self.buffer[self.length : start] = 0
            if self.holes and self.holes[-1][1] == self.length:
                self.holes[-1] = (self.holes[-1][0], start)
            else:
                self.holes.append((self.length, start))
        else:
            self._clip_holes(start)
        self.buffer[start:end] = rows
        self.length = end

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self._clip_holes(self.length)

    def _clip_holes(self, end: int) -> None:
        while self.holes and self.holes[-1][1] > end:
            begin, _ = self.holes.pop()
            if begin < end:
                self.holes.append((begin, end))
                break

    def computed(self, begin: int, end: int) -> bool:
        """Whether rows begin..end-1 are all held and none of them reads zero for want of a put."""
        if end > self.length:
            return False
        for hole_begin, hole_end in reversed(self.holes):
            if hole_end <= begin:
                return True
            if hole_begin < end:
                return False
        return True

    def get(self, begin: int, end: int) -> torch.Tensor:
        """Rows begin..end-1, a copy; rows never put read zero."""
        out = torch.zeros(max(end - begin, 0), self.buffer.shape[1], dtype=torch.bfloat16)
        have = min(end, self.length) - begin
        if have > 0:
            out[:have] = self.buffer[begin : begin + have]
        return out


@dataclass(eq=False)
class _Held:
    seq: Sequence
    rows: FeatureRows
    offered: int = 0  # blocks 0..offered-1 were offered to the cache: each step looks at new ones only


class FeatureStore:
    def __init__(self, cache_bytes: int = CACHE_BYTES, block_size: int = 0) -> None:
        """block_size: the KV cache's (the engine sets it); 0 caches nothing."""
        self._seqs: dict[str, _Held] = {}
        self.dim = 0  # the target's hidden size, once a step has told it
        self.block_size = block_size
        self.cache_bytes = cache_bytes
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # block hash -> its rows, LRU first
        self.cached_bytes = 0

    def record(
        self, out: SchedulerOutput, features: torch.Tensor, sampled: list[int | list[int] | None]
    ) -> None:
        """A completed step's rows (features: [T, dim], the step's tokens in plan order), once the
        scheduler has taken its tokens. A speculating sequence keeps as many rows as tokens it kept: its
        last token's and each accepted draft's (a kept alternative's own row at its position). Sequences
        that finished meanwhile are dropped."""
        self.drop_finished()
        self.dim = features.shape[1]
        at = 0
        for item, result in zip(out.scheduled, sampled, strict=True):
            n = item.num_new_tokens
            seq = item.seq
            if not seq.is_finished:
                kept = len(result) if item.spec_token_ids and isinstance(result, list) else n
                rows = features[at : at + kept]
                took = None
                if item.spec_alt_ids and isinstance(result, list):
                    took = alternative_kept(result, item.spec_token_ids, item.spec_alt_ids)
                if took is not None:  # the chain's rows to the alternative's position, then its row
                    alt_row = at + 1 + len(item.spec_token_ids) + took
                    rows = torch.cat([features[at : at + took + 1], features[alt_row : alt_row + 1]])
                held = self._seqs.get(seq.seq_id)
                if held is None:
                    held = self._seqs[seq.seq_id] = _Held(seq, FeatureRows())
                bs = self.block_size
                if bs and seq.block_hashes and item.start > held.rows.length:
                    self._fill(held, item.start, bs)
                held.rows.put(item.start, rows)
                if bs:
                    held.offered = min(held.offered, item.start // bs)
                    if len(seq.block_hashes) > held.offered:
                        self._offer(held, bs)
            at += n

    def _fill(self, held: _Held, start: int, bs: int) -> None:
        """Rows the sequence lacks before `start` (its prefix-cache hits), from the blocks cached."""
        hashes = held.seq.block_hashes
        for j in range(held.rows.length // bs, min(start // bs, len(hashes))):
            rows = self.blocks.get(hashes[j])
            if rows is not None:
                self.blocks.move_to_end(hashes[j])
                held.rows.put(j * bs, rows)

    def _offer(self, held: _Held, bs: int) -> None:
        """Caches the rows of the sequence's published blocks that it computed. A block is published
        once its tokens count as computed, which with async scheduling is before its step's rows come:
        such blocks are offered at a later step, once the rows are held."""
        hashes, rows = held.seq.block_hashes, held.rows
        last = min(len(hashes), rows.length // bs)
        for i in range(held.offered, last):
            if hashes[i] not in self.blocks and rows.computed(i * bs, (i + 1) * bs):
                block = rows.buffer[i * bs : (i + 1) * bs].clone()
                self.blocks[hashes[i]] = block
                self.cached_bytes += block.nbytes
        held.offered = max(held.offered, last)
        while self.cached_bytes > self.cache_bytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.cached_bytes -= block.nbytes

    def rows(self, seq: Sequence, begin: int, end: int) -> torch.Tensor:
        """f_begin .. f_{end-1} of the sequence, [end - begin, dim] bf16 (zeros where it has none)."""
        held = self._seqs.get(seq.seq_id)
        if held is None:
            return torch.zeros(max(end - begin, 0), self.dim, dtype=torch.bfloat16)
        return held.rows.get(begin, end)

    def drop_finished(self) -> None:
        done = [seq_id for seq_id, held in self._seqs.items() if held.seq.is_finished]
        for seq_id in done:
            del self._seqs[seq_id]

    def __len__(self) -> int:
        return len(self._seqs)
