"""CUDA graphs of whole steps: decode steps by batch-size bucket, mixed steps by token bucket.

A step launches a few hundred small kernels; replaying a captured graph removes the CPU launch cost
between them. Inputs live in static buffers sized for the largest bucket; a step pads to the next
bucket (padding tokens write no cache slot and belong to no sequence, padding sequences hold no
token) and copies its own output rows out. Steps larger than the largest bucket run eagerly.

Decode graphs (`DecodeGraphs`, one new token per sequence) run the decode attention kernel and, on one
device, the model's head and each row's argmax as well. Bucket
sizes (`graph_buckets`): powers of two up to 256, then every 64 up to the largest batch, which is
always a bucket itself. Past 256 a decode step is no longer bound by reading weights alone (batch 512
of an 8B model is ~8 TFLOP, ~12 ms on an H100 against ~5 ms of weights), so padding 300 rows to 512
would cost ~40 % of the step; padded to 320 it costs ~6 %.

Mixed graphs (`MixedGraphs`) serve every other step that fits a token bucket: prompt chunks beside
decodes, whole prompts, verify steps beside prompt chunks. They run the varlen prefill attention
kernel through a tile map (paged_prefill_attention.py), whose size bounds any step of T tokens in at
most min(T, max_num_seqs) sequences, so one graph per token bucket serves them all. Their buckets
(`token_buckets`) step by 64 from 128 to 384 tokens, where the GEMMs start to cost compute and padding
is paid in FLOPs, then by 128: on an H100 (Llama-3-8B shape, 2026-11-26) a 448-token step took 16.3 ms
against 13.3 ms for 512 tokens (cuBLAS's tiles at M = 448), so 448 is no bucket.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable

import numpy as np
import torch

from fuserve.workers.kernels.argmax import greedy_tokens
from fuserve.workers.kernels.paged_prefill_attention import query_block, query_tiles, tile_map_size
from fuserve.workers.models.llama import AttentionMetadata, LlamaForCausalLM
from fuserve.workers.pinned_staging import PinnedStaging
from fuserve.workers.step_plan import StepPlan

POWER_OF_TWO_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LARGE_BUCKET_STEP = 64
SMALLEST_TOKEN_BUCKET = 16
FINE_TOKEN_BUCKETS_FROM = 128
COARSE_TOKEN_BUCKETS_FROM = 384
COARSE_TOKEN_BUCKET_STEP = 128


def graph_buckets(max_batch: int) -> list[int]:
    """The batch sizes captured for a largest batch of `max_batch`: every batch up to it has a graph."""
    small = [b for b in POWER_OF_TWO_BUCKETS if b < max_batch]
    large = range(POWER_OF_TWO_BUCKETS[-1] + LARGE_BUCKET_STEP, max_batch, LARGE_BUCKET_STEP)
    return [*small, *large, max_batch]


def token_buckets(max_tokens: int) -> list[int]:
    """The token counts captured for mixed steps of up to `max_tokens` tokens: powers of two from 16 to
    128, every 64 to 384, every 128 beyond, then `max_tokens` itself."""
    small = [t for t in POWER_OF_TWO_BUCKETS if SMALLEST_TOKEN_BUCKET <= t <= FINE_TOKEN_BUCKETS_FROM]
    fine = range(FINE_TOKEN_BUCKETS_FROM, COARSE_TOKEN_BUCKETS_FROM + 1, LARGE_BUCKET_STEP)[1:]
    coarse = range(COARSE_TOKEN_BUCKETS_FROM, max_tokens, COARSE_TOKEN_BUCKET_STEP)[1:]
    return [t for t in (*small, *fine, *coarse) if t < max_tokens] + [max_tokens]


def table_width(plan: StepPlan) -> int:
    """Columns of the step's block tables: its longest table's (at least 1)."""
    return max(1, max((len(t) for t in plan.block_tables), default=1))


def pack_step(plan: StepPlan, tokens: int, seqs: int, width: int) -> tuple[array, array, array]:
    """A step's inputs padded to a bucket of `tokens` tokens and `seqs` sequences, as three flat C arrays,
    each copied to the device at once: int64 input ids, positions and slots; int32 context lengths; int32
    block tables at `width` columns. The tables are most of a long-context step's input (512 sequences of
    2k tokens: 70k entries): built as Python lists, padded and turned into a tensor they cost 4.5 ms a step
    on the CI box; written row by row into a zeroed array, 1.3."""
    pad, pad_seqs = tokens - plan.num_tokens, seqs - plan.num_seqs
    zeros = array("q", bytes(8 * pad))
    wide = array("q", plan.input_ids)
    for values in (zeros, plan.positions, zeros, plan.slot_mapping):
        wide.extend(values)
    wide.extend([-1] * pad)  # padding tokens write no KV slot
    lens = array("i", plan.context_lens)
    lens.extend(array("i", bytes(4 * pad_seqs)))
    tables = array("i", bytes(4 * seqs * width))  # zeros: the tables' padding and the empty slots
    for i, table in enumerate(plan.block_tables):
        tables[i * width : i * width + len(table)] = array("i", table)
    return wide, lens, tables


class StepGraphs:
    """Static input buffers, the capture of one graph per bucket, and the replay of a step.

    A bucket is a token count; each bucket also has a number of sequence slots (`seq_slots`). What a
    bucket's attention needs beyond the common buffers comes from the subclass (`_meta`, `_extra`)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        device: torch.device,
        max_blocks_per_seq: int,
        buckets: list[int],
        max_seqs: int,
    ) -> None:
        self.model = model
        self.device = device
        self.buckets = buckets
        self.max_seqs = max_seqs
        self.max_blocks = max_blocks_per_seq
        n, s = buckets[-1], self.seq_slots(buckets[-1])
        i32 = dict(dtype=torch.int32, device=device)
        # Each bucket's graph reads its inputs where one copy a step puts them: bucket b's input ids,
        # positions and slots are wide[0:b], [b:2b], [2b:3b]; its context lengths small[0:s_b], then what
        # its attention needs besides (`_extra`). The tables, sent at the step's width, go through
        # `_tables` into `block_tables` (a row's stride is fixed at capture), or straight in where the rows
        # are contiguous there (one row, or the full width).
        self._wide = torch.zeros(3 * n, dtype=torch.int64, device=device)
        self._small = torch.zeros(s + self._extra_size(n), **i32)
        self.block_tables = torch.zeros(s, max_blocks_per_seq, **i32)
        self._tables = torch.zeros(s * max_blocks_per_seq, **i32)
        self._staging: PinnedStaging | None = None
        if device.type == "cuda":
            self._staging = PinnedStaging(device, 3 * n, len(self._small), len(self._tables))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # the model's features buffer of each bucket, where it kept features at capture (keep_features)
        self.features: dict[int, torch.Tensor] = {}

    def seq_slots(self, tokens: int) -> int:
        return min(tokens, self.max_seqs)

    def _meta(self, tokens: int) -> AttentionMetadata:
        raise NotImplementedError

    def _extra_size(self, tokens: int) -> int:
        """Entries `_extra` returns for bucket `tokens`."""
        return 0

    def _extra(self, plan: StepPlan, tokens: int) -> list[int]:
        """More int32 inputs, sent after the context lengths (bucket `tokens` reads them there)."""
        return []

    def _clear_extra(self, tokens: int) -> None:
        """Before bucket `tokens` is captured: its extra inputs as an empty step's."""

    def _forward(
        self, tokens: int, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """What bucket `tokens`'s graph runs: the model's hidden states (and whatever a subclass adds)."""
        return self.model(ids, positions, meta)

    def input_ids(self, tokens: int) -> torch.Tensor:
        return self._wide[:tokens]

    def positions(self, tokens: int) -> torch.Tensor:
        return self._wide[tokens : 2 * tokens]

    def slot_mapping(self, tokens: int) -> torch.Tensor:
        return self._wide[2 * tokens : 3 * tokens]

    def context_lens(self, tokens: int) -> torch.Tensor:
        return self._small[: self.seq_slots(tokens)]

    @property
    def block_size(self) -> int:
        return int(self.model.model.layers[0].self_attn.k_cache.shape[1])

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """Capture every bucket, largest first so smaller graphs reuse its memory; returns the memory
        pool, which graphs captured after these (never replayed at the same time) may share."""
        for b in reversed(self.buckets):
            # the warm-up and the capture read no context and write no KV slot
            self._wide.zero_()
            self.slot_mapping(b).fill_(-1)
            self._small.zero_()
            self._clear_extra(b)
            meta = self._meta(b)
            ids, positions = self.input_ids(b), self.positions(b)
            for _ in range(2):  # warm-up: compile kernels, settle autotuning outside the capture
                self._forward(b, ids, positions, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b, ids, positions, meta)
            if self.model.keep_features:
                assert self.model.features is not None
                self.features[b] = self.model.features
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        return pool

    def release(self) -> None:
        """Free the graphs now. NCCL cannot abort or destroy a communicator while a live graph holds
        NCCL kernels of it (seen on two H200s: the abort waited out its timeout), so this comes first."""
        torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.features.clear()

    def bucket(self, plan: StepPlan) -> int | None:
        """The bucket that replays this plan, or None where it fits none."""
        if not self.graphs or plan.num_tokens > self.buckets[-1]:
            return None
        b = self.buckets[bisect.bisect_left(self.buckets, plan.num_tokens)]
        if plan.num_seqs > self.seq_slots(b):
            return None
        if max((len(t) for t in plan.block_tables), default=0) > self.max_blocks:
            return None
        return b

    def run(
        self, plan: StepPlan, b: int, patch_ids: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """Replay bucket `b` (what `bucket(plan)` gave) on this plan's inputs."""
        assert self._staging is not None
        n, s = plan.num_tokens, self.seq_slots(b)
        # Only the columns this step's longest table uses are sent: the attention kernels never read a
        # row past ceil(context_len / block_size), so older entries beyond may stay. (At batch 1024 with
        # 257 columns the full width was 263k ints a step, ~20 ms of host time; 128/128 needs 16.)
        width = table_width(plan)
        wide, small, tables = pack_step(plan, b, s, width)
        small.extend(self._extra(plan, b))
        slot = self._staging.take()
        nw, ns, nt = len(wide), len(small), len(tables)
        slot.wide_np[:nw] = np.frombuffer(wide, dtype=np.int64)
        slot.small_np[:ns] = np.frombuffer(small, dtype=np.int32)
        slot.tables_np[:nt] = np.frombuffer(tables, dtype=np.int32)
        self._wide[:nw].copy_(slot.wide[:nw], non_blocking=True)
        self._small[:ns].copy_(slot.small[:ns], non_blocking=True)
        if s == 1 or width == self.max_blocks:  # the rows are contiguous in the static table
            self.block_tables.view(-1)[:nt].copy_(slot.tables[:nt], non_blocking=True)
        else:
            self._tables[:nt].copy_(slot.tables[:nt], non_blocking=True)
            self.block_tables[:s, :width].copy_(self._tables[:nt].view(s, width))
        self._staging.copied(slot)
        if patch_ids is not None:
            patch_ids(self.input_ids(b)[:n])
        self.graphs[b].replay()
        if self.model.keep_features:
            self.model.features = self.features[b][:n]  # the model's reference, as an eager step leaves it
        return self.outputs[b][:n]

    @property
    def keeps_features(self) -> bool:
        """Whether these graphs were captured with the model keeping its features (they were, or none)."""
        return len(self.features) == len(self.graphs)


class DecodeGraphs(StepGraphs):
    """Decode steps: one token per sequence, so a bucket's tokens are its sequences."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        device: torch.device,
        max_blocks_per_seq: int,
        max_batch: int = 256,
        own_last_keys: bool = False,
        head: bool = False,
    ) -> None:
        """own_last_keys: each row's last key is read at the row's own slot (its slot_mapping entry),
        which serves verify steps with alternatives (StepPlan.as_decode_rows) and changes nothing else.
        head: the graphs also run the model's head and each row's argmax (`head_outputs`), one device's
        whole vocabulary (no tensor parallelism): launched after the replay they cost the host ~150-200
        us a step on an H200 host (benchmarks/NOTES.md, "Where batch 1's time goes")."""
        self.head = head
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        buckets = graph_buckets(max_batch)
        super().__init__(model, device, max_blocks_per_seq, buckets, buckets[-1])
        self._query_starts = torch.arange(buckets[-1] + 1, dtype=torch.int32, device=device)
        self.own_last_keys = own_last_keys

    def _forward(
        self, tokens: int, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.model(ids, positions, meta)
        if self.head:
            self.logits[tokens] = self.model.compute_logits(hidden)
            self.tokens[tokens] = greedy_tokens(self.logits[tokens])
        return hidden

    def head_outputs(self, tokens: int, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last replay of bucket `tokens`: its first `rows` rows' logits and argmax tokens (None
        without `head`)."""
        if not self.head:
            return None
        return self.logits[tokens][:rows], self.tokens[tokens][:rows]

    def release(self) -> None:
        super().release()
        self.logits.clear()
        self.tokens.clear()

    def _meta(self, tokens: int) -> AttentionMetadata:
        slots = self.slot_mapping(tokens)
        return AttentionMetadata(
            slot_mapping=slots,
            block_tables=self.block_tables[:tokens],
            query_start_loc=self._query_starts[: tokens + 1],
            context_lens=self.context_lens(tokens),
            max_query_len=1,
            max_context_len=self.max_blocks * self.block_size,
            last_key_slots=slots if self.own_last_keys else None,
        )


class MixedGraphs(StepGraphs):
    """Steps with more than one token in some sequence: the prefill attention kernel over a tile map."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        device: torch.device,
        max_blocks_per_seq: int,
        max_tokens: int,
        max_seqs: int,
    ) -> None:
        attn = model.model.layers[0].self_attn
        self.block_q = query_block(attn.num_heads, attn.num_kv_heads, device)
        super().__init__(model, device, max_blocks_per_seq, token_buckets(max_tokens), max_seqs)

    def tile_entries(self, tokens: int) -> int:
        return tile_map_size(tokens, self.seq_slots(tokens), self.block_q)

    def _extra_size(self, tokens: int) -> int:
        return self.seq_slots(tokens) + 1 + 2 * self.tile_entries(tokens)

    def query_start_loc(self, tokens: int) -> torch.Tensor:
        s = self.seq_slots(tokens)
        return self._small[s : 2 * s + 1]

    def tile_map(self, tokens: int) -> torch.Tensor:
        s, g = self.seq_slots(tokens), self.tile_entries(tokens)
        return self._small[2 * s + 1 : 2 * s + 1 + 2 * g].view(g, 2)

    def _clear_extra(self, tokens: int) -> None:
        self.tile_map(tokens).fill_(-1)  # no tile visited

    def _meta(self, tokens: int) -> AttentionMetadata:
        s = self.seq_slots(tokens)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping(tokens),
            block_tables=self.block_tables[:s],
            query_start_loc=self.query_start_loc(tokens),
            context_lens=self.context_lens(tokens),
            max_query_len=tokens,
            max_context_len=self.max_blocks * self.block_size,
            tile_map=self.tile_map(tokens),
        )

    def _extra(self, plan: StepPlan, tokens: int) -> list[int]:
        """The padded query offsets (empty slots start and end at the step's last token), then the
        tile map."""
        pad = self.seq_slots(tokens) - plan.num_seqs
        starts = plan.query_start_loc + [plan.num_tokens] * pad
        return starts + query_tiles(plan.query_start_loc, self.block_q, self.tile_entries(tokens))
