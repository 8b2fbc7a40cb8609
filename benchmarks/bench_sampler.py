"""The sampler's cost per step, against plain torch sampling measured in the same run.

One decode step's sampling: logits [batch, vocab] -> one token per row (fuserve/workers/sampler.py).
Cases: greedy; temperature alone; temperature + top_p (the usual chat default); temperature with a
seed per request. The baseline is what HF transformers does for the same request: softmax of
logits / T (after its sort-based top-p warper when top_p < 1), then torch.multinomial.
Prints ms per step and the ratio to the baseline; writes JSON with device, date and commit.

    python benchmarks/bench_sampler.py [--vocab 49152] [--batches 1,64] [--reps 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_decode import commit

from fuserve.sampling_params import SamplingParams
from fuserve.workers.sampler import Sampler, SampleRequest

# logits are N(0, 3^2): a flat row, whose top-p 0.9 nucleus at T 0.8 holds ~900 of 128256 tokens (the
# search path); "peaked" rows are N(0, 10^2), a nucleus of a few tokens, as a confident model gives
PEAKED = 10.0
CASES: dict[str, dict[str, Any]] = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "temperature+top_p": dict(temperature=0.8, top_p=0.9),
    "top_k 50 + top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p, peaked logits": dict(temperature=0.8, top_p=0.9),
    "temperature, seeded": dict(temperature=0.8, seed=1),
}


def hf_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' sampling path: temperature, top-k and top-p (sort) warpers, softmax, multinomial."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k > 0:
        scores = scores.masked_fill(scores < scores.topk(top_k).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = scores.sort(descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


def _time(fn: Any, device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=None, help="default: 128256 on GPU, 49152 on CPU")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = args.vocab or (128256 if device.type == "cuda" else 49152)
    sampler = Sampler()
    rows: list[dict[str, Any]] = []
    print(f"{'case':<22}{'batch':>6}{'fuserve ms':>12}{'HF-style ms':>13}{'ratio':>8}")
    for batch in (int(b) for b in args.batches.split(",")):
        flat = torch.randn(batch, vocab, device=device) * 3
        for case, params in CASES.items():
            logits = flat * (PEAKED / 3) if "peaked" in case else flat
            sampling = SamplingParams(max_tokens=8, **params)
            reqs = [SampleRequest(sampling, [1, 2, 3], [4]) for _ in range(batch)]
            ours = _time(lambda: sampler.sample(logits, reqs).results(), device, args.reps)  # noqa: B023
            temperature, top_p = params.get("temperature", 1.0), params.get("top_p", 1.0)
            top_k = params.get("top_k", 0)
            base = _time(lambda: hf_sample(logits, temperature, top_k, top_p).tolist(), device, args.reps)  # noqa: B023
            rows.append(dict(case=case, batch=batch, vocab=vocab, fuserve_ms=ours, hf_style_ms=base))
            print(f"{case:<22}{batch:>6}{ours:>12.3f}{base:>13.3f}{ours / base:>8.2f}")
    meta = dict(
        bench="sampler",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch_threads=torch.get_num_threads(),
        date=dt.date.today().isoformat(),
        commit=commit(),
    )
    for r in rows:
        r.update(meta)
    out = Path(args.out or f"benchmarks/results/sampler-{meta['date']}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
