"""Offline throughput shaped like TensorRT-LLM's `trtllm-bench throughput`: fixed input/output lengths,
random prompt tokens, ignore_eos, every request submitted at once to the in-process engine, output
tokens per second under maximum load. Llama-3-8B shape, random weights (load_format dummy), one engine
per scheme (bf16 = none, fp8 W8A8, int8-wo), each row beside TensorRT-LLM's published FP8 figure for
Llama-3.1-8B on one H100.

Per engine: build (CUDA graphs for decode batches up to --max-num-seqs), warm up (one forward at each
power-of-two token count up to the step budget, so the 8-bit GEMM's per-M autotuning happens before
the clock), then per shape:
  - the batch limit: as many sequences as the KV pool holds whole (input + output tokens each), at most
    --max-num-seqs. The scheduler gets it as max_num_seqs, so no sequence is ever preempted
    (TensorRT-LLM's default GUARANTEED_NO_EVICT admits the same way);
  - requests: --num-requests, default 3x the batch limit or more than could finish in the budget at
    30,000 output tok/s (5,860 at 128/128; TensorRT-LLM ran e.g. 3,000 there), so the queue never
    runs dry before the clock stops;
  - the clock runs from the first step; at --time-budget-s it stops counting, the rest are aborted,
    and the rates are what was actually generated over the elapsed time (no drain tail).
Rows: output tok/s, total tok/s (input tokens of every request that got its first token + output
tokens), requests/s (completed), mean batch (tokens sampled per step), mean running sequences, the KV
capacity in tokens, and `trtllm_fp8_output_tok_s` with the ratio. Flat JSON rows (DESIGN.md's schema)
go to --out (default $OUT/throughput-DATE.json).

    python benchmarks/bench_throughput.py                     # one H100: 4 shapes x 3 schemes, ~8 min
    python benchmarks/bench_throughput.py --smoke --out x.json # tiny model on the CPU, seconds
    fuserve bench throughput ...                               # the same script, from a checkout
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# `fuserve bench throughput` loads this file by path: its folder is not on sys.path there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (  # noqa: E402
    LLAMA3_8B,
    TINY,
    commit,
    copy_bandwidth,
    device_name,
    dummy_engine_config,
    prompts,
)
from host_speed import host_cpu  # noqa: E402
from step_window_profile import print_profile, print_sync_sites, sync_sites  # noqa: E402
from step_window_profile import profile_steps as profile_window  # noqa: E402

SHAPES = "128/128,128/2048,1000/1000,2048/2048"
SCHEMES = "none,fp8,int8-wo"
# TensorRT-LLM's perf overview, Llama-3.1-8B FP8 (ModelOpt checkpoint), one H100 SXM, output tok/s
TRTLLM_FP8_OUTPUT_TOK_S = {(128, 128): 28312, (128, 2048): 22714, (1000, 1000): 15220, (2048, 2048): 9305}


@dataclass
class ShapeResult:
    input_len: int
    output_len: int
    batch_limit: int
    num_requests: int
    completed_requests: int
    started_requests: int
    output_tokens: int
    elapsed_s: float
    submit_s: float
    cut_by_budget: bool
    num_steps: int
    mean_batch: float
    mean_running: float
    num_preemptions: int
    profile: dict[str, Any] | None = None
    sync_sites: list[dict[str, Any]] | None = None
    allocator: dict[str, int] | None = None
    step_ms: list[float] | None = None
    step_tokens: list[int] | None = None
    # the host's wait for the GPU's results (a GPU-bound run waits most of its time) and its CPU time
    device_wait_s: float = 0.0
    host_cpu_s: float = 0.0

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_s(self) -> float:
        return (self.started_requests * self.input_len + self.output_tokens) / self.elapsed_s

    @property
    def request_per_s(self) -> float:
        return self.completed_requests / self.elapsed_s


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'128/128,1000/1000' -> [(128, 128), (1000, 1000)]."""
    shapes = []
    for item in text.split(","):
        try:
            inp, out = (int(x) for x in item.split("/"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not INPUT/OUTPUT (e.g. 128/2048)") from None
        if inp < 1 or out < 1:
            raise SystemExit(f"--shapes: {item!r} needs at least one input and one output token")
        shapes.append((inp, out))
    return shapes


def batch_limit(num_blocks: int, block_size: int, input_len: int, output_len: int, max_num_seqs: int) -> int:
    """Sequences the KV pool holds whole (prompt + every output token), at most max_num_seqs."""
    blocks_per_seq = -(-(input_len + output_len) // block_size)
    return max(1, min(max_num_seqs, num_blocks // blocks_per_seq))


def default_num_requests(batch: int, output_len: int, time_budget_s: float, saturate_tok_s: float) -> int:
    """3x the batch limit, and more where the engine could finish those within the budget at
    `saturate_tok_s`: the queue must not run dry before the clock stops (a drain tail of part-full
    batches would count against the engine)."""
    return max(3 * batch, -(-int(saturate_tok_s * time_budget_s) // output_len))


def warm_up(engine: Any, max_tokens: int) -> None:
    """One forward at each power-of-two token count up to the step budget (the 8-bit GEMM autotunes once
    per power-of-two M), then a few requests through the whole engine."""
    from fuserve.sampling_params import SamplingParams

    worker = engine.executor.worker
    bs = engine.block_manager.block_size
    m = 1
    while m <= max_tokens:
        seqs = -(-m // engine.max_model_len)  # positions stay inside the rotary table
        blocks = min(worker.num_blocks, -(-(m // seqs) // bs))
        worker.runner.profile(m, seqs, blocks)  # slots -1: writes nothing
        m *= 2
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts(8, 16, engine.arch.vocab_size, seed=0)):
        engine.add_request(f"warm-up-{i}", p, params)
    while engine.has_unfinished():
        engine.step()


ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def allocator_counts() -> dict[str, int]:
    """The CUDA caching allocator's counters that mean a device-wide wait: a cudaMalloc that failed and
    emptied the cache to retry, and every cudaMalloc/cudaFree (cudaFree waits for the whole device);
    CUDA's sync debug mode does not see these. Empty on a CPU."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def run_shape(
    engine: Any,
    input_len: int,
    output_len: int,
    batch: int,
    num_requests: int,
    time_budget_s: float,
    seed: int = 0,
    profile_steps: int = 0,
    profile_after_s: float = 4.0,
    sync_check_steps: int = 0,
) -> ShapeResult:
    """Submit every request, step until done or past the budget, abort the rest and drain. With
    profile_steps, that many steps from profile_after_s on run under the CUDA profiler (counted, as
    every step is; the profiler's own cost slows them a little). With sync_check_steps, that many steps
    from profile_after_s (after the profile's) run with CUDA's sync debug mode on, their waits listed."""
    from fuserve.sampling_params import SamplingParams

    engine.scheduler.config.max_num_seqs = batch  # the benchmark's own engine: admit what fits whole
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    tag = f"tp-{input_len}-{output_len}-{seed}"
    t0 = time.perf_counter()
    pending = set()
    for i, p in enumerate(prompts(num_requests, input_len, engine.arch.vocab_size, seed=seed)):
        rid = f"{tag}-{i}"
        engine.add_request(rid, p, params)
        pending.add(rid)
    submit_s = time.perf_counter() - t0
    print(f"{tag}: {num_requests} requests submitted, timing {time_budget_s:g} s", flush=True)
    preemptions0 = engine.scheduler.num_preemptions
    steps = output_tokens = started = completed = running_sum = 0
    cut = False
    profile: dict[str, Any] | None = None
    syncs: list[dict[str, Any]] | None = None
    step_ms: list[float] = []  # each step's wall time and output tokens: prompt waves show as slow steps
    step_tokens: list[int] = []
    wait0, cpu0 = engine.device_wait_seconds_total, time.process_time()
    alloc0 = allocator_counts()
    start = last = time.perf_counter()
    while engine.has_unfinished():
        if profile_steps and profile is None and time.perf_counter() - start >= profile_after_s:
            batches: list[list] = []
            profile = profile_window(lambda b=batches: b.append(engine.step()), profile_steps)
            print_profile(profile)
        elif sync_check_steps and syncs is None and time.perf_counter() - start >= profile_after_s:
            batches = []
            syncs = sync_sites(lambda b=batches: b.append(engine.step()), sync_check_steps)
            print_sync_sites(syncs)
        else:
            batches = [engine.step()]
        now = time.perf_counter()
        for b in batches:  # a profiled window's steps each get the window's mean time
            step_ms.append(round((now - last) * 1e3 / len(batches), 2))
            step_tokens.append(sum(len(o.delta_token_ids) for o in b))
        last = now
        steps += len(batches)
        running_sum += len(engine.scheduler.running) * len(batches)
        outs = [o for b in batches for o in b]
        for o in outs:
            n = len(o.delta_token_ids)
            output_tokens += n
            started += int(n > 0 and len(o.token_ids) == n)  # its first output token(s)
            if o.finished:
                completed += 1
                pending.discard(o.request_id)
        if time.perf_counter() - start >= time_budget_s:
            cut = engine.has_unfinished()
            break
    elapsed = time.perf_counter() - start
    device_wait_s, host_cpu_s = engine.device_wait_seconds_total - wait0, time.process_time() - cpu0
    allocator = {k: v - alloc0[k] for k, v in allocator_counts().items()}
    for rid in pending:
        engine.abort(rid)
    while engine.has_unfinished():  # the step still in flight
        engine.step()
    return ShapeResult(
        input_len=input_len,
        output_len=output_len,
        batch_limit=batch,
        num_requests=num_requests,
        completed_requests=completed,
        started_requests=started,
        output_tokens=output_tokens,
        elapsed_s=elapsed,
        submit_s=submit_s,
        cut_by_budget=cut,
        num_steps=steps,
        mean_batch=output_tokens / max(1, steps),
        mean_running=running_sum / max(1, steps),
        num_preemptions=engine.scheduler.num_preemptions - preemptions0,
        profile=profile,
        sync_sites=syncs,
        allocator=allocator,
        step_ms=step_ms,
        step_tokens=step_tokens,
        device_wait_s=device_wait_s,
        host_cpu_s=host_cpu_s,
    )


def build_engine(args: argparse.Namespace, scheme: str, shapes: list[tuple[int, int]]) -> tuple[Any, float]:
    from fuserve.configs import config_from_dict
    from fuserve.gc_tuning import quiet_gc
    from fuserve.workers.engine import LLMEngine

    cache: dict[str, Any] = {
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    if args.num_blocks:
        cache["num_blocks"] = args.num_blocks
    config = config_from_dict(
        dummy_engine_config(
            TINY if args.smoke else LLAMA3_8B,
            [args.max_num_seqs],
            max(i for i, _ in shapes),
            max(o for _, o in shapes),
            args.smoke,
            model={"quantization": scheme},
            cache=cache,
            scheduler={
                "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens,
            },
        )
    )
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    warm_up(engine, args.max_num_batched_tokens)
    quiet_gc()  # as in the served engine core: start-up's heap out of every collection (gc_tuning.py)
    return engine, time.perf_counter() - t0


def rows_for_scheme(args: argparse.Namespace, scheme: str, shapes: list[tuple[int, int]]) -> list[dict]:
    engine, init_s = build_engine(args, scheme, shapes)
    worker = engine.executor.worker
    bs = engine.block_manager.block_size
    kv_tokens = worker.num_blocks * bs
    rows = []
    for input_len, output_len in shapes:
        batch = batch_limit(worker.num_blocks, bs, input_len, output_len, args.max_num_seqs)
        num_requests = args.num_requests or default_num_requests(
            batch, output_len, args.time_budget_s, args.saturate_tok_s
        )
        result = run_shape(
            engine,
            input_len,
            output_len,
            batch,
            num_requests,
            args.time_budget_s,
            profile_steps=args.profile_steps,
            profile_after_s=args.profile_after_s,
            sync_check_steps=args.sync_check_steps,
        )
        trt = TRTLLM_FP8_OUTPUT_TOK_S.get((input_len, output_len))
        row = dict(
            bench="throughput",
            engine="fuserve",
            quantization=scheme,
            kv_cache_dtype=args.kv_cache_dtype,
            kv_tokens=kv_tokens,
            max_num_batched_tokens=args.max_num_batched_tokens,
            time_budget_s=args.time_budget_s,
            init_s=init_s,
            **asdict(result),
            output_tok_s=result.output_tok_s,
            total_tok_s=result.total_tok_s,
            request_per_s=result.request_per_s,
            trtllm_fp8_output_tok_s=trt,
            ratio_vs_trtllm_fp8=result.output_tok_s / trt if trt else None,
        )
        rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("step_ms", "step_tokens", "profile", "sync_sites")}
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in shown.items()}, flush=True)
    engine.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'scheme':<8}{'KV':>5}{'in/out':>11}{'batch':>7}{'KV tokens':>11}{'reqs done':>10}{'s':>6}"
        f"{'out tok/s':>11}{'total tok/s':>12}{'req/s':>8}{'mean B':>8}{'TRT fp8':>9}{'x TRT':>7}"
    )
    for r in rows:
        print(
            f"{r['quantization']:<8}{r['kv_cache_dtype']:>5}{r['input_len']:>6}/{r['output_len']:<4}"
            f"{r['batch_limit']:>7}{r['kv_tokens']:>11}{r['completed_requests']:>10}{r['elapsed_s']:>6.1f}"
            f"{r['output_tok_s']:>11.0f}{r['total_tok_s']:>12.0f}{r['request_per_s']:>8.1f}"
            f"{r['mean_batch']:>8.0f}{r['trtllm_fp8_output_tok_s'] or 0:>9}"
            f"{r['ratio_vs_trtllm_fp8'] or 0:>7.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help=f"INPUT/OUTPUT lengths, comma-separated ({SHAPES})")
    ap.add_argument("--schemes", default=SCHEMES, help="weight schemes (none = bf16), one engine each")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--num-requests", type=int, default=0, help="per shape (default: see --saturate-tok-s)")
    ap.add_argument(
        "--saturate-tok-s",
        type=float,
        default=30000.0,
        help="default request count: 3x the batch limit, or what this rate would finish in the budget",
    )
    ap.add_argument("--time-budget-s", type=float, default=25.0, help="per shape: stop counting after this")
    ap.add_argument("--max-num-seqs", type=int, default=1024, help="largest batch (and CUDA graph)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget of one step")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--num-blocks", type=int, default=0, help="fix the KV pool (blocks of 16 tokens)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script runs")
    ap.add_argument(
        "--profile-steps", type=int, default=0, help="profile this many steps of each shape (CUDA kernels)"
    )
    ap.add_argument(
        "--profile-after-s",
        type=float,
        default=4.0,
        help="start the profile this far into the shape's clock (0: the first wave's prompt steps)",
    )
    ap.add_argument(
        "--sync-check-steps",
        type=int,
        default=0,
        help="list where the host waits for the GPU over this many steps (from --profile-after-s)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:  # seconds on a CPU; the pool binds the 24/24 shape's batch (3 blocks a sequence)
        args.shapes = args.shapes if args.shapes != SHAPES else "8/8,24/24"
        args.max_num_seqs, args.max_num_batched_tokens = 16, 256
        args.num_blocks = args.num_blocks or 24
        args.time_budget_s = min(args.time_budget_s, 20.0)
        args.saturate_tok_s = 0.0  # 3x the batch limit: every request finishes
    if (args.profile_steps or args.sync_check_steps) and not torch.cuda.is_available():
        raise SystemExit("--profile-steps and --sync-check-steps watch CUDA: run them on a GPU or drop them")
    if args.max_num_batched_tokens < args.max_num_seqs:
        raise SystemExit(
            "--max-num-batched-tokens must be at least --max-num-seqs, or a full batch of decodes "
            "does not fit one step"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = parse_shapes(args.shapes)
    bw = copy_bandwidth()
    print(f"{device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict[str, Any]] = []
    for scheme in args.schemes.split(","):
        rows += rows_for_scheme(args, scheme, shapes)
    meta = dict(
        model="tiny" if args.smoke else "llama3-8b",
        device=device_name(),
        date=dt.date.today().isoformat(),
        commit=commit(),
        copy_tb_s=bw / 1e12,
        **host_cpu(),
    )
    for r in rows:
        r.update(meta)
    print_table(rows)
    default_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out = Path(args.out) if args.out else default_dir / f"throughput-{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
