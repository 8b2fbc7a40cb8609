"""What the paged decode attention's split-K costs a batch-1 forward: the decode graphs of a model shape
captured with the split count the kernel picks (as served) and again with one split (no merge kernel),
timed as draft rounds (k = 4, one new token a round: four graphed forwards) and as one graph replay on
the GPU (CUDA events), at a few context lengths. At batch 1 on an H200 the split count fills the device
(~32 splits of 64-token tiles), so every layer runs a second, merge kernel; one split reads the context
in one program per KV head. Where one split is as fast at short contexts, the merge's launch is what a
layer pays for split-K there.

    python benchmarks/bench_decode_splits.py --shapes 1b,8b --out $OUT/decode-splits.json    # GPU
    python benchmarks/bench_decode_splits.py --smoke                                          # CPU
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
from bench_decode import LLAMA3_8B, TINY, commit, device_name  # noqa: E402
from bench_spec_channel import LLAMA32_1B, time_rounds  # noqa: E402
from profile_draft_round import dummy_draft_runner  # noqa: E402
from profile_step import gpu_ms  # noqa: E402

import fuserve.workers.kernels.paged_decode_attention as decode_attention  # noqa: E402

SHAPES = {"1b": LLAMA32_1B, "8b": LLAMA3_8B, "tiny": TINY}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    contexts = [32] if args.smoke else [int(c) for c in args.contexts.split(",")]
    rounds = 3 if args.smoke else args.rounds
    max_len = 4096
    base = dict(bench="decode_splits", device=device_name(), commit=commit(), date=time.strftime("%Y-%m-%d"))
    picked = decode_attention.decode_num_splits
    rows: list[dict[str, Any]] = []
    for name in shapes:
        for mode in ("as served", "one split"):
            decode_attention.decode_num_splits = picked if mode == "as served" else (lambda *a, **k: 1)
            try:
                # its decode graphs are captured here, with the split count patched in or not
                runner = dummy_draft_runner(SHAPES[name], gpu, -(-(max_len + 64) // 16) + 8, 1, max_len)
            finally:
                decode_attention.decode_num_splits = picked
            for context in contexts:
                prompt = [[(j * 31) % 500 for j in range(context)]]
                time_rounds(runner, 1, 3, prompt, 1, 4)  # warm-up
                ms = time_rounds(runner, 1, rounds, prompt, 1, 4)
                graphs = runner.runner.graphs
                replay = gpu_ms(graphs.graphs[1].replay) if gpu and graphs is not None else None
                rows.append(
                    dict(base, shape=name, mode=mode, context=context, round_ms=statistics.median(ms),
                         replay_ms=replay)
                )  # fmt: skip
                shown = f"{replay:.3f}" if replay is not None else "-"
                print(f"{name} {mode:<10} context {context:>5}: round k=4 {rows[-1]['round_ms']:.3f} ms, "
                      f"replay {shown} ms", flush=True)  # fmt: skip
            del runner
            if gpu:
                torch.cuda.empty_cache()
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
