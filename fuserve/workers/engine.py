"""The engine: requests in, incremental outputs out, one model step per `step()`.

    step(): plan = scheduler.schedule() -> runner.launch(plan) -> scheduler.update_from_output()
            -> detokenize, stop strings -> RequestOutputs
A request with a grammar (guided decoding) waits while its grammar compiles on a thread
(grammar_compiler.py); a step that samples a guided sequence queues its forward first, fills the grammar
bitmask on the CPU while the device runs it, then queues the masked sampling (guided_decoding.py).
A request with n > 1 becomes n sequences that share the prompt (and its cached blocks).
Requests are checked before they enter, so a bad one fails alone and the others keep running.

The model itself is behind an executor (executor.py): a Worker in this process, or, with tensor
parallelism, this process's Worker as rank 0 and ranks 1..N-1 as Ray actors that build the same Worker
of their own shard and follow the plans rank 0 sends before each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fuserve.configs import FuserveConfig
from fuserve.core_messages import CoreStats
from fuserve.gc_tuning import gc_seconds_total
from fuserve.sampling_params import RequestError, SamplingParams
from fuserve.speculative.factory import build_proposer
from fuserve.speculative.proposer import Proposer
from fuserve.speculative.speculation import Speculation
from fuserve.workers.block_manager import BlockManager
from fuserve.workers.detokenizer import IncrementalDetokenizer
from fuserve.workers.executor import Executor, build_executor
from fuserve.workers.grammar_compiler import GrammarCompiler
from fuserve.workers.guided_decoding import GuidedDecoding
from fuserve.workers.models.loader import generation_config, load_tokenizer
from fuserve.workers.outputs import RequestOutput
from fuserve.workers.routing_summary import QueueSummaryCache, prefill_tokens
from fuserve.workers.sampler import SampledBatch, has_penalty
from fuserve.workers.scheduler import Scheduler, SchedulerOutput
from fuserve.workers.sequence import FinishReason, Sequence
from fuserve.workers.step_cost_meter import StepCostMeter
from fuserve.workers.step_plan import StepPlan, build_step_plan
from fuserve.workers.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fuserve.parallel.worker_group import WorkerGroup

GRAMMAR_WAIT_S = 0.005  # an engine with only compiling requests waits this long for one per step


@dataclass
class _SeqState:
    seq: Sequence
    index: int
    detok: IncrementalDetokenizer | None
    request_id: str
    num_sent: int = 0
    logprobs: list = field(default_factory=list)


class LLMEngine:
    def __init__(
        self,
        config: FuserveConfig,
        workers: WorkerGroup | None = None,
        detokenize: bool = True,
        executor: Executor | None = None,
        proposer: Proposer | None = None,
    ) -> None:
        """workers: ranks 1..N-1, already started (else the executor starts them from
        `config.parallel` when tensor_parallel_size > 1). detokenize: False in the engine-core process,
        whose frontend turns tokens into text (and applies stop strings) off the engine loop."""
        self.config = config
        self.detokenize = detokenize
        self.num_steps = 0
        self.num_requests_added = 0  # ever: routers tell from it which of their sends these stats include
        self.step_seconds_total = 0.0
        # of which waiting for the device to finish a step (the rest is this process's own work); the
        # device's own time for the steps (CUDA events); and the steps that carried prefill tokens
        self.device_wait_seconds_total = 0.0
        self.device_busy_seconds_total = 0.0
        self.prefill_device_busy_seconds_total = 0.0
        self.prefill_steps = 0
        self.prefill_step_seconds_total = 0.0
        self.executor = executor or build_executor(config, workers)
        worker = self.executor.worker
        self.device, self.arch, self.max_model_len = worker.device, worker.arch, worker.max_model_len
        self.async_scheduling = worker.async_scheduling
        try:
            source = worker.source
            self.model_name = source.name
            self.tokenizer: Tokenizer | None = load_tokenizer(source) if source.kind != "dummy" else None
            self.generation = generation_config(source, config.model)
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_manager = BlockManager(
            worker.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.step_cost = StepCostMeter(clip_outliers=True)
        self._queue_summary = QueueSummaryCache(self.scheduler)
        self._completed: list[SchedulerOutput] = []  # steps whose tokens the current step() read back
        self._completed_hidden = False  # ...and its host work hidden under the GPU's (`_complete`)
        self._inflight_behind = False  # the step in flight was launched while the one before it ran
        self._unattributed_s = 0.0
        self._unattributed_busy_s = 0.0  # the device's time of the batches read back since _measure_step
        self._requests: dict[str, list[_SeqState]] = {}
        self._by_seq: dict[str, _SeqState] = {}
        self._penalized: list[Sequence] = []  # live sequences with a penalty (they forbid overlap)
        self._inflight: tuple[SchedulerOutput, SampledBatch | None] | None = None
        self._guided: GuidedDecoding | None = None  # built with the first grammar
        self._failures: list[tuple[str, str]] = []  # (request id, why) of requests ended by the engine
        self.speculation = None
        try:
            proposer = proposer or build_proposer(config, self.device)
        except BaseException:
            self.executor.shutdown()
            raise
        if proposer is not None:
            self.speculation = Speculation(
                config.speculative, proposer, lambda seq, drafts: self.guided.valid_drafts(seq, drafts)
            )

    @property
    def speculation(self) -> Speculation | None:
        return self._speculation

    @speculation.setter
    def speculation(self, speculation: Speculation | None) -> None:
        """Benchmarks and tests put their own in; the model keeps its features exactly when the
        proposer reads them, so a step without a feature draft copies none."""
        self._speculation = speculation
        self.executor.worker.set_keep_features(speculation is not None and speculation.features is not None)
        if speculation is not None and speculation.features is not None:
            speculation.features.block_size = self.block_manager.block_size  # its prefix-hit cache's

    @property
    def workers(self) -> WorkerGroup | None:
        """Ranks 1..N-1, when tensor parallel (tests kill one to see the engine fail cleanly)."""
        return self.executor.workers

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
        if any(t >= vocab for t in params.logit_bias):
            raise RequestError(f"logit_bias keys must be token ids in [0, {vocab})")
        if params.grammar is not None and self.tokenizer is None:
            raise RequestError(
                "guided decoding needs the model's tokenizer; this model has none (dummy weights)"
            )
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
            state = _SeqState(seq, i, detok, request_id)
            if has_penalty(p):
                self._penalized.append(seq)
            states.append(state)
            self._by_seq[seq.seq_id] = state
            if p.grammar is not None:
                self.guided.add(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = states
        self.num_requests_added += 1

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
                if self._guided is not None:
                    self._guided.remove(st.seq)
        if all(st.seq.is_finished for st in states):
            del self._requests[request_id]
        return True

    def has_request(self, request_id: str) -> bool:
        """Whether any of the request's sequences is still in the engine."""
        return request_id in self._requests

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def guided(self) -> GuidedDecoding:
        if self._guided is None:
            assert self.tokenizer is not None
            cfg = self.config.structured_output
            compiler = GrammarCompiler(
                self.tokenizer, self.arch.vocab_size, cfg.grammar_cache_size, cfg.compile_threads
            )
            self._guided = GuidedDecoding(compiler, pin_memory=self.device.type == "cuda")
        return self._guided

    def take_failures(self) -> list[tuple[str, str]]:
        """(request id, why) of requests the engine ended since the last call (a grammar that did not
        compile); the engine core reports them to the frontend as RequestFailure."""
        failures, self._failures = self._failures, []
        return failures

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. With async scheduling the next step is queued on the device before this
        step's tokens are read back, so host work overlaps the GPU; the outputs returned are then
        those of the step that just completed."""
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            seconds = time.perf_counter() - start
            self.num_steps += 1
            self.step_seconds_total += seconds
            self._measure_step(seconds)

    def _measure_step(self, seconds: float) -> None:
        """A step() call's time goes to the batch it read back (with async scheduling, the one launched
        by the call before); a call that read none back adds its time to the next one."""
        self._unattributed_s += seconds
        prefills = [prefill_tokens(out) for out in self._completed]
        if any(prefills):
            self.prefill_steps += 1
            self.prefill_step_seconds_total += self._unattributed_s
            self.prefill_device_busy_seconds_total += self._unattributed_busy_s
        if self.speculation is not None and len(self._completed) == 1:
            hidden = self._completed_hidden
            self.speculation.observe_step(self._completed[0], self._unattributed_s, hidden)
        for out, prefill in zip(self._completed, prefills, strict=True):
            self.step_cost.observe(
                prefill, out.num_tokens - prefill, self._unattributed_s / len(self._completed)
            )
        if self._completed:
            self._completed, self._unattributed_s, self._unattributed_busy_s = [], 0.0, 0.0

    def _step(self) -> list[RequestOutput]:
        prev, self._inflight = self._inflight, None
        prev_behind, self._inflight_behind = self._inflight_behind, False
        if self._guided is not None and self._guided.has_pending:
            self._end_failed_grammars()
        behind = False  # the next step's drafts follow the token of the plain step in flight
        if prev is not None and (not self._can_overlap() or prev[0].has_drafts):
            if prev[0].has_drafts or not self._drafts_behind_a_plain_step(prev[1]):
                return self._complete(prev)
            behind = True
        elif self.speculation is not None:
            self.speculation.propose(self.scheduler.running)
        sched_out = self.scheduler.schedule()
        if self.speculation is not None:
            self.speculation.after_schedule(self.scheduler.running, sched_out)
        masked: tuple[SchedulerOutput, StepPlan, torch.Tensor | None] | None = None
        if not sched_out.is_empty:
            plan = build_step_plan(sched_out, self.block_manager.block_size)
            self.scheduler.on_launched(sched_out)
            prev_batch = prev[1] if prev is not None else None
            if self._guided is not None and self._samples_guided(sched_out):
                # the forward goes first; its sampling waits for the grammar masks, filled below while it runs
                masked = (sched_out, plan, self.executor.forward(plan, prev_batch))
            else:
                self._inflight = (sched_out, self.executor.execute(plan, prev_batch))
        elif prev is None and self._guided is not None and self._guided.has_pending:
            self._guided.wait(GRAMMAR_WAIT_S)  # only compiling requests: wait for one rather than spin
        launched = self._inflight is not None or masked is not None
        # a guided step's sampling waits for its masks, filled after this read-back: not hidden
        self._inflight_behind = launched and prev is not None and masked is None
        outputs = self._complete(prev, hidden=launched and prev_behind) if prev is not None else []
        if behind:
            self.speculation.redraft_missed(self.scheduler.running)  # type: ignore[union-attr]
        if masked is not None:
            sched_out, plan, logits = masked
            batch = None
            if logits is not None:
                # every earlier token is read back now, so each matcher is where this step samples
                # a sequence with alternatives has no grammar: its entries only count its rows
                rows = [
                    (item.seq, item.spec_token_ids + item.spec_alt_ids)
                    for item in sched_out.scheduled
                    if item.samples
                ]
                batch = self.executor.sample(plan, logits, self.guided.bitmask(rows))
            self._inflight = (sched_out, batch)
        if not self.async_scheduling and self._inflight is not None:
            current, self._inflight = self._inflight, None
            outputs += self._complete(current)
        return outputs

    def _samples_guided(self, out: SchedulerOutput) -> bool:
        guided = self.guided
        return any(item.samples and guided.is_guided(item.seq) for item in out.scheduled)

    def _end_failed_grammars(self) -> None:
        for seq, why in self.guided.poll():
            request_id = seq.seq_id.rsplit("#", 1)[0]
            if all(request_id != rid for rid, _ in self._failures):
                self._failures.append((request_id, why))
            self.abort(request_id)

    def _advance_grammars(self, seqs: list[Sequence]) -> None:
        """Feed each guided sequence's new tokens to its grammar; a finished grammar ends the sequence
        at once (no step spent on the EOS), and a token the grammar rejects is dropped and ends it."""
        guided = self.guided
        for seq in seqs:
            if seq.is_finished or not guided.is_guided(seq):
                continue
            if not guided.advance(seq):
                self.scheduler.finish(seq, FinishReason.STOP)
                seq.token_ids.pop()  # the rejected token: sampled from a row the grammar left empty
            elif guided.is_done(seq):
                self.scheduler.finish(seq, FinishReason.STOP)

    def _can_overlap(self) -> bool:
        """Penalties need every earlier token on the host, and so do drafts (the proposer reads them),
        so such batches run one step at a time (but for the step after an overlapping plain step:
        `_drafts_behind_a_plain_step`). The penalized sequences are kept apart as they are
        added: walking every running and waiting one each step cost ~1 ms at 1,024 + 4,800."""
        if self._penalized:
            self._penalized = [s for s in self._penalized if not s.is_finished]
        if self.speculation is not None and self.speculation.wants_drafts(self.scheduler.running):
            return False
        return not self._penalized

    def _drafts_behind_a_plain_step(self, batch: SampledBatch | None) -> bool:
        """With overlap, the step after a plain step is planned before that step is read back, like an
        async plain step: its drafts follow the token still on the device (Speculation.propose_behind)."""
        if self.speculation is None or self._penalized or batch is None:
            return False
        return self.speculation.propose_behind(self.scheduler.running, batch.ready)

    def _complete(
        self, inflight: tuple[SchedulerOutput, SampledBatch | None], hidden: bool = False
    ) -> list[RequestOutput]:
        """Read back a step and emit its tokens. `hidden`: it was launched while the step before it ran
        and the next one was launched before it was read back, so the host's work on either side ran
        under the GPU's and its time is a step's with the host hidden (speculation's cost fit: a step
        after a read-back, or before one, carries host time with the GPU idle)."""
        sched_out, batch = inflight
        self._completed_hidden = hidden
        if batch is not None:
            t0 = time.perf_counter()
            self.executor.wait(batch)
            batch.synchronize()
            self.device_wait_seconds_total += time.perf_counter() - t0
            busy = batch.device_seconds()
            if busy is not None:
                self.device_busy_seconds_total += busy
                self._unattributed_busy_s += busy  # a prefill step's share: _measure_step decides
        self._completed.append(sched_out)
        if batch is not None and batch.chosen_logprobs is None and self.speculation is None:
            sampled, logprobs = self._plain_tokens(sched_out, batch), None
        else:
            sampled, logprobs = self._sampled_rows(sched_out, batch)
        self.scheduler.update_from_output(sched_out, sampled)
        if batch is not None and batch.features is not None and self.speculation is not None:
            self.speculation.record_features(sched_out, batch.features, sampled)
        if self._guided is not None and self._guided.active:
            stepped = zip(sched_out.scheduled, sampled, strict=True)
            self._advance_grammars([item.seq for item, token in stepped if token is not None])

        outputs: list[RequestOutput] = []
        by_seq = self._by_seq
        lps = [None] * len(sampled) if logprobs is None else logprobs
        for item, token, lp in zip(sched_out.scheduled, sampled, lps, strict=True):
            state = by_seq.get(item.seq.seq_id)
            if token is None or state is None:
                continue
            if isinstance(lp, list):  # one per kept row; those after a stop are never sent
                state.logprobs.extend(x for x in lp if x is not None)
            elif lp is not None:
                state.logprobs.append(lp)
            outputs.append(self._emit(state))
        return outputs

    @staticmethod
    def _plain_tokens(sched_out: SchedulerOutput, batch: SampledBatch) -> list[int | list[int] | None]:
        """Each scheduled sequence's token (None where it did not sample) when no row asked for logprobs
        and none speculates: nearly every step of a large batch, so no object per row."""
        tokens = iter(batch.token_ids())
        return [next(tokens) if item.samples else None for item in sched_out.scheduled]

    def _sampled_rows(
        self, sched_out: SchedulerOutput, batch: SampledBatch | None
    ) -> tuple[list[int | list[int] | None], list[Any]]:
        """Each scheduled sequence's kept token(s) and their logprobs: a speculating sequence keeps the
        drafts the target agrees with, and its next token."""
        results = iter(batch.results() if batch is not None else [])
        sampled: list[int | list[int] | None] = []
        logprobs: list[Any] = []
        for item in sched_out.scheduled:
            r = next(results) if item.samples else None
            if item.spec_token_ids:
                assert r is not None and self.speculation is not None
                rows = [r] + [next(results) for _ in range(item.num_rows - 1)]
                kept_rows = [rows[i] for i in self.speculation.kept_rows(item, [x.token_id for x in rows])]
                kept = [x.token_id for x in kept_rows]
                if self._guided is not None:
                    kept = self._guided.until_complete(item.seq, kept)
                sampled.append(kept)
                logprobs.append([x.logprobs for x in kept_rows[: len(kept)]])
            else:
                sampled.append(r.token_id if r else None)
                logprobs.append(r.logprobs if r else None)
        return sampled, logprobs

    def _emit(self, st: _SeqState) -> RequestOutput:
        seq = st.seq
        tokens, start = seq.token_ids, len(seq.prompt_token_ids)
        end = seq.settled_end()
        new_ids = tokens[start + st.num_sent : end]
        delta_text = ""
        if st.detok is not None:
            before = len(st.detok.ids)
            st.detok.add(new_ids)
            if st.detok.stopped:  # in this step: a stopped sequence is not emitted again
                # a step that kept several tokens (speculation) keeps none after the stop string
                num_used = len(st.detok.ids) - before
                if num_used < len(new_ids):
                    seq.drop_placeholders()
                    del tokens[num_used - len(new_ids) :]
                    end, new_ids = seq.settled_end(), new_ids[:num_used]
                if seq.is_finished:  # by max_tokens or EOS in the same step, after the stop string
                    seq.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(seq, FinishReason.STOP)
            delta_text = st.detok.flush(final=seq.is_finished)
        first, st.num_sent = st.num_sent, end - start
        finished = seq.is_finished
        reason = seq.finish_reason
        out = RequestOutput(
            request_id=st.request_id,
            index=st.index,
            delta_text=delta_text,
            delta_token_ids=new_ids,
            text=st.detok.text if st.detok else "",
            finished=finished,
            finish_reason=reason.value if reason else None,
            delta_logprobs=st.logprobs[first : first + len(new_ids)],  # one per output token
            num_prompt_tokens=start,
            num_cached_tokens=seq.num_cached_tokens,
            tokens=tokens,
            output_start=start,
            output_end=end,
        )
        if finished:
            self._by_seq.pop(seq.seq_id, None)
            if self._guided is not None:
                self._guided.remove(seq)
            rid = out.request_id
            if rid in self._requests and all(s.seq.is_finished for s in self._requests[rid]):
                del self._requests[rid]
        return out

    @property
    def healthy(self) -> bool:
        """False once a tensor-parallel worker failed (even before a step notices); always True alone."""
        return self.executor.healthy

    def shutdown(self) -> None:
        if self._guided is not None:
            self._guided.compiler.shutdown()
        close = getattr(self.speculation.proposer, "close", None) if self.speculation is not None else None
        if callable(close):  # an in-engine draft's graphs, a deployed draft's channel
            close()
        self.executor.shutdown()

    def stats(self) -> CoreStats:
        bm = self.block_manager
        fit = self.step_cost.estimate()
        queue = self._queue_summary.get()
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
            device_wait_seconds_total=self.device_wait_seconds_total,
            device_busy_seconds_total=self.device_busy_seconds_total,
            prefill_device_busy_seconds_total=self.prefill_device_busy_seconds_total,
            prefill_steps=self.prefill_steps,
            prefill_step_seconds_total=self.prefill_step_seconds_total,
            cpu_seconds_total=time.process_time(),
            step_base_s=fit.base_s,
            step_seq_s=fit.per_seq_s,
            step_token_s=fit.per_token_s,
            running_prefill_tokens=queue.running_prefill_tokens,
            num_decoding=queue.num_decoding,
            waiting_queue=queue.waiting_queue,
            decode_left=queue.decode_left,
            inflight_prefill_tokens=-1 if self._inflight is None else prefill_tokens(self._inflight[0]),
            taken_at=time.time(),
            gc_seconds_total=gc_seconds_total(),
            step_cost_samples=fit.num_samples,
            num_requests_added=self.num_requests_added,
            num_requests=len(self._requests),
            spec=self.speculation.snapshot() if self.speculation is not None else None,
        )
