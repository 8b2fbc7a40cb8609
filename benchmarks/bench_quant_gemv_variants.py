"""The candidate 8-bit GEMVs (quant_gemv_variants.py) against `quant_gemv` and the bf16 GEMV at batch 1,
on Llama-3-8B's four layer shapes, int8 and fp8 weights (issue 18): which one goes into quant_gemv.py.

Each kernel is checked against `quant_gemv_ref` first (a wrong one is reported and not timed: one bad
candidate does not waste the run), then timed two ways: alone (`time_rotating`: events around each
call after an L2 flush, so the small shapes pay launch and ramp-up) and as a chain of calls inside one
CUDA graph (`graph_us`, with PDL as in the engine), cycling through weight copies that together
exceed L2 in both. Prints us, TB/s, the share of the copy bandwidth measured in the same run, the
autotuner's pick, and the ratios to `quant_gemv` and to the bf16 GEMV; the rows go to JSON after
every shape, so a run cut short keeps what it measured.

    python3 benchmarks/bench_quant_gemv_variants.py --out $OUT/quant-gemv-variants.json  # ~5 min, 1 GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
from collections.abc import Callable

import torch
import triton
from bench_decode import commit, graph_us
from bench_gemv import SHAPES, copy_bandwidth, time_rotating
from quant_gemv_variants import VARIANTS

from fuserve.workers.kernels.gemv import _gemv_kernel, gemv
from fuserve.workers.kernels.quant_gemv import _quant_gemv_kernel, quant_gemv, quant_gemv_ref
from fuserve.workers.models.quant_scheme import SCHEMES, quantize_rows

LAYER_SHAPES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # lm_head stays bf16 in every scheme
COPIES_BYTES = 200e6  # weight copies cycled until they hold this much: L2 (50 MB) keeps none of them
GRAPH_CALLS = 24
MAX_REL_ERR = 2e-2  # of the largest output: bf16 rounding of fp32 sums taken in another order


def describe(config: triton.Config) -> str:
    kw = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} warps={config.num_warps} stages={config.num_stages}"


def tuning_of(kernel: triton.runtime.Autotuner) -> dict:
    """The config the autotuner last ran and its four fastest (median us), as tuned for this key."""
    timings = getattr(kernel, "configs_timings", None) or {}
    fastest = sorted(timings.items(), key=lambda item: item[1][0])[:4]
    return {
        "best_config": describe(kernel.best_config),
        "fastest_configs": [[describe(c), t[0] * 1e3] for c, t in fastest],
    }


def timed(call: Callable[[torch.Tensor, object], torch.Tensor], x: torch.Tensor, copies: list) -> dict:
    """us per call alone and in a CUDA graph, cycling through `copies` (arguments after x)."""
    state = {"i": 0}

    def next_call() -> None:
        state["i"] = (state["i"] + 1) % len(copies)
        call(x, copies[state["i"]])

    eager_us = time_rotating(call, x, copies) * 1e3
    return {"us": eager_us, "graph_us": graph_us(next_call, calls=GRAPH_CALLS)}


def with_rates(row: dict, nbytes: int, copy: float) -> dict:
    for mode in ("us", "graph_us"):
        tb_s = nbytes / (row[mode] * 1e-6) / 1e12
        prefix = "" if mode == "us" else "graph_"
        row[f"{prefix}tb_s"] = tb_s
        row[f"{prefix}x_copy"] = tb_s * 1e12 / copy
    return row


def bench_shape(name: str, kernels: dict, schemes: list[str], copy: float, base: dict) -> list[dict]:
    """bf16 GEMV, then per scheme `quant_gemv` and each variant, on one shape."""
    n, k = SHAPES[name]
    dev = torch.device("cuda")
    count = max(4, math.ceil(COPIES_BYTES / (n * k)))
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(count)]
    shape = {**base, "shape": name, "n": n, "k": k, "copies": count}
    gemv(x, w16[0])  # tunes it
    bf16 = {
        **shape,
        "kernel": "gemv_bf16",
        "scheme": "bf16",
        "best_config": describe(_gemv_kernel.best_config),
    }
    rows = [with_rates({**bf16, **timed(lambda x, w: gemv(x, w), x, w16)}, 2 * n * k, copy)]
    for scheme in schemes:
        qs = [quantize_rows(w, SCHEMES[scheme]) for w in w16]
        want = quant_gemv_ref(x, *qs[0]).float()
        current = None
        for kname, (fn, tuner) in kernels.items():
            got = fn(x, *qs[0]).float()  # the first call at this shape and dtype autotunes
            err = ((got - want).abs().max() / want.abs().max()).item()
            row = {**shape, "kernel": kname, "scheme": scheme, "max_rel_err": err, **tuning_of(tuner)}
            if not err < MAX_REL_ERR:
                print(f"FAILED {name} {scheme} {kname}: relative error {err:.3g}; not timed")
                rows.append(row)
                continue
            row = with_rates({**row, **timed(lambda x, q, fn=fn: fn(x, *q), x, qs)}, n * k, copy)
            if kname == "quant_gemv":  # first in `kernels`
                current = row
            for mode in ("us", "graph_us"):
                row[f"{mode}_vs_bf16"] = row[mode] / rows[0][mode]
                if current is not None:
                    row[f"{mode}_vs_quant_gemv"] = row[mode] / current[mode]
            rows.append(row)
        del qs
    del w16
    torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if "us" not in r:
            continue
        ratios = (
            f" {r['us_vs_quant_gemv']:5.2f} {r['graph_us_vs_quant_gemv']:5.2f}"
            f" {r['us_vs_bf16']:5.2f} {r['graph_us_vs_bf16']:5.2f}"
            if "us_vs_quant_gemv" in r
            else " " * 24
        )
        print(
            f"{r['shape']:13s} {r['scheme']:8s} {r['kernel']:13s} {r['us']:7.1f} {r['x_copy']:5.2f}"
            f" {r['graph_us']:7.1f} {r['graph_x_copy']:5.2f}{ratios}  {r['best_config']}",
            flush=True,
        )


def layer_totals(rows: list[dict], base: dict) -> list[dict]:
    """One decoder layer's four GEMVs summed per kernel and scheme (graph us): what a decode step sees."""
    totals: dict[tuple[str, str], dict] = {}
    for r in rows:
        if "graph_us" in r:
            t = totals.setdefault((r["scheme"], r["kernel"]), {"graph_us": 0.0, "us": 0.0, "shapes": 0})
            t["graph_us"] += r["graph_us"]
            t["us"] += r["us"]
            t["shapes"] += 1
    bf16 = totals.get(("bf16", "gemv_bf16"))
    out = []
    for (scheme, kernel), t in totals.items():
        current = totals.get((scheme, "quant_gemv"))
        row = {**base, "shape": "layer", "scheme": scheme, "kernel": kernel, **t}
        if bf16 and current and t["shapes"] == bf16["shapes"] == current["shapes"]:
            row["graph_us_vs_quant_gemv"] = t["graph_us"] / current["graph_us"]
            row["graph_us_vs_bf16"] = t["graph_us"] / bf16["graph_us"]
        out.append(row)
        vs = (
            f"{row['graph_us_vs_quant_gemv']:5.2f} x quant_gemv {row['graph_us_vs_bf16']:5.2f} x bf16"
            if "graph_us_vs_bf16" in row
            else ""
        )
        print(f"layer ({t['shapes']} shapes) {scheme:8s} {kernel:13s} graph {t['graph_us']:7.1f} us {vs}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "quant-gemv-variants.json"))
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANTS)
    )
    ap.add_argument("--shapes", default=",".join(LAYER_SHAPES))
    ap.add_argument("--schemes", default="int8-wo,fp8-wo")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "a GPU benchmark"
    kernels = {"quant_gemv": (quant_gemv, _quant_gemv_kernel)}
    kernels.update({v: VARIANTS[v] for v in args.variants.split(",") if v})
    copy = copy_bandwidth()
    base = {
        "bench": "quant_gemv_variants",
        "device": torch.cuda.get_device_name(),
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "copy_tb_s": copy / 1e12,
        "graph_calls": GRAPH_CALLS,
    }
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s on {base['device']}")
    print(
        f"{'shape':13s} {'scheme':8s} {'kernel':13s} {'us':>7s} {'xcopy':>5s} {'graph':>7s} {'xcopy':>5s}"
        "  /cur graph/cur /bf16 graph/bf16  best config"
    )
    rows: list[dict] = []
    for name in args.shapes.split(","):
        shape_rows = bench_shape(name, kernels, args.schemes.split(","), copy, base)
        print_rows(shape_rows)
        rows += shape_rows
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    rows += layer_totals(rows, base)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
