"""CUDA graphs of the whole decode step, one per batch-size bucket.

A decode step launches a few hundred small kernels; replaying a captured graph removes the CPU
launch cost between them. Inputs live in static buffers sized for the largest bucket; a step with
B sequences pads to the next bucket (padding rows write no cache slot and attend to nothing) and
copies the first B output rows out. Steps larger than the largest bucket run eagerly.

Buckets (`graph_buckets`): powers of two up to 256, then every 64 up to the largest batch, which is
always a bucket itself. Past 256 a decode step is no longer bound by reading weights alone (batch 512
of an 8B model is ~8 TFLOP, ~12 ms on an H100 against ~5 ms of weights), so padding 300 rows to 512
would cost ~40 % of the step; padded to 320 it costs ~6 %.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from itertools import chain

import torch

from fuserve.workers.models.llama import AttentionMetadata, LlamaForCausalLM
from fuserve.workers.step_plan import StepPlan

POWER_OF_TWO_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LARGE_BUCKET_STEP = 64


def graph_buckets(max_batch: int) -> list[int]:
    """The batch sizes captured for a largest batch of `max_batch`: every batch up to it has a graph."""
    small = [b for b in POWER_OF_TWO_BUCKETS if b < max_batch]
    large = range(POWER_OF_TWO_BUCKETS[-1] + LARGE_BUCKET_STEP, max_batch, LARGE_BUCKET_STEP)
    return [*small, *large, max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        device: torch.device,
        max_blocks_per_seq: int,
        max_batch: int = 256,
    ) -> None:
        self.model = model
        self.device = device
        self.buckets = graph_buckets(max_batch)
        n = self.buckets[-1]
        self.max_blocks = max_blocks_per_seq
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **i32)
        self.context_lens = torch.zeros(n, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            context_lens=self.context_lens[:b],
            max_query_len=1,
            max_context_len=self.max_blocks * self.block_size_hint,
        )

    @property
    def block_size_hint(self) -> int:
        return int(self.model.model.layers[0].self_attn.k_cache.shape[1])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        pool = None
        for b in reversed(self.buckets):
            meta = self._meta(b)
            for _ in range(2):  # warm-up: compile kernels, settle autotuning outside the capture
                self.model(self.input_ids[:b], self.positions[:b], meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(self.input_ids[:b], self.positions[:b], meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Free the graphs now. NCCL cannot abort or destroy a communicator while a live graph holds
        NCCL kernels of it (seen on two H200s: the abort waited out its timeout), so this comes first."""
        torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def fits(self, plan: StepPlan) -> bool:
        return (
            bool(self.graphs)
            and plan.num_seqs <= self.buckets[-1]
            and max((len(t) for t in plan.block_tables), default=0) <= self.max_blocks
        )

    def run(self, plan: StepPlan, patch_ids: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        n = plan.num_seqs
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        # Only the columns this step's longest table uses are sent: the attention kernels never read a
        # row past ceil(context_len / block_size), so older entries beyond may stay. (At batch 1024 with
        # 257 columns the full width was 263k ints a step, ~20 ms of host time; 128/128 needs 16.)
        width = max(1, max((len(t) for t in plan.block_tables), default=1))
        tables = list(chain.from_iterable(t + [0] * (width - len(t)) for t in plan.block_tables))
        pad = b - n
        host = torch.tensor(
            plan.input_ids + [0] * pad + plan.positions + [0] * pad + plan.slot_mapping + [-1] * pad,
            dtype=torch.int64,
        ).pin_memory()
        host32 = torch.tensor(
            tables + [0] * (pad * width) + plan.context_lens + [0] * pad, dtype=torch.int32
        ).pin_memory()
        dev = host.to(self.device, non_blocking=True)
        dev32 = host32.to(self.device, non_blocking=True)
        self.input_ids[:b].copy_(dev[:b])
        if patch_ids is not None:
            patch_ids(self.input_ids[:n])
        self.positions[:b].copy_(dev[b : 2 * b])
        self.slot_mapping[:b].copy_(dev[2 * b :])
        self.block_tables[:b, :width].copy_(dev32[: b * width].view(b, width))
        self.context_lens[:b].copy_(dev32[b * width :])
        self.graphs[b].replay()
        return self.outputs[b][:n]
