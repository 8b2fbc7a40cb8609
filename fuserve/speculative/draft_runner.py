"""The draft model: fuserve's own model, paged KV cache and model runner, drafting greedily for a batch.

    propose(requests):  per sequence  apply start/token_ids (draft_sequences.py: truncate, keep the KV
                                      of accepted drafts)
                        prefill       the tokens without KV: a few a sequence as decode rows in one
                                      forward, more as chunks at the token budget; each sequence's last
                                      row gives its first draft
                        k - 1 decodes batched over the sequences still drafting; each step's inputs are
                                      the previous step's argmax, filled on the device, so the host
                                      waits once per round, not once per draft
    draft_ahead():      after a round, while the target verifies it (a draft server on a GPU of its
                        own): the next round of each sequence, assuming all its drafts kept and then
                        the draft's own next token; propose answers a round that matches from them
    release(ids):       their blocks go back

It runs the same kernels as the target (Triton on GPU, CUDA graphs for decode and chunk steps; torch
reference ops on CPU), on a KV pool sized from the draft's own share of its device. A draft whose folder
has a vocabulary file (subset_head.py) picks its drafts among those tokens only, from a head of that many
rows; one without drafts over the whole vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from fuserve.configs import CacheConfig, DraftPlacementConfig, FuserveConfig, KernelConfig, ModelConfig
from fuserve.parallel.tp_context import TPContext
from fuserve.speculative.draft_memory import draft_kv_blocks
from fuserve.speculative.draft_sequences import DraftSequence, DraftSequences
from fuserve.speculative.proposer import ProposeRequest
from fuserve.speculative.subset_head import SubsetHead, read_vocab_file
from fuserve.workers.cuda_graphs import DecodeGraphs, MixedGraphs
from fuserve.workers.kernels.switches import apply_config
from fuserve.workers.kv_cache import allocate_kv_cache, bytes_per_block
from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.models.llama import LlamaArch
from fuserve.workers.models.loader import build_model, quant_scheme, resolve_source
from fuserve.workers.sequence import PLACEHOLDER
from fuserve.workers.step_plan import StepPlan
from fuserve.workers.worker import pick_device, pick_dtype, pick_ops

log = logging.getLogger("fuserve")
# a sequence with at most this many tokens without KV catches up as decode rows (DraftRunner._prefill)
CATCH_UP_ROWS = 8


class DraftRunner:
    stoppable_ahead = True  # draft_ahead's `stop` ends it within about two forwards (the server's pause rule)

    def __init__(
        self,
        model: ModelConfig,
        placement: DraftPlacementConfig,
        cache: CacheConfig,
        kernels: KernelConfig,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        """`cache`: the target's (block size; its fixed num_blocks or CPU size apply to the draft too);
        the draft's GPU share is `placement.gpu_memory_utilization`."""
        self.device = pick_device(placement.device if placement.device != "auto" else model.device)
        self._start_bytes = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.dtype = pick_dtype(model.dtype, self.device)
        source = resolve_source(model)
        self.arch = LlamaArch.from_hf(source.hf_config)
        longest = self.arch.max_position_embeddings
        self.max_model_len = min(model.max_model_len or longest, longest)
        self.model = build_model(
            source,
            TPContext(),
            pick_ops(kernels.use_triton, self.device),
            self.dtype,
            self.device,
            self.max_model_len,
            model.seed,
            quant_scheme(source, model),
        )
        vocab = read_vocab_file(source.path) if source.path is not None and source.path.is_dir() else None
        head = self.model.lm_head
        self.head = SubsetHead(head.weight, vocab, head.linear) if vocab is not None else None
        self.block_size = cache.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.runner = ModelRunner(self.model, self.device, self.block_size)
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        num_blocks = cache.num_blocks or self._pool_size(cache, placement, num_kv_heads, max_num_seqs)
        kv = allocate_kv_cache(self.arch, num_kv_heads, num_blocks, self.block_size, self.dtype, self.device)
        self.model.bind_kv_cache(kv.k, kv.v)
        self.seqs = DraftSequences(num_blocks, self.block_size)
        self._last_round: list[tuple[str, int]] = []  # (sequence, k) of the last propose, for draft_ahead
        self._ahead: dict[str, tuple[int, int]] = {}  # sequence -> where its ahead drafts start, how many
        self.last_ahead_hits = 0  # sequences of the last propose answered from draft_ahead
        self.last_ahead_stopped = False  # the last draft_ahead ended early: a round came (its `stop`)
        self.num_ahead_hits = 0
        self.num_ahead_rounds = 0
        if self.device.type == "cuda" and kernels.cuda_graphs:
            max_blocks = -(-self.max_model_len // self.block_size)
            # Chunks (a prompt, or tokens piled up while adaptive k held a sequence at 0) replay mixed
            # graphs: eagerly the 1B shape's took ~6 ms a chunk on an H200 and rounds that caught up
            # 8 sequences cost 55 ms, which kept adaptive k from drafting at all (NOTES.md).
            pool, mixed = None, None
            max_tokens = min(kernels.cuda_graph_max_tokens, max_num_batched_tokens)
            if max_tokens > 1:
                mixed = MixedGraphs(self.model, self.device, max_blocks, max_tokens, max_num_seqs)
                pool = mixed.capture()
            graphs = DecodeGraphs(
                self.model,
                self.device,
                max_blocks_per_seq=max_blocks,
                # a round's first forward: two decode rows a sequence after the target kept every draft
                max_batch=2 * min(kernels.cuda_graph_max_batch, max_num_seqs),
            )
            graphs.capture(pool)
            self.runner.graphs, self.runner.mixed_graphs = graphs, mixed
        log.info("draft KV cache: %d blocks x %d tokens on %s", num_blocks, self.block_size, self.device)
        if self.head is not None:
            log.info("draft head over %d of %d tokens", len(self.head.token_ids), head.vocab_size)

    @classmethod
    def from_config(cls, config: FuserveConfig) -> DraftRunner:
        """The draft of a deployment's `speculative` block, with the target's cache, batch and kernels."""
        spec = config.speculative
        if spec.draft is None:
            raise ValueError("speculative.draft is not set: name the draft model")
        apply_config(config)  # the deployment's kernel switches, before any kernel runs
        return cls(
            spec.draft,
            spec.placement,
            config.cache,
            config.kernels,
            config.scheduler.max_num_seqs,
            config.scheduler.max_num_batched_tokens,
        )

    def _pool_size(
        self, cache: CacheConfig, placement: DraftPlacementConfig, num_kv_heads: int, max_num_seqs: int
    ) -> int:
        """CPU: the cache's CPU size. GPU: the draft's share of the device less its own weights and the
        peak of a prefill at the full token budget, within what the device has free (draft_memory.py)."""
        per_block = bytes_per_block(self.arch, num_kv_heads, self.block_size, self.dtype)
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gib * (1 << 30) // per_block))
        seqs = min(max_num_seqs, 256)
        blocks = -(-max(1, self.max_num_batched_tokens // seqs) // self.block_size)
        scratch = allocate_kv_cache(self.arch, num_kv_heads, blocks, self.block_size, self.dtype, self.device)
        self.model.bind_kv_cache(scratch.k, scratch.v)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.runner.profile(self.max_num_batched_tokens, seqs, blocks)
        torch.cuda.synchronize(self.device)
        del scratch
        return draft_kv_blocks(
            self.device,
            placement.gpu_memory_utilization,
            self._start_bytes,
            per_block,
            self.max_model_len,
            self.block_size,
        )

    @torch.inference_mode()
    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]:
        """Up to k greedy drafts per request; None for a sequence this draft does not hold at `start`
        (send it again from start 0). A sequence whose round matches what `draft_ahead` assumed is
        answered from the drafts made then, without a forward: at most as many as were made."""
        out: list[list[int] | None] = [[] for _ in requests]
        protect = {r.seq_id for r in requests}
        drafting: list[tuple[int, DraftSequence, int]] = []  # (request index, sequence, k)
        asked: dict[int, int] = {}  # request index -> its k, for the next draft_ahead's depth
        # each sequence's ahead drafts serve its next round only (another engine's stay for its own)
        ahead = {r.seq_id: self._ahead.pop(r.seq_id) for r in requests if r.seq_id in self._ahead}
        self.last_ahead_hits = 0
        for i, r in enumerate(requests):
            ready = self._ready_drafts(r, ahead.get(r.seq_id))
            if ready is not None:
                out[i], asked[i] = ready, r.k
                self.last_ahead_hits += 1
                continue
            seq = self.seqs.apply(r.seq_id, r.start, r.token_ids)
            if seq is None:
                out[i] = None
                continue
            k = min(r.k, self.max_model_len - len(seq.tokens))
            if k <= 0 or not seq.tokens:
                continue
            if not self.seqs.reserve(r.seq_id, len(seq.tokens) + k - 1, protect):
                out[i] = None
                continue
            drafting.append((i, seq, k))
            asked[i] = k
        self.num_ahead_hits += self.last_ahead_hits
        for (i, _, _), drafts in zip(drafting, self._draft(drafting), strict=True):
            out[i] = drafts
        self._last_round = [(requests[i].seq_id, k) for i, k in asked.items() if out[i]]
        return out

    def draft_ahead(self, depth: int | None = None, stop: Callable[[], bool] | None = None) -> int:
        """Draft the next round of the last round's sequences now, assuming the target keeps all their
        drafts and then the token the draft itself would write next: that token and `depth` drafts after
        it (default: each sequence's last k), in the time the target spends verifying (PEARL's post-
        verify; worth it where the draft has a device of its own). The next `propose` answers a sequence
        whose new tokens are exactly those with up to `depth` drafts from after them; any other round
        truncates them away as it does a rejected draft. Only sequences that fit the free blocks without
        evicting any; returns how many were drafted ahead. `stop()` true (a round has come) ends the
        drafting within about two forwards (`_draft`); the drafts made by then still serve, and
        `last_ahead_stopped` says it stopped."""
        drafting: list[tuple[int, DraftSequence, int]] = []
        ids: list[str] = []
        self._ahead = {s: at for s, at in self._ahead.items() if s in self.seqs.seqs}  # not evicted ones
        for n, (seq_id, last_k) in enumerate(self._last_round):
            seq = self.seqs.seqs.get(seq_id)
            if seq is None:
                continue
            k = min(last_k if depth is None else depth, self.max_model_len - len(seq.tokens) - 1)
            if k <= 0:
                continue
            extra = self.seqs.blocks_needed(len(seq.tokens) + k) - len(seq.block_table)
            if extra > self.seqs.num_free_blocks:
                continue
            self.seqs.reserve(seq_id, len(seq.tokens) + k, set())
            drafting.append((n, seq, k + 1))
            ids.append(seq_id)
        self._last_round = []
        self.last_ahead_stopped = False
        for seq_id, (_, seq, _), drafts in zip(ids, drafting, self._draft(drafting, stop), strict=True):
            if len(drafts) > 1:  # the guessed next token, then the drafts after it
                self._ahead[seq_id] = (len(seq.tokens) - len(drafts) + 1, len(drafts) - 1)
        self.num_ahead_rounds += 1 if drafting else 0
        return len(drafting)

    def _ready_drafts(self, r: ProposeRequest, ahead: tuple[int, int] | None) -> list[int] | None:
        """The drafts `draft_ahead` made for this round, if the round is the one it assumed: the
        sequence's new tokens end exactly at the token after which those drafts start."""
        if ahead is None:
            return None
        begin, depth = ahead  # the ahead drafts are tokens[begin : begin + depth]
        seq = self.seqs.seqs.get(r.seq_id)
        if seq is None or r.start + len(r.token_ids) != begin or seq.tokens[r.start : begin] != r.token_ids:
            return None
        self.seqs.seqs.move_to_end(r.seq_id)
        drafts = seq.tokens[begin : begin + min(r.k, depth)]
        del seq.tokens[begin + len(drafts) :]  # as a round that drafted these: the last without KV
        seq.num_computed = min(seq.num_computed, len(seq.tokens) - 1)
        return drafts

    def _draft(
        self, drafting: list[tuple[int, DraftSequence, int]], stop: Callable[[], bool] | None = None
    ) -> list[list[int]]:
        """k drafts for each (_, sequence, k): the sequence's tokens without KV, then k - 1 decodes;
        each sequence then holds its drafts, all but the last with KV. With `stop` (drafting ahead) no
        more forwards are queued once stop() is true, so fewer drafts may come back; to see it in time
        the host keeps at most two forwards queued (each waited for, asking stop(), before the one after
        the next goes in), so a round that comes waits for about two forwards, not the whole depth."""
        if not drafting:
            return []
        steps = [self._prefill(drafting)]  # step j: tokens [rows of drafting[...] still drafting at j]
        done: list[torch.cuda.Event] = []
        for j in range(1, max(k for _, _, k in drafting)):
            if stop is not None:
                if self.device.type == "cuda":
                    done.append(torch.cuda.Event())
                    done[-1].record()
                if self._stopped(done, stop):
                    self.last_ahead_stopped = True
                    break
            steps.append(self._decode(drafting, j, steps[-1]))
        host = torch.cat(steps).tolist()  # the round's one wait on the device
        out: list[list[int]] = [[] for _ in drafting]
        at = 0
        for j in range(len(steps)):
            for d, (_, _, k) in enumerate(drafting):
                if k > j:
                    out[d].append(host[at])
                    at += 1
        for (_, seq, _), drafts in zip(drafting, out, strict=True):
            seq.num_computed = len(seq.tokens) + len(drafts) - 1  # all drafts but the last were fed back
            seq.tokens.extend(drafts)
        return out

    @staticmethod
    def _stopped(done: list[torch.cuda.Event], stop: Callable[[], bool]) -> bool:
        """stop(), asked while the forward before the last queued one runs (on CPU each forward has
        ended by the time it returns)."""
        if len(done) >= 2:
            while not done[-2].query():
                if stop():
                    return True
        return stop()

    def _prefill(self, drafting: list[tuple[int, DraftSequence, int]]) -> torch.Tensor:
        """Every drafting sequence's tokens without KV; the first drafts, in `drafting` order.
        After a verify a sequence has one or two such tokens (two when the target kept every draft: the
        last draft was never fed back). Sequences with at most CATCH_UP_ROWS go in together as decode
        rows, one a token (each sees the keys up to its position, as verify rows do), as many as the
        largest decode graph holds, so the decode graphs serve the round's first forward (as a chunk of
        two the 1B shape ran eagerly: ~6 ms on an H200, against 0.9 ms in its graph). The rest (a
        prompt, tokens piled up while adaptive k held a sequence at 0, rows past the graphs) go in as
        chunks after them, at the token budget (mixed graphs on a GPU)."""
        cursor = [seq.num_computed for _, seq, _ in drafting]
        firsts: dict[int, torch.Tensor] = {}
        graphs = self.runner.graphs
        room = graphs.buckets[-1] if graphs is not None else self.max_num_batched_tokens
        short = []  # as many as the largest decode graph (or the token budget) holds
        for d, (_, seq, _) in enumerate(drafting):
            n = len(seq.tokens) - cursor[d]
            if n <= min(CATCH_UP_ROWS, room):
                short.append(d)
                room -= n
        if short:
            plan = StepPlan()
            for d in short:
                seq = drafting[d][1]
                for p in range(cursor[d], len(seq.tokens)):
                    self._add_row(plan, seq, [seq.tokens[p]], p)
                plan.sample_rows.append(plan.num_seqs - 1)
                cursor[d] = len(seq.tokens)
            hidden = self.runner.forward_plan(plan)
            assert hidden is not None
            tokens = self._greedy(hidden)
            for r, d in enumerate(short):
                firsts[d] = tokens[r : r + 1]
        while len(firsts) < len(drafting):
            plan, budget, rows = StepPlan(), self.max_num_batched_tokens, []
            for d, (_, seq, _) in enumerate(drafting):
                end = len(seq.tokens)
                if cursor[d] == end or budget == 0:
                    continue
                n = min(end - cursor[d], budget)
                self._add_row(plan, seq, seq.tokens[cursor[d] : cursor[d] + n], cursor[d])
                cursor[d] += n
                budget -= n
                if cursor[d] == end:
                    plan.sample_rows.append(plan.num_seqs - 1)
                    rows.append(d)
            hidden = self.runner.forward_plan(plan)
            if hidden is not None:
                tokens = self._greedy(hidden)
                for r, d in enumerate(rows):
                    firsts[d] = tokens[r : r + 1]
        return torch.cat([firsts[d] for d in range(len(drafting))])

    def _decode(
        self, drafting: list[tuple[int, DraftSequence, int]], j: int, prev: torch.Tensor
    ) -> torch.Tensor:
        """Draft j + 1 of the sequences with k > j, fed draft j (row of `prev`, on the device)."""
        plan = StepPlan()
        prev_row = 0
        for _, seq, k in drafting:
            if k > j - 1:
                if k > j:
                    plan.fill_positions.append(plan.num_tokens)
                    plan.fill_rows.append(prev_row)
                    plan.sample_rows.append(plan.num_seqs)
                    self._add_row(plan, seq, [PLACEHOLDER], len(seq.tokens) + j - 1)
                prev_row += 1
        hidden = self.runner.forward_plan(plan, prev)
        assert hidden is not None
        return self._greedy(hidden)

    def _greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's draft (a target token id): over the draft's vocabulary subset if it has one."""
        return self.head.greedy(hidden) if self.head is not None else self.model.greedy_tokens(hidden)

    def _add_row(self, plan: StepPlan, seq: DraftSequence, tokens: list[int], start: int) -> None:
        n = len(tokens)
        plan.input_ids.extend(tokens)
        plan.positions.extend(range(start, start + n))
        plan.slot_mapping.extend(self.seqs.slot(seq, p) for p in range(start, start + n))
        plan.query_start_loc.append(plan.query_start_loc[-1] + n)
        plan.context_lens.append(start + n)
        plan.block_tables.append(seq.block_table)

    def release(self, seq_ids: list[str]) -> None:
        self.seqs.release(seq_ids)
        for seq_id in seq_ids:
            self._ahead.pop(seq_id, None)

    def close(self) -> None:
        """Free the CUDA graphs now (an engine in this process shuts down; its pools go with them)."""
        for graphs in (self.runner.graphs, self.runner.mixed_graphs):
            if graphs is not None:
                graphs.release()
        self.runner.graphs = self.runner.mixed_graphs = None
