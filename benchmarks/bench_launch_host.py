"""The host's time to launch one decode step from a CUDA graph, by part, on a GPU.

Why: at batch 1 with a draft, the GPU idles while the host plans and launches the step after each verify
(benchmarks/NOTES.md, "Where batch 1's time goes"); the launch measured ~0.5 ms of host time in the graph's
replay path and ~0.3 ms in the greedy head after it. This times each part of `StepGraphs.run` and of the
launch after it on a real step plan (random Llama-3-8B-shape weights), with the device idle before each
launch and with the step before still running, so the parts worth shortening are measured, not guessed.
The parts are timed as the launch ran them before the head moved into the decode graphs (33df242): the
head and argmax launched after the replay. The engine's own launch, timed beside them, no longer does.

    python benchmarks/bench_launch_host.py --batches 1,5 --out $OUT/launch-host.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import LLAMA3_8B, commit, device_name, dummy_engine_config, prompts  # noqa: E402

import fuserve.workers.engine as engine_module  # noqa: E402
from fuserve.configs import config_from_dict  # noqa: E402
from fuserve.sampling_params import SamplingParams  # noqa: E402
from fuserve.workers.cuda_graphs import pack_step, table_width  # noqa: E402
from fuserve.workers.engine import LLMEngine  # noqa: E402
from fuserve.workers.sampler import SampledBatch  # noqa: E402
from fuserve.workers.step_plan import StepPlan  # noqa: E402


def decode_plan(engine: LLMEngine, batch: int) -> StepPlan:
    """A real decode step's plan at this batch (the engine's own, captured as it builds it)."""
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts(batch, 64, LLAMA3_8B["vocab_size"], seed=batch)):
        engine.add_request(f"launch-{batch}-{i}", p, params)
    plans: list[StepPlan] = []
    build = engine_module.build_step_plan

    def keep(*args: Any, **kwargs: Any) -> StepPlan:
        plan = build(*args, **kwargs)
        plans.append(plan)
        return plan

    engine_module.build_step_plan = keep  # type: ignore[assignment]
    try:
        for _ in range(8):
            engine.step()
    finally:
        engine_module.build_step_plan = build  # type: ignore[assignment]
    while engine.has_unfinished():
        engine.step()
    return next(p for p in reversed(plans) if p.max_query_len == 1 and p.num_seqs == batch)


def time_parts(engine: LLMEngine, plan: StepPlan, busy: bool, reps: int) -> dict[str, float]:
    """Median host microseconds of each part of a graphed decode launch."""
    runner = engine.executor.worker.runner  # type: ignore[attr-defined]
    graphs = runner.graphs
    b = graphs.bucket(plan)
    s = graphs.seq_slots(b)
    width = table_width(plan)
    times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        times.setdefault(name, []).append(1e6 * (time.perf_counter() - t0))

    def before() -> None:
        """As the engine launches: with the device idle, or with one step (a bare replay) running."""
        torch.cuda.synchronize()
        if busy:
            graphs.graphs[b].replay()

    for _ in range(reps):
        before()
        with timed("pack_step (within graphs.run)"):
            pack_step(plan, b, s, width)
        with timed("all of the parts below"):
            with timed("cuda event + record"):
                torch.cuda.Event(enable_timing=True).record()
            with timed("graphs.run (inputs, then the replay)"):
                out = graphs.run(plan, b)
            with timed("head + argmax (greedy_tokens)"):
                tokens = runner.model.greedy_tokens(out)
            batch = SampledBatch(tokens)
            with timed("start_copy"):
                batch.start_copy()
        with timed("the head's GEMV alone (within greedy_tokens)"):
            runner.model.lm_head._logits(out)
        before()
        with timed("runner.launch (the engine's path)"):
            runner.launch(plan, None)
    torch.cuda.synchronize()
    return {name: statistics.median(v[reps // 4 :]) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,5")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    # steps read back one at a time: the captured plans hold their input tokens, not placeholders
    sync = {"async_scheduling": "off"}
    cfg = dummy_engine_config(LLAMA3_8B, [max(8, *batches)], 64, 64, False, scheduler=sync)
    engine = LLMEngine(config_from_dict(cfg))
    rows = []
    for batch in batches:
        plan = decode_plan(engine, batch)
        for busy in (False, True):
            parts = time_parts(engine, plan, busy, args.reps)
            rows.append(dict(batch=batch, device_busy=busy, us=parts))
            print(f"batch {batch}, device {'busy' if busy else 'idle'} (us, median):")
            for name, us in parts.items():
                print(f"  {name:<38} {us:8.1f}")
    meta = dict(bench="launch_host", device=device_name(), date=time.strftime("%Y-%m-%d"), commit=commit())
    for r in rows:
        r.update(meta)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    engine.shutdown()


if __name__ == "__main__":
    main()
