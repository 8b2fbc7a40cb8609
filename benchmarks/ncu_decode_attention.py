"""One layer's paged decode attention at the offline 128/128 run's shape, run under Nsight Compute.

Why: the fp8 cache's decode attention at 1,024 short contexts reads 0.51 of an H200's copy bandwidth
(188 us a layer) where the bf16 cache reads 0.96 of an H100's, and an H200 runs it no faster than an H100:
something other than bytes bounds it. The hardware counters (occupancy, warp stall reasons, memory
throughput) say what, before the kernel is changed. Each launch is compiled and run once outside the
profiled range, then run once inside it (cudaProfilerStart/Stop), so ncu sees exactly one call each:

    ncu --clock-control none --profile-from-start off --set full \
        python benchmarks/ncu_decode_attention.py --launches fp8:64:1:2:2,bf16:64:1:4:2

Without ncu it prints each launch's time over the one layer (CUDA events, eager calls).
"""

from __future__ import annotations

import argparse
import functools
import itertools

import sweep_decode_attention as sweep
import torch

from fuserve.workers.kernels.paged_decode_attention import DecodeLaunch, paged_decode_attention


def parse_launch(text: str) -> tuple[bool, DecodeLaunch]:
    """`dtype:block_n:splits:warps:stages`, e.g. fp8:64:1:2:2; dtype fp8p: an fp8 cache read as 16-bit words
    of two values (DecodeLaunch.fp8_pairs)."""
    dtype, block_n, splits, warps, stages = text.split(":")
    if dtype not in ("fp8", "fp8p", "bf16"):
        raise ValueError(f"{text}: the cache dtype is fp8, fp8p or bf16")
    launch = DecodeLaunch(int(block_n), int(splits), int(warps), int(stages), fp8_pairs=dtype == "fp8p")
    return dtype != "bf16", launch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b-tp1-b1024", choices=list(sweep.SHAPES))
    ap.add_argument("--launches", default="fp8:64:1:2:2,fp8:64:1:4:2,bf16:64:1:4:2")
    ap.add_argument(
        "--pool-blocks",
        default="0",
        help="comma-separated: the layer's pool in blocks, the sequences' blocks drawn from all of it (an "
        "engine's pool: 1.9M fp8 tokens are ~118,000 blocks); 0: only the blocks used",
    )
    args = ap.parse_args()
    hq, hkv, batch, context, _ = sweep.SHAPES[args.shape]
    layers: dict[tuple[bool, int], tuple[torch.Tensor, ...]] = {}
    for text, pool_blocks in itertools.product(
        args.launches.split(","), map(int, args.pool_blocks.split(","))
    ):
        fp8, launch = parse_launch(text)
        if (fp8, pool_blocks) not in layers:
            layers.clear()
            torch.cuda.empty_cache()
            layers[fp8, pool_blocks] = sweep.pools(hq, hkv, batch, context, fp8, pool_blocks, layers=1)[0]
        q, k, v, tables, lens, ks, vs = layers[fp8, pool_blocks]
        call = functools.partial(
            paged_decode_attention, q, k, v, tables, lens, 128**-0.5, sweep.MAX_LEN, ks, vs, launch=launch
        )
        for _ in range(3):
            call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            call()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / 20
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"{text} {args.shape} pool {pool_blocks}: {us:.1f} us a call (eager, one layer)", flush=True)


if __name__ == "__main__":
    main()
