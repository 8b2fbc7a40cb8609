"""Paged decode attention under every launch choice (tile, splits, warps, stages), as the engine's decode
step runs it: 32 calls in one CUDA graph, one per layer, each on its own KV pool, so a layer's K and V
come from HBM and not from the 50 MB L2 that one pool replayed 20 times would sit in.

The question (issue 14's TP=2 batch-64 step): at Llama-3-8B's TP=2 heads (16 q / 4 KV) with 64 short
contexts, the profiled attention ran at ~half the bandwidth TP=1's did; is a launch choice behind it?
Each shape's rows, fastest first, beside the launch `decode_launch` picks today; every choice's output is
checked against the torch reference before it is timed.

    python benchmarks/sweep_decode_attention.py --out $OUT/decode-attention-sweep.json   # one GPU, ~3 min
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import time
from pathlib import Path

import torch
from bench_decode import commit, copy_bandwidth, device_name, median_ms

from fuserve.workers.kernels.kv_cache_fp8 import quantize_kv
from fuserve.workers.kernels.paged_decode_attention import (
    DecodeLaunch,
    decode_launch,
    paged_decode_attention,
    paged_decode_attention_ref,
)

LAYERS = 32
MAX_LEN = 8192  # the graph's max_context_len: the model length, as the engine captures it
# name: (q heads, KV heads, batch, context, split choices besides the default)
SHAPES = {
    "8b-tp2-b64": (16, 4, 64, 192, (1, 2, 4)),
    "8b-tp1-b64": (32, 8, 64, 192, (1, 2, 4)),
    "8b-tp2-b8": (16, 4, 8, 1024, (2, 4, 8, 16)),
    "8b-tp2-b1": (16, 4, 1, 4096, (16, 32, 64)),
    # beyond the rows the one-wave launch was chosen on: 8 q heads a KV head, longer contexts
    "70b-tp2-b64": (32, 4, 64, 192, (1, 2, 4)),
    "8b-tp2-b64-2k": (16, 4, 64, 2048, (1, 2, 4)),
    "70b-tp2-b1": (32, 4, 1, 4096, (16, 32, 64)),
    # the offline 128/128 run's decode steps (issue 18): ~1,000 sequences, contexts 128-256
    "8b-tp1-b1024": (32, 8, 1024, 192, (1, 2)),
}
BLOCK_N = (32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3)


def pools(
    hq: int,
    hkv: int,
    batch: int,
    context: int,
    fp8: bool,
    pool_blocks: int = 0,
    block_size: int = 16,
    layers: int = LAYERS,
) -> list[tuple[torch.Tensor, ...]]:
    """`layers` sets of (q, K, V, block tables, context lengths, K scale, V scale), each sequence in
    shuffled blocks; with fp8 the caches are e4m3 with per-head scales (else the scales are None).
    `pool_blocks`: each layer's pool holds this many blocks (the engine's pool: its sequences' blocks
    lie anywhere in it), the sequences' blocks drawn at random from all of them; 0: just the blocks
    the sequences use."""
    per_seq = math.ceil(context / block_size)
    used = batch * per_seq
    total = max(pool_blocks, used)
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    out = []
    for _ in range(layers):
        if first is None:
            k = torch.randn((total, block_size, hkv, 128), dtype=torch.bfloat16, device="cuda")
            v = torch.randn_like(k)
        else:  # the same values in a pool of its own: a layer's reads never hit another's in L2
            k, v = first[0].clone(), first[1].clone()
        tables = torch.zeros(batch, MAX_LEN // block_size, dtype=torch.int32, device="cuda")
        tables[:, :per_seq] = torch.randperm(total, device="cuda")[:used].int().view(batch, per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, hq, 128, dtype=torch.bfloat16, device="cuda")
        scales: tuple[torch.Tensor | None, ...] = (None, None)
        if fp8:
            scales = tuple(torch.full((hkv,), 4.0 / 448, device="cuda") for _ in range(2))
            if first is None:
                k, v = quantize_kv(k, scales[0]), quantize_kv(v, scales[1])
        first = first or (k, v)
        out.append((q, k, v, tables, lens, *scales))
    return out


def step_us(layers: list[tuple[torch.Tensor, ...]], launch: DecodeLaunch, replays: int) -> float:
    """Microseconds per call: one call per layer in a CUDA graph, the median replay over LAYERS."""

    def step() -> None:
        for q, k, v, tables, lens, ks, vs in layers:
            paged_decode_attention(q, k, v, tables, lens, 128**-0.5, MAX_LEN, ks, vs, launch=launch)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_ms(graph.replay, replays, True) * 1e3 / LAYERS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=400, help="stop starting new shapes after this")
    ap.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"], help="the cache's dtype")
    ap.add_argument(
        "--pool-blocks",
        type=int,
        default=0,
        help="blocks in each layer's pool, the sequences' blocks drawn from all of them (the engine's pool "
        "size; 0: only the blocks used)",
    )
    ap.add_argument(
        "--default-only",
        action="store_true",
        help="each shape's default launch alone (with an fp8 cache, also read the other way: fp8_pairs)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fp8 = args.kv_dtype == "fp8"
    t0 = time.monotonic()
    bandwidth = copy_bandwidth()
    today = dt.date.today().isoformat()
    meta = dict(bench="decode-attention-sweep", device=device_name(), date=today, commit=commit())
    meta["kv_dtype"] = args.kv_dtype
    meta["pool_blocks"] = args.pool_blocks
    rows = []
    for name in args.shapes.split(","):
        if time.monotonic() - t0 > args.budget_s:
            print(f"{name}: skipped, budget spent", flush=True)
            continue
        hq, hkv, batch, context, split_choices = SHAPES[name]
        layers = pools(hq, hkv, batch, context, fp8, args.pool_blocks)
        default = decode_launch(batch, hkv, MAX_LEN, torch.device("cuda"), fp8)
        floor_us = 1e6 * 2 * batch * context * hkv * 128 * (1 if fp8 else 2) / bandwidth
        q, k, v, tables, lens, ks, vs = layers[0]
        want = paged_decode_attention_ref(q, k, v, tables, lens, 128**-0.5, context, ks, vs).float()
        splits = sorted({default.num_splits, *split_choices})
        shape_rows = []
        if args.default_only:  # the default launch, and with an fp8 cache the same read the other way
            launches = [default]
            if fp8:
                launches.append(dataclasses.replace(default, fp8_pairs=not default.fp8_pairs))
        else:
            pair_choices = (False, True) if fp8 else (False,)
            launches = [
                DecodeLaunch(block_n, num_splits, warps, stages, fp8_pairs=pairs)
                for block_n, warps, stages, num_splits, pairs in itertools.product(
                    BLOCK_N, WARPS, STAGES, splits, pair_choices
                )
            ]
        for launch in launches:
            try:
                got = paged_decode_attention(q, k, v, tables, lens, 128**-0.5, MAX_LEN, ks, vs, launch=launch)
                err = (got.float() - want).abs().max().item()
                us = step_us(layers, launch, args.replays) if err < 0.05 else float("nan")
            except Exception as e:  # a choice the compiler refuses (registers, shared memory)
                print(f"  {launch}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            shape_rows.append(
                dict(
                    meta,
                    shape=name,
                    q_heads=hq,
                    kv_heads=hkv,
                    batch=batch,
                    context=context,
                    **dataclasses.asdict(launch),  # block_n, num_splits, num_warps, num_stages, fp8_pairs
                    is_default=launch == default,
                    us=us,
                    floor_us=floor_us,
                    max_abs_err=err,
                )
            )
        shape_rows.sort(key=lambda r: r["us"] if r["us"] == r["us"] else float("inf"))
        base = next(r["us"] for r in shape_rows if r["is_default"])
        print(f"{name}: floor {floor_us:.2f} us, default {default} {base:.2f} us", flush=True)
        for r in shape_rows[:8] + [r for r in shape_rows[8:] if r["is_default"]]:
            print(
                f"  BLOCK_N {r['block_n']:3d} splits {r['num_splits']:2d} warps {r['num_warps']} stages "
                f"{r['num_stages']}{' pairs' if r['fp8_pairs'] else ''}: {r['us']:7.2f} us "
                f"({r['us'] / base:.2f}x default, "
                f"{r['floor_us'] / r['us']:.2f} of floor){' default' if r['is_default'] else ''}",
                flush=True,
            )
        rows += shape_rows
        del layers
        torch.cuda.empty_cache()
    out = Path(args.out or f"benchmarks/results/decode-attention-sweep-{meta['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta, copy_tb_s=bandwidth / 1e12, rows=rows), indent=1))
    print(f"wrote {out} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
