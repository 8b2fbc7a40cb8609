"""Where a top-p sampling step's time goes on a GPU: each op of sampler._filtered_probs timed alone
(CUDA events, median of 50), for flat and peaked [batch, 128256] rows.

    python benchmarks/profile_sampler.py [--batches 1,64]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_decode import median_ms

from fuserve.workers.kernels.nucleus_threshold import nucleus_threshold


def _ms(fn: Callable[[], object], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    return median_ms(fn, reps, cuda=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_sampler.py times GPU kernels with CUDA events: run it on a GPU machine")
    for batch in (int(b) for b in args.batches.split(",")):
        for name, scale in (("flat", 3.0 / 0.8), ("peaked", 10.0 / 0.8)):
            probs = (torch.randn(batch, 128256, device="cuda") * scale).softmax(dim=-1)
            target = torch.full((batch,), 0.9, device="cuda")
            known = torch.full((batch,), 0.5, device="cuda")
            ops = {
                "softmax": lambda: probs.softmax(dim=-1),  # noqa: B023
                "sort": lambda: probs.sort(dim=-1, descending=True),  # noqa: B023
                "topk 50": lambda: probs.topk(50, dim=-1),  # noqa: B023
                "topk 256": lambda: probs.topk(256, dim=-1),  # noqa: B023
                "topk 256 unsorted": lambda: probs.topk(256, dim=-1, sorted=False),  # noqa: B023
                "search, all known": lambda: nucleus_threshold(probs, target, known),  # noqa: B023
                "search, all rows": lambda: nucleus_threshold(probs, target),  # noqa: B023
                "masked_fill": lambda: probs.masked_fill(probs < known[:, None], 0.0),  # noqa: B023
                "exponential": lambda: torch.empty_like(probs).exponential_(),  # noqa: B023
                "argmax": lambda: probs.argmax(dim=-1),  # noqa: B023
            }
            for op, fn in ops.items():
                print(f"batch {batch:>3} {name:<7} {op:<20} {_ms(fn):8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
