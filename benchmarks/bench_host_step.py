"""The engine's host work per decode step at a large batch, on the CPU.

A one-layer, 16-wide dummy Llama keeps the forward small, so a step's CPU time is mostly the
scheduler, the step plan and the output handling: what bounds a GPU engine that runs ~1,024 sequences
a step (the offline throughput benchmark) if the GPU step is shorter than them.

    OMP_NUM_THREADS=1 python benchmarks/bench_host_step.py --batch 1024     # ~1 min on a 2-core box
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_decode import TINY, dummy_engine_config

from fuserve.configs import config_from_dict
from fuserve.sampling_params import SamplingParams
from fuserve.workers.engine import LLMEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--output-len", type=int, default=100, help="tokens per request; the timed steps are its last ones"
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
            64,
            100,
            smoke=True,
            model={"device": "cpu", "max_model_len": 1024},
            cache={"num_blocks": b * ((64 + out_len) // 16 + 2) + 64},
            scheduler={"max_num_batched_tokens": 65536},
        )
    )
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    cpu_ms = []
    for rep in range(args.passes):
        for i in range(b):
            engine.add_request(f"r{rep}-{i}", list(range(1, 65)), params)
        for _ in range(out_len - args.steps - 5):  # the timed steps carry the longest outputs
            engine.step()
        start = time.process_time()
        for _ in range(args.steps):
            engine.step()
        cpu_ms.append((time.process_time() - start) / args.steps * 1e3)
        while engine.has_unfinished():
            engine.step()
    print(
        f"batch {b}: CPU ms per step {[round(x, 1) for x in cpu_ms]}, median {statistics.median(cpu_ms):.1f}"
    )


if __name__ == "__main__":
    main()
