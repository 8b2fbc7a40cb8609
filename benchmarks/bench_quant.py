"""8-bit weights against bf16 on one GPU: Llama-3-8B shape, decode at batch 1 and 64, each scheme's
linear kernels alone, and the bytes floor, all measured in the same run.

For each scheme (bf16 = none, int8-wo, fp8-wo, fp8 W8A8) an engine with random weights of that scheme
(load_format dummy, CUDA graphs) decodes prompt 128 + 128 new tokens greedily at batch 1 and batch 64:
  - batch-1 ms/token (median decode step) against the bytes floor = bytes one step reads / copy
    bandwidth (every weight except the embedding table, of which one row per token is read);
  - batch-64 output tok/s (the whole run, prefill included);
  - ratio to bf16 of the same run (the issue's targets: int8-wo and fp8-wo <= 0.58x at batch 1, fp8
    <= 0.62x; fp8 >= 1.3x tok/s at batch 64).
The FP8 KV cache runs twice more: bf16 weights + FP8 KV, and the full FP8 deployment (fp8 W8A8 +
FP8 KV); every engine row records its KV capacity in tokens (same memory budget: FP8 KV ~2x). Then
decode at a long context (--long-context, 32k) at batch 1 with the bf16 cache and the FP8 one, where
reading the KV starts to matter. Last, the decoder layer's four linear layers alone (QKV, o, gate/up,
down) at M = 1, 4, 8 and 64 (--kernel-batches), over a rotating set of weights larger than L2, per
scheme: which kernel gives the end-to-end figure (M = 4 and 8: the tiled GEMM that takes 2-15 rows,
against the GEMV's M = 1). At M >= 16 the fp8 scheme runs twice: `activations: fused` hands QKV,
gate/up and down their input already quantized (as the fused RMSNorm and SiLU·up kernels do; o_proj
quantizes its own), `unfused` has every layer quantize x itself (one kernel each, fp8_rows.py). Rows go to
--out (default $OUT/quant-DATE.json) in DESIGN.md's flat schema.

    python benchmarks/bench_quant.py                    # on the GPU machine, ~8 min on an H100
    python benchmarks/bench_quant.py --smoke --out x    # tiny shapes on CPU: the script still runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (  # noqa: E402
    LLAMA3_8B,
    TINY,
    commit,
    copy_bandwidth,
    device_name,
    dummy_engine_config,
    median_ms,
    time_decode,
)

SCHEMES = ["none", "int8-wo", "fp8-wo", "fp8"]


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter but the embedding table (one row per token)."""
    return sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name
    )


def run_engine(
    scheme: str,
    kv_cache_dtype: str,
    cfg: dict[str, Any],
    batches: list[int],
    prompt_len: int,
    output_len: int,
    smoke: bool,
    bench: str = "quant-decode",
    max_num_batched_tokens: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    from fuserve.configs import config_from_dict
    from fuserve.workers.engine import LLMEngine

    config = config_from_dict(
        dummy_engine_config(
            cfg,
            batches,
            prompt_len,
            output_len,
            smoke,
            # "int8-wo+head": the scheme with model.quantize_lm_head (the LM head in int8 too)
            model={
                "quantization": scheme.removesuffix("+head"),
                "quantize_lm_head": scheme.endswith("+head"),
            },
            cache={"gpu_memory_utilization": 0.6, "kv_cache_dtype": kv_cache_dtype},
            scheduler={"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {},
        )
    )
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    init_s = time.perf_counter() - t0
    worker = engine.executor.worker
    nbytes = step_bytes(worker.model)
    kv_tokens = worker.num_blocks * config.cache.block_size
    budget = worker.kv_budget  # where the memory went before the KV cache (None on CPU)
    memory = (
        {}
        if budget is None
        else dict(
            # what engines before this one left allocated: before shutdown freed their weights, they
            # were counted as this engine's and shrank its KV pool (issue 18's "KV sizing")
            earlier_gib=budget.earlier / 2**30,
            weights_gib=budget.weights / 2**30,
            activation_peak_gib=budget.activations / 2**30,
            others_gib=budget.others / 2**30,
            kv_gib=budget.kv / 2**30,
        )
    )
    for batch in batches:  # each batch's kernels compile (and autotune) here, not in its timed run
        time_decode(engine, batch, min(prompt_len, 128), min(8, output_len), cfg["vocab_size"])
    rows = []
    for batch in batches:
        timing = time_decode(engine, batch, prompt_len, output_len, cfg["vocab_size"])
        rows.append(
            dict(
                bench=bench,
                engine="fuserve",
                quantization=scheme,
                kv_cache_dtype=kv_cache_dtype,
                kv_tokens=kv_tokens,
                **memory,
                batch=batch,
                prompt_len=prompt_len,
                output_len=output_len,
                step_gb=nbytes / 1e9,
                init_s=init_s,
                **timing,
            )
        )
        print(rows[-1], flush=True)
    engine.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, nbytes


def layer_shapes(cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return [("qkv", h + 2 * kv, h), ("o", h, h), ("gate_up", 2 * i, h), ("down", h, i)]


def run_kernels(
    scheme: str, cfg: dict[str, Any], m: int, copies: int, reps: int, fused: bool = True
) -> dict[str, Any]:
    """One decoder layer's linear layers at M rows, cycling through `copies` weight sets (past L2).
    `fused` (fp8 W8A8 at >= FP8_ACT_MIN_ROWS rows): QKV, gate/up and down get x quantized beforehand."""
    from fuserve.workers.kernels import gemv
    from fuserve.workers.kernels.quant_linear import FP8_ACT_MIN_ROWS, quant_linear, quant_linear_ref
    from fuserve.workers.models.quant_scheme import (
        Fp8Activations,
        quantize_per_token_fp8,
        quantize_rows,
        scheme_for,
    )

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    s = scheme_for(scheme)
    sets: list[list[tuple[torch.Tensor, ...]]] = []
    for _ in range(copies):
        layer = []
        for _, n, k in layer_shapes(cfg):
            w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
            layer.append((w,) if s is None else quantize_rows(w, s))
        sets.append(layer)
    xs = {k: torch.randn(m, k, device=device, dtype=dtype) for _, _, k in layer_shapes(cfg)}
    w8a8 = s is not None and s.quantize_activations and m >= FP8_ACT_MIN_ROWS
    inputs: list[torch.Tensor | Fp8Activations] = []
    for name, _, k in layer_shapes(cfg):
        x = xs[k]
        inputs.append(
            Fp8Activations(*quantize_per_token_fp8(x), dtype) if w8a8 and fused and name != "o" else x
        )
    qlin = quant_linear if cuda else quant_linear_ref
    state = {"i": 0}

    def call() -> None:
        layer = sets[state["i"] % copies]
        state["i"] += 1
        for x, w in zip(inputs, layer, strict=True):
            if s is None:
                gemv.linear(x, w[0], None)
            else:
                qlin(x, w[0], w[1], None, s.quantize_activations)

    for _ in range(3):
        call()  # compile and autotune
    ms = median_ms(call, reps, torch.cuda.is_available())
    nbytes = sum(t.numel() * t.element_size() for ts in sets[0] for t in ts)
    return dict(
        bench="quant-kernel",
        engine="fuserve",
        quantization=scheme,
        batch=m,
        activations=("fused" if fused else "unfused") if w8a8 else None,
        us=1e3 * ms,
        bytes=nbytes,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--kernel-batches", default="1,4,8,64", help="rows M of the linear-layer rows")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--fp8-kv", default="none,fp8", help="schemes also run with the FP8 KV cache ('' for none)"
    )
    ap.add_argument(
        "--int8-head", default="", help="schemes to run again with model.quantize_lm_head (engine rows only)"
    )
    ap.add_argument("--long-context", type=int, default=32768, help="batch-1 decode at this context; 0 skips")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    schemes = args.schemes.split(",")
    runs = [(s, "auto") for s in schemes] + [(f"{s}+head", "auto") for s in args.int8_head.split(",") if s]
    runs += [(s, "fp8") for s in args.fp8_kv.split(",") if s]
    unknown = sorted({s.removesuffix("+head") for s, _ in runs} - set(SCHEMES))
    if unknown:  # before the kernels' minutes, not after them
        raise SystemExit(f"unknown scheme(s) {unknown}: choose from {SCHEMES}")
    cfg = TINY if args.smoke else LLAMA3_8B
    batches = [int(b) for b in args.batches.split(",")]
    kernel_batches = [int(b) for b in args.kernel_batches.split(",")]
    if args.smoke:
        batches, args.prompt_len, args.output_len = [1, 2], 8, 6
        kernel_batches = [1, 2, 16]
        args.long_context = min(args.long_context, 48)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {device_name()}", flush=True)
    rows: list[dict[str, Any]] = []
    copies, reps = (2, 5) if args.smoke else (8, 50)
    for scheme in schemes:
        for m in kernel_batches:
            rows.append(run_kernels(scheme, cfg, m, copies, reps))
            print(rows[-1], flush=True)
            if rows[-1]["activations"] == "fused":
                rows.append(run_kernels(scheme, cfg, m, copies, reps, fused=False))
                print(rows[-1], flush=True)
    for scheme, kv in runs:
        engine_rows, nbytes = run_engine(
            scheme, kv, cfg, batches, args.prompt_len, args.output_len, args.smoke
        )
        for r in engine_rows:
            r["floor_ms"] = 1e3 * nbytes / bw
        rows += engine_rows
    if args.long_context:
        long_cfg = dict(cfg, max_position_embeddings=args.long_context + 1024)
        out_len = 6 if args.smoke else 64
        for kv in ("auto", "fp8"):
            long_rows, _ = run_engine(
                "none",
                kv,
                long_cfg,
                [1],
                args.long_context,
                out_len,
                args.smoke,
                bench="quant-long-context",
                max_num_batched_tokens=8192,  # the long prompt goes in chunks (and the profiling step too)
            )
            rows += long_rows

    meta = dict(
        model="tiny" if args.smoke else "llama3-8b",
        device=device_name(),
        date=dt.date.today().isoformat(),
        commit=commit(),
        copy_tb_s=bw / 1e12,
    )
    base = {
        (r["bench"], r["batch"]): r
        for r in rows
        if r["quantization"] == "none" and r.get("kv_cache_dtype", "auto") == "auto"
    }
    for r in rows:
        r.update(meta)
        b = base.get((r["bench"], r["batch"]))
        if r["bench"] == "quant-long-context":
            r["ms_ratio_vs_bf16"] = r["ms_per_token"] / b["ms_per_token"] if b else None
            r["kv_tokens_ratio"] = r["kv_tokens"] / b["kv_tokens"] if b else None
        elif r["bench"] == "quant-decode":
            r["frac_of_floor"] = r["floor_ms"] / r["ms_per_token"] if r["batch"] == 1 else None
            r["ms_ratio_vs_bf16"] = r["ms_per_token"] / b["ms_per_token"] if b else None
            r["speedup"] = r["output_tok_s"] / b["output_tok_s"] if b else None
            r["kv_tokens_ratio"] = r["kv_tokens"] / b["kv_tokens"] if b else None
        else:
            r["gb_s"] = r["bytes"] / (r["us"] * 1e-6) / 1e9
            r["ratio_vs_bf16"] = r["us"] / b["us"] if b else None
    print(
        f"\n{'scheme':<9}{'KV':>5}{'batch':>6}{'context':>8}{'ms/token':>10}{'x bf16':>8}{'floor ms':>10}"
        f"{'of floor':>9}{'tok/s':>9}{'KV tokens':>11}"
    )
    for r in rows:
        if r["bench"] in ("quant-decode", "quant-long-context"):
            print(
                f"{r['quantization']:<9}{r['kv_cache_dtype']:>5}{r['batch']:>6}{r['prompt_len']:>8}"
                f"{r['ms_per_token']:>10.2f}{r['ms_ratio_vs_bf16'] or 0:>8.2f}{r.get('floor_ms', 0):>10.2f}"
                f"{r.get('frac_of_floor') or 0:>9.2f}{r['output_tok_s']:>9.0f}{r['kv_tokens']:>11}"
            )
    print(f"\n{'kernels':<9}{'x in':>8}{'M':>6}{'us/layer':>10}{'x bf16':>8}{'GB/s':>8}")
    for r in rows:
        if r["bench"] == "quant-kernel":
            print(
                f"{r['quantization']:<9}{r['activations'] or '':>8}{r['batch']:>6}{r['us']:>10.1f}"
                f"{r['ratio_vs_bf16'] or 0:>8.2f}{r['gb_s']:>8.0f}"
            )
    default_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out = Path(args.out) if args.out else default_dir / f"quant-{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
