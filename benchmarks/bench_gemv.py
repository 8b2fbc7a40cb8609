"""Batch-1 linear layers of Llama-3-8B: cuBLAS (F.linear) vs fuserve's Triton GEMV, in TB/s.

A decode step at batch 1 is a chain of matrix-vector products, each bound by reading W once.
Prints time and achieved bandwidth per shape beside the measured copy bandwidth, writes JSON rows.
Alone, a 20-30 us GEMV pays its launch and ramp-up; in the engine they run back to back in a CUDA
graph. So the chain rows time a graph of a whole model's GEMVs (32 layers of qkv -> o -> gate_up ->
down, each fed by the one before, then lm_head) at TP=1 and TP=2 shard shapes (silu * up between
gate_up and down, as in the model), with programmatic dependent launch (kernels/pdl.py) off and on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
from collections.abc import Iterator

import torch
import triton.testing
from bench_decode import commit

from fuserve.workers.kernels.gemv import linear
from fuserve.workers.kernels.silu_mul import silu_mul
from fuserve.workers.kernels.switches import KernelSwitches, using_switches

SHAPES = {
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (bench(lambda: dst.copy_(src)) * 1e-3)


def time_rotating(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Median ms of fn(x, W), cycling through weight copies so small shapes are not served from L2."""
    state = {"i": 0}

    def call() -> None:
        state["i"] = (state["i"] + 1) % len(weights)
        fn(x, weights[state["i"]])

    return bench(call)


@contextlib.contextmanager
def blas_library(name: str) -> Iterator[None]:
    """torch's GEMMs through `name` (cublas or cublaslt: their heuristics pick other kernels for a few
    rows) while inside; a graph captured inside keeps the kernels it captured."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def chain_us(tp: int, pdl: bool, layers: int = 32, rows: int = 1, blas: str = "cublas") -> tuple[float, int]:
    """Median us of one graph replay of the model's linear chain at TP shard shapes, `rows` rows (the
    Triton GEMV at one row, `blas` above); weight bytes read."""
    q_size, kv_size, inter, vocab = 4096 // tp, 1024 // tp, 14336 // tp, 128256 // tp
    shapes = [(q_size + 2 * kv_size, 4096), (4096, q_size), (2 * inter, 4096), (4096, inter)]
    weights = [
        [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n, k in shapes]
        for _ in range(layers)
    ]
    lm_head = torch.randn(vocab, 4096, device="cuda", dtype=torch.bfloat16) / 64
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        h = x
        for qkv, o, gate_up, down in weights:
            h = linear(linear(h, qkv)[:, :q_size], o)  # attention output has the q width
            h = linear(silu_mul(linear(h, gate_up)), down)
        return linear(h, lm_head)

    # the graph keeps the launches it captured
    with using_switches(KernelSwitches(pdl=pdl)), blas_library(blas):
        chain()  # autotune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
    us = bench(graph.replay) * 1e3
    nbytes = sum(w.numel() * 2 for ws in weights for w in ws) + lm_head.numel() * 2
    return us, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gemv.json")
    ap.add_argument(
        "--rows", default="1", help="comma-separated row counts (a verify step of 1 + k, a small batch)"
    )
    ap.add_argument("--no-chain", action="store_true", help="skip the whole-model chain rows")
    ap.add_argument("--blas", default="cublas", help="torch's GEMM libraries to time beside: cublas,cublaslt")
    args = ap.parse_args()
    row_counts = [int(m) for m in args.rows.split(",")]
    blas_names = args.blas.split(",")
    copy_bw = copy_bandwidth()
    meta = dict(
        bench="kernel",
        model="llama3-8b",
        device=torch.cuda.get_device_name(),
        date=dt.date.today().isoformat(),
        commit=commit(),
    )
    rows = []
    for name, (n, k) in SHAPES.items():
        # several weight copies so repeated calls do not hit L2 (50 MB) for the small shapes
        ws = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(2 if n * k < 5e7 else 1)
        ]
        for m in row_counts:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(
                linear(x, ws[0]).float(), (x.float() @ ws[0].float().t()), rtol=2e-2, atol=2e-2
            )
            engines = [(blas, torch.nn.functional.linear) for blas in blas_names]
            for engine, fn in [*engines, ("fuserve-triton", linear)]:
                with blas_library(engine if engine in blas_names else "cublas"):
                    ms = time_rotating(fn, x, ws)
                tb_s = n * k * 2 / (ms * 1e-3) / 1e12
                rows.append(
                    dict(
                        meta,
                        engine=engine,
                        op=name,
                        n=n,
                        k=k,
                        batch=m,
                        ms=ms,
                        tb_s=tb_s,
                        frac_of_ceiling=tb_s * 1e12 / copy_bw,
                    )
                )
    print(
        f"copy bandwidth {copy_bw / 1e12:.2f} TB/s\n"
        f"{'op':<14}{'engine':<16}{'rows':>5}{'us':>8}{'TB/s':>7}{'frac':>6}"
    )
    for r in rows:
        print(
            f"{r['op']:<14}{r['engine']:<16}{r['batch']:>5}{r['ms'] * 1e3:>8.1f}{r['tb_s']:>7.2f}"
            f"{r['frac_of_ceiling']:>6.2f}"
        )
    # the chain at each row count (TP=1, PDL; a verify step's 1 + k, small batches), then the one-row
    # chain at TP=1 and TP=2 with PDL off and on, each (tp, pdl, rows) timed once
    chains = [(1, True, m, b) for m in row_counts for b in (blas_names if m > 1 else blas_names[:1])]
    if not args.no_chain:
        chains += [
            (tp, pdl, 1, "cublas")
            for tp in (1, 2)
            for pdl in (False, True)
            if (tp, pdl, 1, "cublas") not in chains
        ]
    for tp, pdl, m, blas in chains:
        us, nbytes = chain_us(tp, pdl, rows=m, blas=blas)
        tb_s = nbytes / (us * 1e-6) / 1e12
        engine = blas if m > 1 else "fuserve-triton-pdl" if pdl else "fuserve-triton"
        rows.append(
            dict(
                meta,
                engine=engine,
                op=f"chain-tp{tp}",
                tp=tp,
                pdl=pdl,
                batch=m,
                ms=us / 1e3,
                tb_s=tb_s,
                frac_of_ceiling=tb_s * 1e12 / copy_bw,
            )
        )
        frac = rows[-1]["frac_of_ceiling"]
        print(f"chain TP={tp} rows={m} {engine:<20}{us:>9.1f} us{tb_s:>7.2f} TB/s{frac:>6.2f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
