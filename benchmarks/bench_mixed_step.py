"""A step with prompt tokens beside decodes: eager against its CUDA graph (MixedGraphs), and the
decode-only step of the same batch, on one GPU.

Llama-3-8B shape, random bf16 weights. Each row is B decodes at context C plus one prompt chunk of P
tokens, run straight through the engine's model runner (no scheduler). Per row:
  sync_ms       one step, launch to the end of its GPU work (what a step costs when nothing overlaps)
  pipelined_ms  steps queued back to back, per step: max(host launch, GPU), what async scheduling sees
  gpu_ms        CUDA-event time of one step (the GPU's own work; eager launches show where it waits)
and the graphed hidden states against the eager ones (max abs difference, argmax agreement of the
logits). The decode-only row is the same B decodes through the decode graphs: the floor a mixed step
could reach with its prompt tokens free.

    python benchmarks/bench_mixed_step.py --out $OUT/mixed-step.json     # GPU
    python benchmarks/bench_mixed_step.py --smoke                        # CPU: the eager path only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_decode import LLAMA3_8B, TINY, commit, device_name

from fuserve.configs import config_from_dict
from fuserve.workers.engine import LLMEngine
from fuserve.workers.model_runner import ModelRunner
from fuserve.workers.step_plan import StepPlan


def mixed_plan(decodes: int, context: int, prompt: int, block_size: int, vocab: int, seed: int) -> StepPlan:
    """B decodes at `context` tokens and one fresh prompt of `prompt` tokens, each sequence in its own
    run of blocks (block ids from 1; block 0 stays scratch), every sequence sampling its last token."""
    g = torch.Generator().manual_seed(seed)
    plan = StepPlan()
    lengths = [(1, context)] * decodes + ([(prompt, prompt)] if prompt else [])
    next_block = 1
    for new, ctx in lengths:
        table = list(range(next_block, next_block + -(-ctx // block_size)))
        next_block += len(table)
        start = ctx - new
        plan.input_ids += torch.randint(0, vocab, (new,), generator=g).tolist()
        plan.positions += list(range(start, ctx))
        plan.slot_mapping += [table[p // block_size] * block_size + p % block_size for p in range(start, ctx)]
        plan.query_start_loc.append(plan.query_start_loc[-1] + new)
        plan.context_lens.append(ctx)
        plan.block_tables.append(table)
    plan.sample_rows = list(range(len(lengths)))
    return plan


def step(runner: ModelRunner, plan: StepPlan) -> torch.Tensor:
    hidden = runner.forward_plan(plan)
    assert hidden is not None
    return runner.model.compute_logits(hidden)


def timings(fn: Callable[[], object], reps: int, cuda: bool) -> dict[str, float]:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    lat = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        lat.append(1e3 * (time.perf_counter() - t))
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    row = {"sync_ms": statistics.median(lat), "pipelined_ms": 1e3 * (time.perf_counter() - t) / reps}
    if cuda:
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        sync()
        row["gpu_ms"] = statistics.median(s.elapsed_time(e) for s, e in events)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16x128,64x128,128x128,16x384,64x384,0x256,0x512",
                    help="comma-separated DECODESxPROMPT")  # fmt: skip
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    cfg = TINY if args.smoke else LLAMA3_8B
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.smoke:
        shapes, args.context, args.reps = [(4, 3), (2, 16)], 20, 2
    max_seqs = max(d for d, _ in shapes) + 1
    engine = LLMEngine(
        config_from_dict(
            {
                "model": {"load_format": "dummy", "hf_config": cfg, "max_model_len": 2048,
                          "device": "cuda" if cuda else "cpu"},
                "scheduler": {"max_num_seqs": max_seqs, "max_num_batched_tokens": 2048},
                "kernels": {"cuda_graph_max_batch": max_seqs, "cuda_graph_max_tokens": 512},
            }
        )
    )  # fmt: skip
    worker = engine.executor.worker
    runner: ModelRunner = worker.runner
    mixed_graphs = runner.mixed_graphs
    block_size = engine.config.cache.block_size
    rows = []
    for decodes, prompt in shapes:
        plan = mixed_plan(decodes, args.context, prompt, block_size, cfg["vocab_size"], seed=decodes + prompt)
        row: dict = {"decodes": decodes, "prompt": prompt, "context": args.context, "tokens": plan.num_tokens}
        runner.mixed_graphs = None
        eager_logits = step(runner, plan).float()
        row["eager"] = timings(lambda plan=plan: step(runner, plan), args.reps, cuda)
        runner.mixed_graphs = mixed_graphs
        bucket = mixed_graphs.bucket(plan) if mixed_graphs is not None else None
        if bucket is not None:
            row["bucket"] = bucket
            graph_logits = step(runner, plan).float()
            row["graphed"] = timings(lambda plan=plan: step(runner, plan), args.reps, cuda)
            row["max_abs_logit_diff"] = float((graph_logits - eager_logits).abs().max())
            row["argmax_agree"] = float((graph_logits.argmax(-1) == eager_logits.argmax(-1)).float().mean())
            ratio = row["graphed"]["pipelined_ms"] / row["eager"]["pipelined_ms"]
            row["graphed_over_eager_pipelined"] = ratio
        if decodes:
            decode_plan = mixed_plan(decodes, args.context, 0, block_size, cfg["vocab_size"], seed=decodes)
            row["decode_only"] = timings(lambda p=decode_plan: step(runner, p), args.reps, cuda)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'B':>4} {'P':>4} {'T':>4} | eager sync/pipe/gpu ms | graphed sync/pipe/gpu | decode | ratio")
    for r in rows:
        e, g, d = r["eager"], r.get("graphed"), r.get("decode_only")
        gs = f"{g['sync_ms']:6.2f} {g['pipelined_ms']:6.2f} {g.get('gpu_ms', 0):6.2f}" if g else " " * 20
        ds = f"{d['pipelined_ms']:6.2f}" if d else " " * 6
        ratio = f"{r['graphed_over_eager_pipelined']:.2f}x" if g else "-"
        es = f"{e['sync_ms']:6.2f} {e['pipelined_ms']:6.2f} {e.get('gpu_ms', 0):6.2f}"
        print(f"{r['decodes']:>4} {r['prompt']:>4} {r['tokens']:>4} | {es} | {gs} | {ds} | {ratio}")
    result = {
        "bench": "mixed-step",
        "device": device_name() if cuda else "cpu",
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "model": "llama3-8b-shape" if not args.smoke else "tiny",
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    engine.shutdown()


if __name__ == "__main__":
    main()
