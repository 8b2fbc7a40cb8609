"""Paged decode attention alone, as the engine runs it: inside a CUDA graph whose `max_context_len` is the
model length, over contexts far shorter than that.

Per rank's heads of Llama-3-8B and -70B at TP 1/2/4, batch 1/8/64, contexts 128 to 4,096 tokens: us per
call (20 calls per graph replay), the KV bytes' floor at the copy bandwidth measured in the run, and, with
`--baseline FILE` (an earlier copy of kernels/paged_decode_attention.py), the same rows for that file in
the same run: an A/B of a kernel change without keeping the old kernel in the tree.

    python benchmarks/bench_decode_attention.py --baseline /tmp/old_decode.py --out results/x.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
from bench_decode import commit, copy_bandwidth, device_name, graph_us

from fuserve.workers.kernels import paged_decode_attention as current

# (per-rank q heads, KV heads) of the Llama-3 shapes
HEADS = {
    "8b-tp1": (32, 8),
    "8b-tp2": (16, 4),
    "70b-tp2": (32, 4),
    "70b-tp4": (16, 2),
}
CALLS_PER_REPLAY = 20


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_paged_decode", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(
    batch: int, context: int, heads: tuple[int, int], max_len: int, block_size: int = 16
) -> tuple[torch.Tensor, ...]:
    """q, K/V caches with each sequence in shuffled blocks, block tables as wide as the graph's."""
    hq, hkv = heads
    per_seq = math.ceil(context / block_size)
    num_blocks = batch * per_seq
    cache = (num_blocks, block_size, hkv, 128)
    k = torch.randn(cache, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(cache, dtype=torch.bfloat16, device="cuda")
    ids = torch.randperm(num_blocks, device="cuda").int().view(batch, per_seq)
    tables = torch.zeros(batch, max_len // block_size, dtype=torch.int32, device="cuda")
    tables[:, :per_seq] = ids
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, 128, dtype=torch.bfloat16, device="cuda")
    return q, k, v, tables, lens


def time_kernels(
    kernels: dict[str, ModuleType], batch: int, context: int, heads: tuple[int, int], args: argparse.Namespace
) -> dict[str, float]:
    """Each kernel's us per call and its largest difference from the torch reference."""
    q, k, v, tables, lens = inputs(batch, context, heads, args.max_len)
    ref = current.paged_decode_attention_ref(q, k, v, tables, lens, 128**-0.5).float()
    row: dict[str, float] = {"max_context_len": args.max_len}
    for label, module in kernels.items():
        call = partial(module.paged_decode_attention, q, k, v, tables, lens, 128**-0.5, args.max_len)
        row[f"{label}_max_abs_err"] = (call().float() - ref).abs().max().item()
        row[f"{label}_us"] = graph_us(call, CALLS_PER_REPLAY, args.reps)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None, help="an earlier paged_decode_attention.py to time beside")
    ap.add_argument("--max-len", type=int, default=8192, help="the graph's max_context_len (model length)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--contexts", default="128,256,1024,4096")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kernels = {"current": current}
    if args.baseline:
        kernels["baseline"] = load_module(args.baseline)
    bandwidth = copy_bandwidth()
    meta = dict(
        bench="decode-attention", device=device_name(), date=dt.date.today().isoformat(), commit=commit()
    )
    rows = []
    labels = " | ".join(f"{k:>9}" for k in kernels)
    print(f"{'heads':>8} {'B':>3} {'ctx':>5} | floor us | {labels} | ratio")
    for name, heads in HEADS.items():
        for batch in (int(b) for b in args.batches.split(",")):
            for context in (int(c) for c in args.contexts.split(",")):
                shape = dict(heads=name, q_heads=heads[0], kv_heads=heads[1], batch=batch, context=context)
                row = dict(meta, **shape, **time_kernels(kernels, batch, context, heads, args))
                row["floor_us"] = 1e6 * 2 * batch * context * heads[1] * 128 * 2 / bandwidth
                ratio = row["current_us"] / row["baseline_us"] if "baseline_us" in row else None
                row["current_over_baseline"] = ratio
                rows.append(row)
                times = " | ".join(f"{row[f'{k}_us']:9.2f}" for k in kernels)
                shown = f"{ratio:.2f}x" if ratio else ""
                print(
                    f"{name:>8} {batch:3d} {context:5d} | {row['floor_us']:8.2f} | {times} | {shown}",
                    flush=True,
                )
    out = Path(args.out or f"benchmarks/results/decode-attention-{meta['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta, copy_tb_s=bandwidth / 1e12, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
