"""The engine: requests in, incremental outputs out, one model step per `step()`.

    step(): plan = scheduler.schedule() -> runner.launch(plan) -> scheduler.update_from_output()
            -> detokenize, stop strings -> RequestOutputs
A request with n > 1 becomes n sequences that share the prompt (and its cached blocks).
Requests are checked before they enter, so a bad one fails alone and the others keep running.

Tensor parallel (parallel.tensor_parallel_size > 1): this engine is rank 0. It starts ranks 1..N-1 as
Ray actors (fuserve.parallel.worker_group), each of which builds an LLMEngine of its own shard and then
runs only its runner on the plans rank 0 broadcasts before each step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fuserve.configs import FuserveConfig
from fuserve.core_messages import CoreStats
from fuserve.parallel.tp_context import TPContext
from fuserve.sampling_params import RequestError, SamplingParams
from fuserve.workers.block_manager import BlockManager
from fuserve.workers.cuda_graphs import DecodeGraphs
from fuserve.workers.detokenizer import IncrementalDetokenizer
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.kv_cache import allocate_kv_cache, num_blocks_for
from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.models.llama import LlamaArch
from fuserve.workers.models.loader import (
    ModelSource,
    build_model,
    generation_config,
    load_tokenizer,
    resolve_source,
)
from fuserve.workers.outputs import RequestOutput
from fuserve.workers.sampler import SampledBatch, has_penalty
from fuserve.workers.scheduler import Scheduler, SchedulerOutput
from fuserve.workers.sequence import FinishReason, Sequence
from fuserve.workers.step_plan import StepPlan, build_step_plan
from fuserve.workers.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fuserve.parallel.worker_group import WorkerGroup

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA GPU is visible; set model.device: cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[choice]


def pick_ops(choice: str, device: torch.device) -> KernelOps:
    if choice == "on" or (choice == "auto" and device.type == "cuda"):
        return KernelOps.triton()
    return KernelOps.reference()


@dataclass
class _SeqState:
    seq: Sequence
    index: int
    detok: IncrementalDetokenizer | None
    num_sent: int = 0
    logprobs: list = field(default_factory=list)


class LLMEngine:
    def __init__(
        self,
        config: FuserveConfig,
        tp: TPContext | None = None,
        workers: WorkerGroup | None = None,
        detokenize: bool = True,
    ) -> None:
        """tp: this rank's context, for a worker rank (its group formed by the caller). workers: ranks
        1..N-1, already started, for rank 0; started here from `config.parallel` when neither is given
        and tensor_parallel_size > 1. detokenize: False in the engine-core process, whose frontend
        turns tokens into text (and applies stop strings) off the engine loop."""
        self.detokenize = detokenize
        self.num_steps = 0
        self.step_seconds_total = 0.0
        if tp is None and workers is None and config.parallel.tensor_parallel_size > 1:
            from fuserve.parallel.worker_group import WorkerGroup

            workers = WorkerGroup.start(config)
        self.workers = workers
        self.tp = workers.tp if workers is not None else (tp or TPContext())
        try:
            with workers.guard("startup") if workers is not None else nullcontext():
                self._build(config)
        except BaseException:
            if workers is not None:
                workers.shutdown()
            raise
        if workers is not None:
            workers.begin_serving()

    def _build(self, config: FuserveConfig) -> None:
        """Model shard, KV cache, CUDA graphs, scheduler. Every tensor-parallel rank runs this same
        code, so the collectives inside (profiling forward, KV sizing, graph capture) pair up."""
        self.config = config
        self.device = pick_device(config.model.device)
        self.dtype = pick_dtype(config.model.dtype, self.device)
        self.source: ModelSource = resolve_source(config.model)
        self.model_name = self.source.name
        self.arch = LlamaArch.from_hf(self.source.hf_config)
        self.tokenizer: Tokenizer | None = None
        if self.source.kind != "dummy" and self.tp.rank == 0:  # only rank 0 sees text
            self.tokenizer = load_tokenizer(self.source)
        self.generation = generation_config(self.source, config.model)
        self.max_model_len = min(
            config.model.max_model_len or self.arch.max_position_embeddings, self.arch.max_position_embeddings
        )
        ops = pick_ops(config.kernels.use_triton, self.device)
        self.model = build_model(
            self.source, self.tp, ops, self.dtype, self.device, self.max_model_len, config.model.seed
        )
        cache_cfg = config.cache
        bs = cache_cfg.block_size
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        # Same answer on every rank (config and device type agree), so the token broadcasts pair up.
        choice = config.scheduler.async_scheduling
        self.async_scheduling = choice == "on" or (choice == "auto" and self.device.type == "cuda")
        runner = ModelRunner(self.model, self.device, bs, tp=self.tp, share_tokens=self.async_scheduling)
        if self.device.type == "cuda" and cache_cfg.num_blocks is None:
            self._profile(runner, num_kv_heads)
        # Every rank must hold the same block ids: the smallest pool that fits on every GPU.
        num_blocks = self.tp.min_across_ranks(
            num_blocks_for(cache_cfg, self.arch, num_kv_heads, self.dtype, self.device)
        )
        if num_blocks * bs < self.max_model_len:
            raise RuntimeError(
                f"the KV cache holds {num_blocks * bs} tokens, fewer than max_model_len "
                f"{self.max_model_len}; lower model.max_model_len or give the cache more memory"
            )
        self.kv_cache = allocate_kv_cache(self.arch, num_kv_heads, num_blocks, bs, self.dtype, self.device)
        self.model.bind_kv_cache(self.kv_cache.k, self.kv_cache.v)
        if self.device.type == "cuda" and config.kernels.cuda_graphs:
            graphs = DecodeGraphs(
                self.model,
                self.device,
                max_blocks_per_seq=-(-self.max_model_len // bs),
                max_batch=min(config.kernels.cuda_graph_max_batch, config.scheduler.max_num_seqs),
            )
            graphs.capture()
            runner.graphs = graphs
        self.runner = runner
        self.block_manager = BlockManager(num_blocks, bs, cache_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self._requests: dict[str, list[_SeqState]] = {}
        self._by_seq: dict[str, _SeqState] = {}
        self._inflight: tuple[SchedulerOutput, SampledBatch | None] | None = None

    def _profile(self, runner: ModelRunner, num_kv_heads: int) -> None:
        sched = self.config.scheduler
        per_seq = max(1, sched.max_num_batched_tokens // max(1, min(sched.max_num_seqs, 256)))
        blocks = -(-per_seq // self.config.cache.block_size)
        scratch = allocate_kv_cache(
            self.arch, num_kv_heads, blocks, self.config.cache.block_size, self.dtype, self.device
        )
        self.model.bind_kv_cache(scratch.k, scratch.v)
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.profile(sched.max_num_batched_tokens, min(sched.max_num_seqs, 256), blocks)
        torch.cuda.synchronize(self.device)
        del scratch
        empty = [torch.empty(0)] * self.arch.num_layers
        self.model.bind_kv_cache(empty, empty)

    # ---- requests -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer (dummy weights): send prompt token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise RequestError for a request the engine cannot serve; returns its max_tokens."""
        params.validate()
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty: send at least one token of text")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens but this model's max_model_len is {self.max_model_len}: "
                "shorten the prompt (leave room for at least one output token)"
            )
        vocab = self.arch.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise RequestError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                f"{self.max_model_len}: lower max_tokens to at most {room}"
            )
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and n + max_tokens > sched.max_num_batched_tokens:
            raise RequestError(
                f"prompt + max_tokens ({n + max_tokens}) exceeds scheduler.max_num_batched_tokens "
                f"({sched.max_num_batched_tokens}) and chunked prefill is off"
            )
        return max_tokens

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.encode_prompt(prompt)
        max_tokens = self.check_request(prompt_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        eos = self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        states = []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None:
                p = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            seq = Sequence(f"{request_id}#{i}", prompt_ids, p, arrival, max_tokens, eos)
            detok = None
            if self.tokenizer is not None and self.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, p.stop, p.skip_special_tokens)
            state = _SeqState(seq, i, detok)
            states.append(state)
            self._by_seq[seq.seq_id] = state
            self.scheduler.add(seq)
        self._requests[request_id] = states

    def abort(self, request_id: str, indices: list[int] | None = None) -> bool:
        """Ends the request's sequences (only those in `indices`, when given: one of n sequences that
        met a stop string in the frontend) and frees their blocks."""
        states = self._requests.get(request_id)
        if states is None:
            return False
        for st in states:
            if indices is None or st.index in indices:
                if not st.seq.is_finished:
                    self.scheduler.finish(st.seq, FinishReason.ABORT)
                self._by_seq.pop(st.seq.seq_id, None)
        if all(st.seq.is_finished for st in states):
            del self._requests[request_id]
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. With async scheduling the next step is queued on the device before this
        step's tokens are read back, so host work overlaps the GPU; the outputs returned are then
        those of the step that just completed."""
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self.num_steps += 1
            self.step_seconds_total += time.perf_counter() - start

    def _step(self) -> list[RequestOutput]:
        prev, self._inflight = self._inflight, None
        if prev is not None and not self._can_overlap():
            return self._complete(prev)
        sched_out = self.scheduler.schedule()
        if not sched_out.is_empty:
            plan = build_step_plan(sched_out, self.block_manager.block_size)
            self.scheduler.on_launched(sched_out)
            self._inflight = (sched_out, self._launch(plan, prev[1] if prev is not None else None))
        outputs = self._complete(prev) if prev is not None else []
        if not self.async_scheduling and self._inflight is not None:
            current, self._inflight = self._inflight, None
            outputs += self._complete(current)
        return outputs

    def _can_overlap(self) -> bool:
        """Penalties need every earlier token on the host, so such batches run one step at a time."""
        seqs = self.scheduler.running + self.scheduler.waiting
        return not any(has_penalty(s.params) for s in seqs)

    def _complete(self, inflight: tuple[SchedulerOutput, SampledBatch | None]) -> list[RequestOutput]:
        sched_out, batch = inflight
        if batch is not None and self.workers is not None:
            self.workers.wait(batch.ready)
        results = iter(batch.results() if batch is not None else [])
        sampled: list[int | None] = []
        logprobs = []
        for item in sched_out.scheduled:
            r = next(results) if item.samples else None
            sampled.append(r.token_id if r else None)
            logprobs.append(r.logprobs if r else None)
        self.scheduler.update_from_output(sched_out, sampled)

        outputs: list[RequestOutput] = []
        for item, token, lp in zip(sched_out.scheduled, sampled, logprobs, strict=True):
            state = self._by_seq.get(item.seq.seq_id)
            if token is None or state is None:
                continue
            if lp is not None:
                state.logprobs.append(lp)
            outputs.append(self._emit(state))
        return outputs

    def _launch(self, plan: StepPlan, prev: SampledBatch | None) -> SampledBatch | None:
        if self.workers is None:
            return self.runner.launch(plan, prev)
        with self.workers.guard("step"):
            self.workers.broadcast(plan)  # the other ranks run the same plan, in step with this one
            return self.runner.launch(plan, prev)

    def _emit(self, st: _SeqState) -> RequestOutput:
        seq = st.seq
        settled = seq.settled_output_ids
        new_ids = settled[st.num_sent :]
        delta_text = ""
        if st.detok is not None:
            st.detok.add(new_ids)
            if st.detok.stopped and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            delta_text = st.detok.flush(final=seq.is_finished)
        st.num_sent = len(settled)
        out = RequestOutput(
            request_id=seq.seq_id.rsplit("#", 1)[0],
            index=st.index,
            delta_text=delta_text,
            delta_token_ids=new_ids,
            text=st.detok.text if st.detok else "",
            token_ids=settled,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            delta_logprobs=st.logprobs[-len(new_ids) :] if st.logprobs and new_ids else [],
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )
        if seq.is_finished:
            self._by_seq.pop(seq.seq_id, None)
            rid = out.request_id
            if rid in self._requests and all(s.seq.is_finished for s in self._requests[rid]):
                del self._requests[rid]
        return out

    @property
    def healthy(self) -> bool:
        """False once a tensor-parallel worker failed (even before a step notices); always True alone."""
        return self.workers is None or self.workers.healthy

    def shutdown(self) -> None:
        """Free the CUDA graphs, then end the tensor-parallel worker processes and release their GPUs.
        Every rank calls it before leaving its group: graphs must go before the NCCL communicator."""
        if self.runner.graphs is not None:
            self.runner.graphs.release()
            self.runner.graphs = None
        if self.workers is not None:
            self.workers.shutdown()

    def stats(self) -> CoreStats:
        bm = self.block_manager
        return CoreStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            outstanding_tokens=self.scheduler.outstanding_tokens(),
            kv_cache_usage=bm.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_hit_tokens=bm.prefix_hit_tokens,
            prefix_query_tokens=bm.prefix_query_tokens,
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_steps=self.num_steps,
            step_seconds_total=self.step_seconds_total,
            cpu_seconds_total=time.process_time(),
        )
