"""Runs one step plan through the model: plan lists -> device tensors -> forward -> logits -> tokens.

Every tensor-parallel rank runs `forward_plan` on the same plan; only rank 0 samples (`launch`), the
others `follow`. With async scheduling under tensor parallelism (`share_tokens`) every rank needs each
step's tokens on the device, so it fills the next plan's placeholders itself and no rank waits on the
host for them: for an argmax-only plan the ranks find them together (vocab_parallel_argmax.py) and all
hold them; otherwise rank 0 samples from the gathered logits and broadcasts its draws. Decode steps (one
new token per sequence) replay a CUDA graph captured for the batch-size bucket when graphs are on, and
so do verify steps, as one decode row per token (StepPlan.as_decode_rows); steps with prompt tokens
replay a graph captured for their token bucket (MixedGraphs); what fits neither runs eagerly.
When the model keeps features (a feature-reading draft speculates), rank 0's batches carry every row's
feature (`SampledBatch.features`, bf16), and a step in which no row samples still returns a batch for them.
"""

from __future__ import annotations

import torch

from fuserve.parallel.tp_context import TPContext
from fuserve.workers.cuda_graphs import DecodeGraphs, MixedGraphs, StepGraphs, table_width
from fuserve.workers.kernels.token_bitmask import apply_token_bitmask_
from fuserve.workers.models.llama import AttentionMetadata, LlamaForCausalLM
from fuserve.workers.sampler import SampledBatch, Sampler
from fuserve.workers.step_plan import StepPlan

# A verify step of more rows runs on the varlen path (a mixed-step graph where it fits, else eagerly): as
# decode rows, each row reads its sequence's whole context, and on an H100 (Llama-3-8B shape, 2026-11-26)
# the decode graphs' verify lost to the eager varlen one from 96 rows (batch 32, k = 2: 0.91x against
# 1.02x of plain decoding; batch 64, k = 4: 1.02x against 1.33x) while winning up to 40 (batch 8, k = 4:
# 2.32x against 1.33x; batch 1: 2.17x against 0.89x).
VERIFY_GRAPH_MAX_ROWS = 64


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        device: torch.device,
        block_size: int,
        graphs: DecodeGraphs | None = None,
        mixed_graphs: MixedGraphs | None = None,
        tp: TPContext | None = None,
        share_tokens: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sampler = Sampler()
        self.graphs = graphs
        self.mixed_graphs = mixed_graphs
        self.tp = tp or TPContext()
        self.share_tokens = share_tokens and self.tp.size > 1
        self._followed_tokens: torch.Tensor | None = None  # a rank > 0's copy of the last step's draws
        self._started: torch.cuda.Event | None = None  # the last forward's start on the device
        self._features: torch.Tensor | None = None  # launch_logits' step's features, for `sample`
        # the last forward's logits and argmax tokens where its decode graph ran the head
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tensor(self, data: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(
            self.device, non_blocking=True
        )

    def fill_inputs(self, input_ids: torch.Tensor, plan: StepPlan, prev: torch.Tensor | None) -> None:
        """Put the tokens the previous step sampled (still on the device) into their input slots."""
        positions, rows = plan.fill_positions, plan.fill_rows
        if positions:
            if prev is None:
                raise RuntimeError("step plan waits on sampled tokens but no previous step is in flight")
            p, r, n = positions[0], rows[0], len(positions)
            if _is_run(positions) and _is_run(rows) and r + n <= len(prev):  # one copy, no index tensors
                input_ids[p : p + n].copy_(prev[r : r + n])
            else:
                input_ids[self._tensor(positions)] = prev[self._tensor(rows)]

    def prepare(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        width = table_width(plan)
        tables = [t + [0] * (width - len(t)) for t in plan.block_tables]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(plan.slot_mapping),
            block_tables=self._tensor(tables, torch.int32).view(len(tables), width),
            query_start_loc=self._tensor(plan.query_start_loc, torch.int32),
            context_lens=self._tensor(plan.context_lens, torch.int32),
            max_query_len=plan.max_query_len,
            max_context_len=max(plan.context_lens, default=0),
        )
        positions = self._tensor(plan.positions)
        if plan.has_alternatives:
            meta.query_positions = positions
        if plan.own_last_keys:
            meta.last_key_slots = meta.slot_mapping
        return self._tensor(plan.input_ids), positions, meta

    def _graphed(self, plan: StepPlan) -> tuple[StepGraphs, StepPlan, int] | None:
        """The graphs that replay this step, the plan they take and its bucket; None: it runs eagerly.
        A decode step (or a small verify step, as decode rows) replays a decode graph, any other step
        with more than one token in a sequence a mixed one. A step with alternatives (rows whose position
        is not their slot's) replays only decode graphs that read each row's last key at its own slot."""
        alternatives = plan.has_alternatives
        if alternatives and not (self.graphs is not None and self.graphs.own_last_keys):
            return None
        several = plan.max_query_len > 1
        if self.graphs is not None:
            rows: StepPlan | None = plan
            if several:
                rows = plan.as_decode_rows() if plan.num_tokens <= VERIFY_GRAPH_MAX_ROWS else None
            bucket = self.graphs.bucket(rows) if rows is not None else None
            if rows is not None and bucket is not None:
                return self.graphs, rows, bucket
        if several and self.mixed_graphs is not None and not alternatives:  # causal by slot
            bucket = self.mixed_graphs.bucket(plan)
            if bucket is not None:
                return self.mixed_graphs, plan, bucket
        return None

    @torch.inference_mode()
    def forward_plan(self, plan: StepPlan, prev: torch.Tensor | None = None) -> torch.Tensor | None:
        """Hidden states of the rows that sample: [S, hidden] (a speculating sequence has a row per draft
        too: [plan.num_logit_rows, hidden]), or None when none samples.
        prev: the previous step's sampled tokens on the device, for plans with placeholders."""
        if self.device.type == "cuda":
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        if plan.kv_copies:
            slots = self._tensor(plan.kv_copies).view(-1, 2)
            self.model.copy_kv_slots(slots[:, 0], slots[:, 1])
        chosen = self._graphed(plan)
        self._head = None
        if chosen is not None:
            graphs, graphed, bucket = chosen
            hidden = graphs.run(graphed, bucket, lambda ids: self.fill_inputs(ids, plan, prev))
            if graphs is self.graphs and plan.num_logit_rows == plan.num_tokens:
                self._head = self.graphs.head_outputs(bucket, graphed.num_tokens)
        else:
            input_ids, positions, meta = self.prepare(plan)
            self.fill_inputs(input_ids, plan, prev)
            hidden = self.model(input_ids, positions, meta)
        if not plan.sample_rows:
            return None
        if plan.num_logit_rows == plan.num_tokens:  # pure decode (or verify): every token gives logits
            return hidden
        return hidden[self._tensor(plan.logit_token_indices())]

    def _step_features(self, plan: StepPlan) -> torch.Tensor | None:
        """The last forward's features in bf16 (a copy: a graph's buffer is overwritten by the next
        replay), or None when the model keeps none. A graph pads the step: its first rows are the plan's."""
        if not self.model.keep_features or self.model.features is None:
            return None
        return self.model.features[: plan.num_tokens].to(torch.bfloat16)

    @torch.inference_mode()
    def launch(self, plan: StepPlan, prev: SampledBatch | None = None) -> SampledBatch | None:
        """Queue the whole step on the device and return its draws without waiting for them."""
        hidden = self.forward_plan(plan, prev.device_tokens if prev is not None else None)
        features = self._step_features(plan)
        if hidden is None and features is None:
            return None
        head, self._head = self._head, None
        if hidden is None or plan.argmax_only:
            if head is not None:
                tokens = head[1]
            elif hidden is not None:
                tokens = self.model.greedy_tokens(hidden)  # every rank now holds these tokens
            else:
                tokens = torch.empty(0, dtype=torch.int64, device=self.device)  # only prompt chunks ran
            batch = SampledBatch(tokens, features=features)
            batch.started = self._started
            batch.start_copy()
            return batch
        self._features = features
        return self.sample(plan, head[0] if head is not None else self.model.compute_logits(hidden))

    @torch.inference_mode()
    def launch_logits(self, plan: StepPlan, prev: SampledBatch | None = None) -> torch.Tensor | None:
        """The first half of `launch` for a step whose sampling waits on grammar masks: queue the forward
        and the logits, [S, V]; `sample` follows once the masks are known."""
        hidden = self.forward_plan(plan, prev.device_tokens if prev is not None else None)
        self._features = self._step_features(plan)
        head, self._head = self._head, None
        if hidden is None:
            return None
        return head[0] if head is not None else self.model.compute_logits(hidden)

    @torch.inference_mode()
    def sample(
        self, plan: StepPlan, logits: torch.Tensor, bitmask: torch.Tensor | None = None
    ) -> SampledBatch:
        """Queue the sampling of a step's logits; `bitmask` ([S, W] int32, on the host) forbids tokens."""
        if bitmask is not None:
            apply_token_bitmask_(logits, bitmask.to(self.device, non_blocking=True))
        batch = self.sampler.sample(logits, plan.sample_requests, plan.draft_ids or None)
        if self.share_tokens:
            self.tp.broadcast_from_rank0(batch.device_tokens)
        batch.features, self._features = self._features, None
        batch.started = self._started
        batch.start_copy()
        return batch

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """A tensor-parallel rank > 0's share of `launch`: the same forward and logits collective (so its
        collectives pair with rank 0's), no sampling; with `share_tokens`, it keeps the step's tokens for
        the next plan's placeholders: its own share of the argmax, or rank 0's draws."""
        hidden = self.forward_plan(plan, self._followed_tokens)
        self._followed_tokens = None
        if hidden is None:
            return
        if plan.argmax_only:
            tokens = self.model.greedy_tokens(hidden)
            self._followed_tokens = tokens if self.share_tokens else None
            return
        self.model.compute_logits(hidden)
        if self.share_tokens:
            tokens = torch.empty(plan.num_logit_rows, dtype=torch.int64, device=self.device)
            self._followed_tokens = self.tp.broadcast_from_rank0(tokens)

    @torch.inference_mode()
    def profile(self, num_tokens: int, max_seqs: int, num_blocks: int) -> None:
        """One prefill at the full token budget, so peak activation memory is known before the KV
        cache is sized. Slots are -1: nothing is written; every sequence reads the same scratch blocks.
        A sequence never holds more positions than the rotary tables (max_model_len): with few sequences
        and a large token budget the budget cannot be filled, and positions past the tables were read
        out of bounds (an illegal memory access on an H100 with max_num_seqs 1 and 8,192 tokens)."""
        seqs = max(1, min(max_seqs, num_tokens))
        per = min(num_tokens // seqs, num_blocks * self.block_size, self.model.rope_cos.shape[0])
        plan = StepPlan(
            input_ids=[0] * (per * seqs),
            positions=list(range(per)) * seqs,
            slot_mapping=[-1] * (per * seqs),
            query_start_loc=[i * per for i in range(seqs + 1)],
            context_lens=[per] * seqs,
            block_tables=[list(range(num_blocks))] * seqs,
            sample_rows=list(range(seqs)),
        )
        hidden = self.forward_plan(plan)
        assert hidden is not None
        self.model.compute_logits(hidden)


def _is_run(values: list[int]) -> bool:
    """Whether the values are consecutive integers, ascending (a slice can stand for them)."""
    return values == list(range(values[0], values[0] + len(values)))
