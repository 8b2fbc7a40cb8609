"""Is cuBLAS leaving bandwidth on the table for the half-width GEMMs of a TP=2 batch-64 step?

The TP=2 profile (benchmarks/NOTES.md, 2026-11-26) shows o_proj at TP=2 (M 64, N 4096, K 2048: 16.8 MB of
bf16 weights) taking 12.1 us, 1.4 TB/s, where the full-width matrices stream at 2.4-2.7 TB/s. This times,
for each linear of the Llama-3-8B shape at TP=1 and TP=2 and M = 64, F.linear (cuBLAS) against a plain
Triton GEMM that holds all M rows in one tile and splits K over programs (partials in fp32, then one sum
kernel), over a small grid of tile sizes and splits, every variant replayed from a CUDA graph; and
cuBLAS on the same product laid out otherwise: the operands swapped ((W x^T)^T, made contiguous), and
the weight stored K-major (x @ W^T from a [K, N] copy), since cuBLAS picks its kernel by layout. It only
measures: a kernel or layout that wins moves into fuserve with its reference and tests.

    python benchmarks/bench_tp_gemm.py --out $OUT/tp-gemm.json        (one GPU, ~1-2 min with compiles)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_decode import commit, copy_bandwidth, graph_us

SHAPES = {  # name: (N, K) of the weight at TP=1; TP=2 halves N (column-parallel) or K (row-parallel)
    "qkv": (6144, 4096, "col"),
    "o_proj": (4096, 4096, "row"),
    "gate_up": (28672, 4096, "col"),
    "down": (4096, 14336, "row"),
}


@triton.jit
def _splitk_gemm_kernel(
    x_ptr,
    w_ptr,
    part_ptr,
    M,
    N,
    K,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(
            w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=offs_n[None, :] < N, other=0.0
        )
        acc += tl.dot(x, w)
    dst = part_ptr + (split * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
    tl.store(dst, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def splitk_linear(
    x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, splits: int, warps: int, stages: int
) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _splitk_gemm_kernel[(triton.cdiv(n, block_n), splits)](
        x,
        w,
        part,
        m,
        n,
        k,
        k // splits,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return part.sum(0).to(x.dtype) if splits > 1 else part[0].to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--no-triton", action="store_true", help="cuBLAS layouts only (no Triton compiles)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    copy_tb_s = copy_bandwidth() / 1e12  # for the floor
    rows = []
    variants = [
        (bn, bk, sp, w, st)
        for bn in (32, 64, 128)
        for bk in (64, 128)
        for sp in (1, 2, 4)
        for w, st in ((4, 4),)
    ]
    for tp in (1, 2):
        for name, (n, k, kind) in SHAPES.items():
            n_tp, k_tp = (n // tp, k) if kind == "col" else (n, k // tp)
            x = torch.randn(args.m, k_tp, dtype=torch.bfloat16, device=dev)
            w = torch.randn(n_tp, k_tp, dtype=torch.bfloat16, device=dev) / k_tp**0.5
            ref = F.linear(x, w)
            floor_us = w.numel() * 2 / (copy_tb_s * 1e12) * 1e6
            cublas = graph_us(lambda x=x, w=w: F.linear(x, w))
            wt = w.t().contiguous()
            swapped = graph_us(lambda x=x, w=w: torch.mm(w, x.t()).t().contiguous())
            k_major = graph_us(lambda x=x, wt=wt: torch.mm(x, wt))
            for out in (torch.mm(w, x.t()).t(), torch.mm(x, wt)):
                assert (out.float() - ref.float()).abs().max().item() < 0.05
            best = None
            for bn, bk, sp, warps, stages in variants if tp == 2 and not args.no_triton else []:
                if (k_tp // sp) % bk:
                    continue
                try:
                    out = splitk_linear(x, w, bn, bk, sp, warps, stages)
                    err = (out.float() - ref.float()).abs().max().item()
                    us = graph_us(lambda x=x, w=w, c=(bn, bk, sp, warps, stages): splitk_linear(x, w, *c))
                except Exception as e:  # a tile that does not fit shared memory
                    print(f"  {name} tp{tp} {bn}/{bk}/{sp}: {type(e).__name__}")
                    continue
                if err > 0.05:
                    print(f"  {name} tp{tp} {bn}/{bk}/{sp}: wrong (max err {err:.3f})")
                    continue
                if best is None or us < best[0]:
                    best = (us, bn, bk, sp)
            row = dict(
                bench="tp-gemm",
                tp=tp,
                linear=name,
                m=args.m,
                n=n_tp,
                k=k_tp,
                floor_us=floor_us,
                cublas_us=cublas,
                cublas_x_floor=cublas / floor_us,
                swapped_us=swapped,
                k_major_us=k_major,
                triton_us=best[0] if best else None,
                triton_config=best[1:] if best else None,
            )
            rows.append(row)
            print(
                f"tp{tp} {name:8s} N {n_tp:6d} K {k_tp:6d}: floor {floor_us:6.1f} us, cuBLAS {cublas:6.1f} "
                f"({cublas / floor_us:.2f}x), swapped {swapped:6.1f} ({swapped / floor_us:.2f}x), K-major "
                f"{k_major:6.1f} ({k_major / floor_us:.2f}x), Triton split-K "
                f"{row['triton_us'] or float('nan'):6.1f} {row['triton_config'] or ''}",
                flush=True,
            )
    meta = dict(
        device=torch.cuda.get_device_name(),
        date=dt.date.today().isoformat(),
        commit=commit(),
        copy_tb_s=copy_tb_s,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump([dict(r, **meta) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
