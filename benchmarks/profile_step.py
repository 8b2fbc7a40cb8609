"""Where a decode step's time goes: host phases of `LLMEngine.step` vs the GPU's own time.

Builds the Llama-3-8B-shape engine (dummy bf16 weights), runs decode at each batch size, and
reports per step: scheduling, plan building, launch (queuing graph replay + logits + sampling),
output processing; plus the graph replay alone and lm_head + argmax alone, timed with
CUDA events. The gap between the step and the GPU time is host overhead the GPU sits idle for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from functools import partial

import torch
from bench_decode import LLAMA3_8B, TINY, prompts
from step_window_profile import profile_steps

from fuserve.configs import config_from_dict
from fuserve.sampling_params import SamplingParams
from fuserve.workers import engine as engine_mod
from fuserve.workers.engine import LLMEngine
from fuserve.workers.step_plan import build_step_plan


def gpu_ms(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_table(fn, reps: int = 10) -> list[tuple[str, float, int]]:
    """GPU kernel time per call of fn, by kernel family: [(name, ms per call, launches per call)]."""
    fn()
    torch.cuda.synchronize()
    result = profile_steps(fn, reps, top=20)
    rows = [(k["kernel"], k["ms_per_step"], round(k["launches_per_step"])) for k in result["kernels"]]
    for name, ms, n in rows[:12]:
        print(f"    {ms:7.3f} ms  x{n:<4} {name}")
    return rows


def logits_argmax(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(hidden).argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = TINY if args.smoke else LLAMA3_8B
    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(
        config_from_dict(
            {
                "model": {"load_format": "dummy", "hf_config": cfg, "max_model_len": 512},
                "scheduler": {"max_num_seqs": max(batches), "max_num_batched_tokens": 8192},
                "kernels": {"cuda_graph_max_batch": max(batches)},
            }
        )
    )
    timers: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            timers[name].append(time.perf_counter() - t)
            return r

        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.executor.worker.runner.launch = timed("launch", engine.executor.worker.runner.launch)
    engine.scheduler.update_from_output = timed("update", engine.scheduler.update_from_output)
    engine_mod.build_step_plan = timed("plan", build_step_plan)
    rows = []
    for batch in batches:
        for i, p in enumerate(prompts(batch, 128, cfg["vocab_size"], seed=batch)):
            engine.add_request(
                f"{batch}-{i}",
                p,
                SamplingParams(max_tokens=args.steps + 20, temperature=0.0, ignore_eos=True),
            )
        engine.step()  # prefill
        timers.clear()
        steps = []
        for _ in range(args.steps):
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        # GPU-only figures on the last plan shape
        seqs = list(engine.scheduler.running)
        row = {"batch": batch, "step_ms": 1e3 * statistics.median(steps)}
        for k, v in timers.items():
            row[k + "_ms"] = 1e3 * statistics.median(v)
        graphs = engine.executor.worker.runner.graphs
        if graphs is not None and seqs:
            import bisect

            b = graphs.buckets[bisect.bisect_left(graphs.buckets, batch)]
            row["graph_replay_ms"] = gpu_ms(graphs.graphs[b].replay)
            hidden = torch.randn(batch, cfg["hidden_size"], device="cuda", dtype=torch.bfloat16)
            row["lm_head_argmax_ms"] = gpu_ms(partial(logits_argmax, engine.executor.worker.model, hidden))
            row["top_kernels"] = kernel_table(graphs.graphs[b].replay)
        if batch == max(batches):
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                engine.step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        rows.append(row)
        print(row, flush=True)
        while engine.has_unfinished():
            engine.step()
    print("\nbatch  step  schedule  plan   launch  update | graph replay  lm_head+argmax (GPU)")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['step_ms']:6.2f} {r.get('schedule_ms', 0):8.3f} {r.get('plan_ms', 0):5.3f} "
            f"{r.get('launch_ms', 0):8.3f} {r.get('update_ms', 0):6.3f} | "
            f"{r.get('graph_replay_ms', 0):12.3f} "
            f"{r.get('lm_head_argmax_ms', 0):14.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
