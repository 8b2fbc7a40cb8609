"""Where a verify round's host time goes, beside a plain step's: the engine's phases timed per round.

A verify round cannot overlap its host work with the GPU the way async scheduling does for plain
decode: the next round's drafts need this round's accepted tokens. Under the profiler (bench_spec
--profile-steps, 2026-11-29) a round with free drafts kept the GPU idle ~1.2 ms against a plain
step's ~0.24 on an H200. This splits a round's wall time into the engine's phases, each summed over
the run and divided by its rounds (plain steps for the plain row); a generation of --max-tokens less one
of a quarter of it, so that the prefill and the last steps cancel out:

    wait        the host blocked on the step's read-back (the GPU still working)
    complete    the rest of `_complete`: tokens read back, kept rows, scheduler update, outputs
    propose     Speculation.propose (free drafts here: its bookkeeping and adaptive k alone)
    schedule    Scheduler.schedule
    plan        build_step_plan
    launch      Executor.execute: inputs to the device, graph replay queued, sampling queued
    device      the GPU's own time for the step (CUDA events: first kernel to read-back)

Free drafts (the last token k times) with synthetic acceptance, as bench_spec's `repeat` rows.

    python benchmarks/profile_spec_round.py --model llama3-8b --batches 1,8 --ks 3 --out $OUT/r.json
    python benchmarks/profile_spec_round.py --smoke                                # tiny, CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_spec  # noqa: E402
from bench_decode import LLAMA3_8B, TINY, commit, device_name, prompts  # noqa: E402

from fuserve.configs import config_from_dict  # noqa: E402
from fuserve.llm import LLM  # noqa: E402
from fuserve.sampling_params import SamplingParams  # noqa: E402
from fuserve.workers import engine as engine_mod  # noqa: E402
from fuserve.workers.sampler import SampledBatch  # noqa: E402

PHASES = ("wait", "complete", "propose", "schedule", "plan", "launch")


class PhaseTimer:
    """Wraps the engine's phase functions; `complete` is `_complete` less the wait inside it."""

    def __init__(self, llm: LLM) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.device_s = 0.0
        engine = llm.engine
        engine.scheduler.schedule = self._timed("schedule", engine.scheduler.schedule)
        engine.executor.execute = self._timed("launch", engine.executor.execute)
        engine_mod.build_step_plan = self._timed("plan", engine_mod.build_step_plan)
        engine._complete = self._timed("complete", engine._complete)
        engine.executor.wait = self._timed("wait", engine.executor.wait)  # a worker group's wait; else none
        sync = SampledBatch.synchronize
        timer = self

        def synchronize(batch: SampledBatch) -> None:
            t = time.perf_counter()
            sync(batch)
            timer.seconds["wait"] += time.perf_counter() - t

        SampledBatch.synchronize = synchronize  # type: ignore[method-assign]
        busy = SampledBatch.device_seconds

        def device_seconds(batch: SampledBatch) -> float | None:
            s = busy(batch)
            timer.device_s += s or 0.0
            return s

        SampledBatch.device_seconds = device_seconds  # type: ignore[method-assign]

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t

        return wrapper

    def time_propose(self, speculation: bench_spec.Speculation) -> None:
        speculation.propose = self._timed("propose", speculation.propose)  # type: ignore[method-assign]

    def totals(self) -> dict[str, float]:
        """Seconds so far per phase, `device` among them; `complete` less the waits inside it."""
        out = {p: self.seconds[p] for p in PHASES}
        out["complete"] -= out["wait"]
        out["device"] = self.device_s
        return out


def run_totals(
    llm: LLM, timer: PhaseTimer, ids: list[list[int]], max_tokens: int, speculation: Any
) -> tuple[float, int, dict[str, float]]:
    """One generation of `max_tokens` a sequence: (wall seconds, rounds, phase seconds). Rounds are verify
    steps with speculation, steps without."""
    engine = llm.engine
    before = timer.totals()
    steps = engine.num_steps
    rounds0 = speculation.snapshot().num_verify_steps if speculation is not None else 0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    wall_s, _ = bench_spec.generate_timed(llm, [ids], params)
    if speculation is not None:
        rounds = speculation.snapshot().num_verify_steps - rounds0
    else:
        rounds = engine.num_steps - steps
    after = timer.totals()
    return wall_s, rounds, {p: after[p] - before[p] for p in after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama3-8b", "tiny"], default="llama3-8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ks", default="3")
    ap.add_argument("--acceptance", type=float, default=0.7)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batches, args.max_tokens, args.prompt_len = "tiny", "1,2", 24, 16
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    ns = argparse.Namespace(model=args.model, batches=batches, prompt_len=args.prompt_len,
                            max_tokens=args.max_tokens, ks=ks)  # fmt: skip
    config = config_from_dict(bench_spec.engine_config(ns))
    llm = LLM(config)
    bench_spec.keep_drafts(llm.engine)
    timer = PhaseTimer(llm)
    vocab = (TINY if args.model == "tiny" else LLAMA3_8B)["vocab_size"]
    meta = dict(model=args.model, device=device_name(), date=dt.date.today().isoformat(), commit=commit())
    rows = []
    for batch in batches:
        ids = prompts(batch, args.prompt_len, vocab, seed=batch)
        for k in [0, *ks]:
            engine = llm.engine
            speculation = None
            if k:
                spec = config.speculative.model_copy(update=dict(num_speculative_tokens=k, adaptive=False))
                speculation = bench_spec.SyntheticAcceptance(
                    spec, bench_spec.RepeatLastProposer(), args.acceptance, 1
                )
                timer.time_propose(speculation)
            engine.speculation = speculation
            run_totals(llm, timer, ids, 16, speculation)  # warm-up
            # a long and a short generation, differenced: the prefill and the last steps cancel out
            short_s, short_rounds, short = run_totals(llm, timer, ids, args.max_tokens // 4, speculation)
            long_s, long_rounds, long = run_totals(llm, timer, ids, args.max_tokens, speculation)
            rounds = long_rounds - short_rounds
            row = dict(meta, batch=batch, k=k, synthetic_acceptance=args.acceptance if k else None,
                       rounds=rounds, round_ms=1e3 * (long_s - short_s) / rounds)  # fmt: skip
            row.update({f"{p}_ms": 1e3 * (long[p] - short[p]) / rounds for p in long})
            row["idle_ms"] = row["round_ms"] - row["device_ms"]
            rows.append(row)
            print(f"b={batch:<3} k={k}  round {row['round_ms']:6.3f} ms  device {row['device_ms']:6.3f}  "
                  f"idle {row['idle_ms']:6.3f} | " + "  ".join(f"{p} {row[p + '_ms']:.3f}" for p in PHASES),
                  flush=True)  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
