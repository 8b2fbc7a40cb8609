"""The engine's host work per decode step at a large batch, on the CPU.

A one-layer, 16-wide dummy Llama keeps the forward small, so a step's CPU time is mostly the
scheduler, the step plan and the output handling, as the engine-core process runs them (with its
per-step output message and stats): what bounds a GPU engine that serves 256 streams or runs ~1,024
sequences a step (the offline throughput benchmark) when the GPU step is shorter than them.

    OMP_NUM_THREADS=1 python benchmarks/bench_host_step.py --batch 1024     # ~1 min on a 2-core box
    OMP_NUM_THREADS=1 python benchmarks/bench_host_step.py --batch 256 --prompt-len 512 --profile /tmp/p
    OMP_NUM_THREADS=1 python benchmarks/bench_host_step.py --batch 1024 --waiting 4800  # the offline queue
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import time

from bench_decode import TINY, dummy_engine_config

from fuserve.configs import config_from_dict
from fuserve.gc_tuning import quiet_gc
from fuserve.sampling_params import SamplingParams
from fuserve.workers.engine import LLMEngine
from fuserve.workers.engine_core import seq_output


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--output-len", type=int, default=100, help="tokens per request; the timed steps are its last ones"
    )
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument(
        "--waiting",
        type=int,
        default=0,
        help="requests queued behind the full batch (the offline throughput run keeps ~4,800 waiting)",
    )
    ap.add_argument("--profile", help="write cProfile stats of the timed steps to this file")
    ap.add_argument(
        "--gc",
        choices=("quiet", "python"),
        default="quiet",
        help="the engine core's collector settings (gc_tuning.quiet_gc), or Python's defaults",
    )
    args = ap.parse_args()
    out_len = max(args.output_len, args.steps + 20)
    b = args.batch
    # one layer 16 wide: the forward is small beside the host's work
    hf = dict(TINY, vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    hf.update(num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=1024)
    config = config_from_dict(
        dummy_engine_config(
            hf,
            [b],
            args.prompt_len,
            100,
            smoke=True,
            model={"device": "cpu", "max_model_len": max(1024, args.prompt_len + out_len + 16)},
            cache={"num_blocks": b * ((args.prompt_len + out_len) // 16 + 2) + 64},
            scheduler={"max_num_batched_tokens": 65536},
        )
    )
    engine = LLMEngine(config, detokenize=False)
    if args.gc == "quiet":
        quiet_gc()
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    profiler = cProfile.Profile() if args.profile else None
    # the CPU forward (its paged-attention reference gathers every sequence's KV: ~60% of a step at
    # 1,024 rows, py-spy 2026-11-27) is a few kernel launches on a GPU: timed apart, so the host's own
    # work is the step less it
    runner = engine.executor.worker.runner
    forward_s = [0.0]
    plain_forward = runner.forward_plan

    def timed_forward(*a: object, **k: object) -> object:
        t0 = time.process_time()
        try:
            return plain_forward(*a, **k)
        finally:
            forward_s[0] += time.process_time() - t0

    runner.forward_plan = timed_forward

    def core_step() -> None:
        """A step as the engine-core process serves it: the step, its one message's outputs, stats."""
        [seq_output(o) for o in engine.step()]
        engine.stats()

    cpu_ms, host_ms = [], []
    for rep in range(args.passes):
        for i in range(b):
            engine.add_request(f"r{rep}-{i}", [1 + j % 250 for j in range(args.prompt_len)], params)
        queued = [f"w{rep}-{i}" for i in range(args.waiting)]
        for rid in queued:
            engine.add_request(rid, [1 + j % 250 for j in range(args.prompt_len)], params)
        for _ in range(out_len - args.steps - 5):  # the timed steps carry the longest outputs
            core_step()
        start, forward_s[0] = time.process_time(), 0.0
        if profiler:
            profiler.enable()
        for _ in range(args.steps):
            core_step()
        if profiler:
            profiler.disable()
        cpu_ms.append((time.process_time() - start) / args.steps * 1e3)
        host_ms.append(cpu_ms[-1] - forward_s[0] / args.steps * 1e3)
        for rid in queued:  # never admitted while the batch runs: not generated at all
            engine.abort(rid)
        while engine.has_unfinished():
            core_step()
    if profiler:
        profiler.dump_stats(args.profile)
    print(
        f"batch {b}, collector {args.gc}: CPU ms per step {[round(x, 1) for x in cpu_ms]}, "
        f"median {statistics.median(cpu_ms):.1f}; without the CPU forward (the host's own work) "
        f"{[round(x, 1) for x in host_ms]}, median {statistics.median(host_ms):.1f}"
    )


if __name__ == "__main__":
    main()
