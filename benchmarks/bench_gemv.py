"""Batch-1 linear layers of Llama-3-8B: cuBLAS (F.linear) vs fuserve's Triton GEMV, in TB/s.

A decode step at batch 1 is a chain of matrix-vector products, each bound by reading W once.
Prints time and achieved bandwidth per shape beside the measured copy bandwidth, writes JSON rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os

import torch
import triton.testing

from fuserve.workers.kernels.gemv import gemv

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gemv.json")
    args = ap.parse_args()
    copy_bw = copy_bandwidth()
    meta = dict(
        bench="kernel",
        model="llama3-8b",
        device=torch.cuda.get_device_name(),
        date=dt.date.today().isoformat(),
        commit=os.environ.get("FUSERVE_COMMIT", "unknown"),
    )
    rows = []
    for name, (n, k) in SHAPES.items():
        # several weight copies so repeated calls do not hit L2 (50 MB) for the small shapes
        ws = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(2 if n * k < 5e7 else 1)
        ]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(
            gemv(x, ws[0]).float(), (x.float() @ ws[0].float().t()), rtol=2e-2, atol=2e-2
        )
        for engine, fn in (
            ("cublas", torch.nn.functional.linear),
            ("fuserve-triton", lambda a, w: gemv(a, w)),
        ):
            ms = time_rotating(fn, x, ws)
            tb_s = n * k * 2 / (ms * 1e-3) / 1e12
            rows.append(
                dict(
                    meta,
                    engine=engine,
                    op=name,
                    n=n,
                    k=k,
                    batch=1,
                    ms=ms,
                    tb_s=tb_s,
                    frac_of_ceiling=tb_s * 1e12 / copy_bw,
                )
            )
    print(
        f"copy bandwidth {copy_bw / 1e12:.2f} TB/s\n{'op':<14}{'engine':<16}{'us':>8}{'TB/s':>7}{'frac':>6}"
    )
    for r in rows:
        print(
            f"{r['op']:<14}{r['engine']:<16}{r['ms'] * 1e3:>8.1f}{r['tb_s']:>7.2f}"
            f"{r['frac_of_ceiling']:>6.2f}"
        )
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
