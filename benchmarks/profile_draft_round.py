"""Where a draft round's time goes: the Llama-3.2-1B-shape draft (random bf16 weights, its decode graphs)
in this process, rounds as the engine sends them (each keeps `--accept` drafts and adds one token), at
batch 1 and 8 and k = 1, 2, 4: the round's wall time, the GPU time of one graph replay and of the head
alone (CUDA events), and a torch profiler table of a few rounds at k = 4. A round's time less k forwards'
GPU time is what the host adds.

    python benchmarks/profile_draft_round.py --out $OUT/draft-round.json       # GPU
    python benchmarks/profile_draft_round.py --smoke                            # tiny, CPU: still runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import commit, device_name  # noqa: E402
from bench_spec_channel import LLAMA32_1B, TINY, time_rounds  # noqa: E402
from profile_step import gpu_ms  # noqa: E402
from step_window_profile import profile_steps  # noqa: E402

from fuserve.configs import config_from_dict  # noqa: E402
from fuserve.speculative.draft_runner import DraftRunner  # noqa: E402


def dummy_draft_runner(
    shape: dict[str, Any], gpu: bool, num_blocks: int, max_seqs: int, max_model_len: int = 4096
) -> DraftRunner:
    """A draft of this shape with random weights, alone in this process on the GPU (bf16, its decode
    graphs up to `max_seqs` rows) or the CPU (fp32)."""
    config = config_from_dict(
        {
            "cache": {"num_blocks": num_blocks},
            "scheduler": {"max_num_seqs": max_seqs},
            "kernels": {"cuda_graph_max_batch": max_seqs},
            "speculative": {
                "method": "draft",
                "draft": {"load_format": "dummy", "hf_config": shape, "max_model_len": max_model_len,
                          "dtype": "bfloat16" if gpu else "float32"},
                "placement": {"device": "cuda" if gpu else "cpu"},
            },
        }
    )  # fmt: skip
    return DraftRunner.from_config(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--accept", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    context, n = (32, 5) if args.smoke else (512, 60)
    runner = dummy_draft_runner(LLAMA32_1B if gpu else TINY, gpu, 8 * (-(-(context + n * 6 + 16) // 16)), 8)
    base = dict(bench="draft_round", device=device_name(), commit=commit(), date=time.strftime("%Y-%m-%d"))
    rows: list[dict[str, Any]] = []
    prompts = [[(i * 31 + j) % 500 for j in range(context)] for i in range(8)]
    for batch in (1, 8):
        for k in (1, 2, 4):
            time_rounds(runner, batch, 3, prompts[:batch], args.accept, k)  # warm-up
            t = time_rounds(runner, batch, n, prompts[:batch], args.accept, k)
            rows.append(
                dict(base, batch=batch, k=k, accept=args.accept, ms_p50=statistics.median(t), ms_min=min(t))
            )
            print(f"batch {batch} k={k}: round p50 {rows[-1]['ms_p50']:.2f} ms, min {rows[-1]['ms_min']:.2f}")
    if gpu:
        graphs = runner.runner.graphs
        assert graphs is not None
        for b in (1, 8):
            replay = gpu_ms(graphs.graphs[b].replay)
            hidden = torch.randn(b, LLAMA32_1B["hidden_size"], dtype=torch.bfloat16, device="cuda")
            head = gpu_ms(lambda h=hidden: runner._greedy(h))
            rows.append(dict(base, batch=b, graph_replay_ms=replay, head_ms=head))
            print(f"batch {b}: graph replay {replay:.3f} ms (GPU), head + argmax {head:.3f} ms (GPU)")
            # the replay's kernels by family: their busy time against the replay's, and launches a forward
            kernels = profile_steps(graphs.graphs[b].replay, 50, top=24)
            rows.append(dict(base, batch=b, replay_kernels=kernels))
            print(
                f"batch {b}: replay wall {kernels['wall_ms_per_step']:.3f} ms, kernels busy "
                f"{kernels['gpu_busy_ms_per_step']:.3f} ms, {kernels['launches_per_step']:.0f} launches"
            )
            for r in kernels["kernels"]:
                us, n = 1e3 * r["ms_per_step"], r["launches_per_step"]
                print(f"  {r['kernel'][:60]:<60} {us:8.1f} us {n:5.1f}x")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            time_rounds(runner, 1, 10, prompts[:1], args.accept, 4)
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
        print(table)
        if args.out is not None:
            args.out.with_suffix(".txt").write_text(table)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
