"""The feature-reading draft's runner: like draft_runner.py, drafting greedily for a batch on a paged
KV cache, but each row reads the target's feature beside its token.

    propose(requests):  per sequence  tokens[:start] + token_ids; its KV rows cut to those computed from
                                      the target's own features (rows 0..start-2: see below)
                        real rows     rows start-1 .. n-2 from the target's features (`features`), every
                                      sequence in one forward (chunked at the token budget); row n-2's h
                                      gives the first draft
                        k - 1 chained rows batched over the sequences still drafting: row n-2+j reads
                                      draft j and the h of the row before it (the draft's guess of the
                                      target's feature); inputs stay on the device, one host wait a round
    release(ids):       their blocks go back

Rollback: a chained row read a guessed feature, so its KV is never kept, even for a draft the target
accepted: the next round's features recompute the accepted drafts' rows from the target's real ones
(what training's unrolled passes assume). The sequence state is draft_sequences.py's, with
`num_computed` counting rows with KV; the held tokens are the target's only, never drafts.
Runs eagerly (no CUDA graphs); the torch reference ops on CPU, Triton on the GPU.

Drafts are chosen over the head's vocabulary subset plus the tokens the live sequences hold
(subset_head.py, "Context tokens"): one set of candidates for the whole batch, so a row may propose a
token from another sequence's context, which costs nothing but a column.

With `min_confidence` (speculative.draft_confidence) a sequence's drafts stop after the first whose
probability under the draft's own softmax is below it: that probability tracks the target's acceptance
(benchmarks/NOTES.md, "Drafts cut by the draft's own confidence"), and the doubted draft itself is still
kept often enough to pay for its verify row (chat on the CPU: 1.43-1.51x -> 1.54-1.81x against stopping
before it, "A draft's chain kept through its first doubted draft"). The chained rows still run for every
sequence on a GPU (one host wait a round); on the CPU the round ends once every sequence has stopped.

With `second_best` (speculative.second_best) each draft also comes with the draft's best other token
(subset_head.py, "Second best"): `last_alternatives` holds them after each propose, one per draft kept,
for the target to verify as a second branch in the same step. They come from the logits the drafts
are chosen from and cross to the host in the same copy, so the round still waits once; without it no
second pass over the logits runs. The chain itself always follows the best token, so the drafts are
the same either way.
"""

from __future__ import annotations

import logging

import torch

from fuserve.configs import CacheConfig, DraftPlacementConfig, FuserveConfig, KernelConfig, ModelConfig
from fuserve.speculative.draft_memory import draft_kv_blocks
from fuserve.speculative.draft_sequences import DraftSequence, DraftSequences
from fuserve.speculative.feature_draft_file import draft_file_of, read_feature_draft
from fuserve.speculative.feature_draft_model import FeatureDraftModel
from fuserve.speculative.proposer import ProposeRequest, feature_rows_begin
from fuserve.speculative.subset_head import ContextTokens
from fuserve.workers.kernels.switches import apply_config
from fuserve.workers.kv_cache import allocate_kv_cache, bytes_per_block
from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.models.loader import resolve_source
from fuserve.workers.step_plan import StepPlan
from fuserve.workers.worker import pick_device, pick_dtype, pick_ops

log = logging.getLogger("fuserve")
Candidates = tuple[torch.Tensor, torch.Tensor] | None  # ContextTokens.candidates: token ids, head rows


class FeatureDraftRunner:
    reads_features = True  # speculation.py hands each round the target's features

    def __init__(
        self,
        draft: ModelConfig,
        target: ModelConfig,
        placement: DraftPlacementConfig,
        cache: CacheConfig,
        kernels: KernelConfig,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        min_confidence: float = 0.0,
        second_best: bool = False,
    ) -> None:
        """`draft` names the eagle1 file; `target` the model it reads (its embedding and config come
        from the target's own files). `cache`: the target's block size and CPU size, as for DraftRunner.
        `min_confidence`: a sequence's drafts stop after the first the draft itself gives a lower
        probability (speculative.draft_confidence); 0 drafts all k. `second_best`: each propose also
        leaves the second-best token beside every draft in `last_alternatives`."""
        file = draft_file_of(draft)
        if file is None:
            raise ValueError(f"speculative.draft {draft.path!r} is no feature draft file (.safetensors)")
        target_source = resolve_source(target)
        if target_source.path is None:
            raise ValueError("a feature draft reads the target's embedding: the target needs real weights")
        self.device = pick_device(placement.device if placement.device != "auto" else draft.device)
        self._start_bytes = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.dtype = pick_dtype(draft.dtype, self.device)
        weights = read_feature_draft(file, target_source.path)
        longest = int(weights.hf_config.get("max_position_embeddings", 4096))
        self.max_model_len = min(draft.max_model_len or target.max_model_len or longest, longest)
        ops = pick_ops(kernels.use_triton, self.device)
        self.model = FeatureDraftModel(weights, ops, self.dtype, self.device, self.max_model_len)
        self.arch = self.model.llama.arch
        self.block_size = cache.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.min_confidence = min_confidence
        self.second_best = second_best
        # per request of the last propose: the second-best token beside each draft it returned
        self.last_alternatives: list[list[int]] = []
        self.plans = ModelRunner(self.model.llama, self.device, self.block_size)  # step plan -> tensors
        num_kv_heads = self.model.llama.model.layers[0].self_attn.num_kv_heads
        per_block = bytes_per_block(self.arch, num_kv_heads, self.block_size, self.dtype)
        num_blocks = cache.num_blocks or self._pool_size(cache, placement, per_block)
        kv = allocate_kv_cache(self.arch, num_kv_heads, num_blocks, self.block_size, self.dtype, self.device)
        self.model.bind_kv_cache(kv.k, kv.v)
        self.seqs = DraftSequences(num_blocks, self.block_size)
        self.context = ContextTokens(self.model.head) if self.model.head is not None else None
        log.info(
            "feature draft KV cache: %d blocks x %d tokens on %s", num_blocks, self.block_size, self.device
        )

    @classmethod
    def from_config(cls, config: FuserveConfig) -> FeatureDraftRunner:
        """The feature draft of a deployment's `speculative` block, on its target (`model`)."""
        spec = config.speculative
        if spec.draft is None:
            raise ValueError("speculative.draft is not set: name the draft model")
        apply_config(config)
        return cls(
            spec.draft,
            config.model,
            spec.placement,
            config.cache,
            config.kernels,
            config.scheduler.max_num_seqs,
            config.scheduler.max_num_batched_tokens,
            spec.draft_confidence,
            spec.second_best,
        )

    def _pool_size(self, cache: CacheConfig, placement: DraftPlacementConfig, per_block: int) -> int:
        """CPU: the cache's CPU size. GPU: the draft's share of the device less what it allocated itself,
        within what the device has free (draft_memory.py; a one-layer draft's activations are small
        beside its KV cache, so no profile forward)."""
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gib * (1 << 30) // per_block))
        torch.cuda.reset_peak_memory_stats(self.device)
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
        (send it again from start 0). The rows a request's features cover are computed even when it
        wants no drafts, so no feature is lost. With `second_best`, `last_alternatives` then holds each
        returned draft's second-best token (else [] per request)."""
        out: list[list[int] | None] = [[] for _ in requests]
        self.last_alternatives = [[] for _ in requests]
        protect = {r.seq_id for r in requests}
        work: list[tuple[int, DraftSequence, torch.Tensor, int]] = []  # (request, sequence, features, k)
        for i, r in enumerate(requests):
            begin = feature_rows_begin(r.start)
            if self.context is not None:
                self.context.add(r.seq_id, r.token_ids)
            seq = self.seqs.apply(r.seq_id, r.start, r.token_ids)
            if seq is None:
                out[i] = None
                continue
            seq.num_computed = min(seq.num_computed, begin)  # rows past start - 2 read guessed features
            if seq.num_computed < begin:  # rows it never computed: only a start over fills them
                self.seqs.release([r.seq_id])
                out[i] = None
                continue
            n = len(seq.tokens)
            if r.features is None or r.features.shape[0] != max(n - 1 - begin, 0):
                raise ValueError(
                    f"{r.seq_id}: a feature draft needs the target's features of rows {begin}..{n - 2}"
                )
            k = min(r.k, self.max_model_len - n) if n >= 2 else 0
            if n - 1 == begin and k > 0:
                k = 0  # no new row: the last row's h is gone, so nothing to draft from this round
            if n - 1 == begin:
                continue
            if not self.seqs.reserve(r.seq_id, n - 1 + max(k - 1, 0), protect):
                out[i] = None
                continue
            work.append((i, seq, r.features.to(self.device), max(k, 0)))
        if not work:
            return out
        extra = self.context.candidates() if self.context is not None else None
        h, tokens, second, conf = self._real_rows(work, extra)
        steps, seconds, confs = [tokens], [second], [conf]
        drafting = [w for w in work if w[3] > 0]
        live = torch.tensor([w[3] > 0 for w in work], device=self.device)
        h, prev = h[live], tokens[live]
        # on the CPU a look at the confidences costs no device wait: stop once every sequence stopped
        sure = conf[live] >= self.min_confidence if conf is not None and self.device.type == "cpu" else None
        for j in range(1, max((w[3] for w in drafting), default=0)):
            if sure is not None and not bool(sure.any()):
                break
            h, prev, second, conf = self._chained_rows(drafting, j, h, prev, extra)
            if sure is not None and conf is not None:
                keep = torch.tensor([k > j for _, _, _, k in drafting if k > j - 1])
                sure = sure[keep] & (conf >= self.min_confidence)
            steps.append(prev)
            seconds.append(second)
            confs.append(conf)
        # the round's one wait on the device: drafts, second bests and doubts in one copy
        doubts = [c < self.min_confidence if c is not None else None for c in confs]
        host = iter(_to_host(steps + [t for t in seconds + doubts if t is not None]))
        drafts_of = [next(host) for _ in steps]
        seconds_of = [next(host) if t is not None else None for t in seconds]
        doubted_of = [next(host) if t is not None else None for t in doubts]

        def made_at(j: int, at: int) -> tuple[int, int, bool]:  # draft, second best, doubted
            alts, doubted = seconds_of[j], doubted_of[j]
            return (
                drafts_of[j][at],
                alts[at] if alts is not None else -1,
                doubted is not None and bool(doubted[at]),
            )

        made: dict[int, list[tuple[int, int, bool]]] = {}  # request -> its drafts
        for pos, (i, _, _, k) in enumerate(work):
            if k > 0:
                made[i] = [made_at(0, pos)]
        for j in range(1, len(drafts_of)):
            at = 0
            for i, _, _, k in drafting:
                if k > j:
                    made[i].append(made_at(j, at))
                    at += 1
        for i, drafts in made.items():
            doubted = next((j for j, d in enumerate(drafts) if d[2]), len(drafts))
            kept = drafts[: doubted + 1]  # through the first doubted draft: one more row, no more drafting
            out[i] = [d for d, _, _ in kept]
            if self.second_best:
                self.last_alternatives[i] = [a for _, a, _ in kept]
        for _, seq, _, _ in work:
            seq.num_computed = len(seq.tokens) - 1  # the real rows only; chained ones are overwritten
        return out

    def _real_rows(
        self, work: list[tuple[int, DraftSequence, torch.Tensor, int]], extra: Candidates
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Rows from the target's features of every sequence, in chunks of the token budget; each
        sequence's last row: its h [W, H], first draft [W], its second best [W] and its confidence [W]
        (`_drafts`), in `work` order."""
        cursor = [seq.num_computed for _, seq, _, _ in work]
        last: dict[int, torch.Tensor] = {}
        while len(last) < len(work):
            plan, budget, parts, ends = StepPlan(), self.max_num_batched_tokens, [], []
            for w, (_, seq, features, _) in enumerate(work):
                end = len(seq.tokens) - 1  # rows 0..n-2
                if cursor[w] == end or budget == 0:
                    continue
                count = min(end - cursor[w], budget)
                begin = end - features.shape[0]  # the features' first row
                self._add_rows(plan, seq, cursor[w], count)
                parts.append(features[cursor[w] - begin : cursor[w] - begin + count])
                cursor[w] += count
                budget -= count
                if cursor[w] == end:
                    ends.append((w, plan.num_tokens - 1))
            h = self._forward(plan, torch.cat(parts))
            for w, row in ends:
                last[w] = h[row : row + 1]
        h = torch.cat([last[w] for w in range(len(work))])
        return (h, *self._drafts(h, extra))

    def _chained_rows(
        self,
        drafting: list[tuple[int, DraftSequence, torch.Tensor, int]],
        j: int,
        h: torch.Tensor,
        prev: torch.Tensor,
        extra: Candidates,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Row n-2+j of each sequence with k > j, from draft j and the previous row's h (rows of `h` and
        `prev`: the sequences with k > j - 1); returns its h, draft j + 1, that draft's second best and
        its confidence."""
        plan = StepPlan()
        keep = []
        for _, seq, _, k in (w for w in drafting if w[3] > j - 1):
            keep.append(k > j)
            if k > j:
                self._add_rows(plan, seq, len(seq.tokens) - 2 + j, 1)
        rows = torch.tensor(keep, device=self.device)
        _, positions, meta = self.plans.prepare(plan)  # its input ids are the drafts, on the device
        h = self.model(prev[rows], h[rows], positions, meta)
        return (h, *self._drafts(h, extra))

    def _drafts(
        self, h: torch.Tensor, extra: Candidates
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Each row's draft [S]; with `second_best`, its second-best token [S]; where drafts are cut by
        confidence, the draft's probability of it [S]. None for what is not asked."""
        cut = self.min_confidence > 0.0
        if self.second_best:
            return self.model.best_two(h, extra, cut)
        if not cut:
            return self.model.greedy(h, extra), None, None
        tokens, conf = self.model.greedy_with_confidence(h, extra)
        return tokens, None, conf

    def _forward(self, plan: StepPlan, features: torch.Tensor) -> torch.Tensor:
        input_ids, positions, meta = self.plans.prepare(plan)
        return self.model(input_ids, features, positions, meta)

    def _add_rows(self, plan: StepPlan, seq: DraftSequence, first: int, count: int) -> None:
        """Rows first..first+count-1 of a sequence: row i at position i reads token i + 1."""
        rows = range(first, first + count)
        tokens = seq.tokens
        plan.input_ids.extend(tokens[i + 1] if i + 1 < len(tokens) else 0 for i in rows)
        plan.positions.extend(rows)
        plan.slot_mapping.extend(self.seqs.slot(seq, i) for i in rows)
        plan.query_start_loc.append(plan.query_start_loc[-1] + count)
        plan.context_lens.append(first + count)
        plan.block_tables.append(seq.block_table)

    def release(self, seq_ids: list[str]) -> None:
        self.seqs.release(seq_ids)
        if self.context is not None:
            for seq_id in seq_ids:
                self.context.drop(seq_id)


def _to_host(parts: list[torch.Tensor]) -> list[list[int]]:
    """1-D int or bool tensors as lists, through one device-to-host copy."""
    flat = torch.cat([t.to(torch.int64) for t in parts]).tolist()
    out, at = [], 0
    for t in parts:
        out.append(flat[at : at + t.numel()])
        at += t.numel()
    return out
