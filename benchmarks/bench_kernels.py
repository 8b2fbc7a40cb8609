"""Kernel benchmark: fuserve's Triton kernels against their torch references and the best torch peers.

For each kernel at Llama-3-8B shapes and Llama-3-70B-per-GPU shapes at TP=8 it times (median of
`triton.testing.do_bench`, L2 flushed between runs) the Triton launcher, the plain-torch reference
and, for attention, torch's own fused kernels:

    rmsnorm, fused_add_rmsnorm, silu_mul(_fp8), rotary_kv_write   tokens 1 / 64 / 4096  -> TB/s
    paged_decode_attention   batch 1/16/64 × context 128/1024/4096/16384           -> TB/s
        peers on the gathered contiguous K/V: SDPA (enable_gqa), compiled flex_attention
    paged_prefill_attention  1 × 4096 and 8 × 512 fresh prompts                    -> TFLOP/s
        peer: SDPA causal (enable_gqa) on contiguous K/V

Bandwidth counts the bytes a kernel must move once (inputs read, outputs written); attention FLOPs
count the visible (causal) query-key pairs. Each figure is also given as a fraction of a ceiling
measured in the same run: a large device-to-device copy (read + write bytes) and an 8192³ bf16
matmul. Decode rows for the Triton kernel come twice: `timing: eager` (launch overhead included)
and `timing: cudagraph` (as the engine runs decode).

    python benchmarks/bench_kernels.py                     # on the GPU machine, all of it
    python benchmarks/bench_kernels.py --ops decode --models llama3-8b
    python benchmarks/bench_kernels.py --smoke --out /tmp/k.json   # CPU, tiny shapes, refs and peers only

Rows are flat dicts (bench="kernel", engine, model, device, date, commit, op, shape fields, ms,
tb_s or tflop_s, frac_of_ceiling, error where a measurement failed), written as a JSON list to
--out; a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from fuserve.workers.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from fuserve.workers.kernels.paged_prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from fuserve.workers.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from fuserve.workers.kernels.rotary import rotary_kv_write, rotary_kv_write_ref
from fuserve.workers.kernels.silu_mul import silu_mul, silu_mul_fp8, silu_mul_fp8_ref, silu_mul_ref

OPS = ("rmsnorm", "fused_add_rmsnorm", "silu_mul", "silu_mul_fp8", "rotary_kv_write", "decode", "prefill")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    num_q_heads: int  # per GPU
    num_kv_heads: int  # per GPU
    head_dim: int
    intermediate: int  # per GPU
    block_size: int


MODELS = {
    "llama3-8b": ModelShape("llama3-8b", 4096, 32, 8, 128, 14336, 16),
    "llama3-70b-tp8": ModelShape("llama3-70b-tp8", 8192, 64 // 8, 1, 128, 28672 // 8, 16),
}
SMOKE_MODEL = ModelShape("smoke", 64, 4, 2, 16, 96, 8)


@dataclass(frozen=True)
class Sizes:
    tokens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    prefill: tuple[tuple[int, int], ...]  # (sequences, prompt length)


FULL_SIZES = Sizes((1, 64, 4096), (1, 16, 64), (128, 1024, 4096, 16384), ((1, 4096), (8, 512)))
SMOKE_SIZES = Sizes((1, 8), (1, 2), (16, 40), ((1, 24), (2, 8)))


@dataclass
class Run:
    """What every row shares, the ceilings, and the rows so far."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    base: dict[str, object]
    copy_tb_s: float = float("nan")
    matmul_tflop_s: float = float("nan")
    rows: list[dict[str, object]] = field(default_factory=list)


def _commit() -> str:
    if os.environ.get("FUSERVE_COMMIT"):
        return os.environ["FUSERVE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(run: Run, fn: Callable[[], object], cudagraph: bool = False) -> float:
    """Median milliseconds of one call of fn."""
    if run.device.type == "cuda":
        import triton.testing

        if cudagraph:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # CPU (smoke): a warm-up call, then a few timed ones
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure_ceilings(run: Run) -> None:
    """Copy bandwidth (bytes read + written) and dense matmul throughput on this device."""
    copy_bytes, matmul_n = (1 << 30, 8192) if not run.smoke else (1 << 22, 256)
    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=run.device).normal_()
    dst = torch.empty_like(src)
    run.copy_tb_s = 2 * copy_bytes / (time_ms(run, partial(dst.copy_, src)) * 1e-3) / 1e12
    del src, dst
    matmul_dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    a = torch.randn(matmul_n, matmul_n, dtype=matmul_dtype, device=run.device)
    b = torch.randn(matmul_n, matmul_n, dtype=matmul_dtype, device=run.device)
    run.matmul_tflop_s = 2 * matmul_n**3 / (time_ms(run, partial(torch.matmul, a, b)) * 1e-3) / 1e12
    del a, b
    print(f"ceilings: copy {run.copy_tb_s:.2f} TB/s, matmul {run.matmul_tflop_s:.1f} TFLOP/s", flush=True)


def record(
    run: Run,
    engine: str,
    op: str,
    model: ModelShape,
    shape: dict[str, object],
    fn: Callable[[], object],
    bytes_moved: float | None = None,
    flops: float | None = None,
    cudagraph: bool = False,
) -> None:
    """Time fn and append its row; a failure becomes a row with `error`, never a crash."""
    row: dict[str, object] = {
        **run.base,
        "engine": engine,
        "model": model.name,
        "op": op,
        **shape,
        "dtype": str(run.dtype).removeprefix("torch."),
        "timing": "cudagraph" if cudagraph else "eager",
        "ceiling_copy_tb_s": round(run.copy_tb_s, 4),
        "ceiling_matmul_tflop_s": round(run.matmul_tflop_s, 2),
    }
    try:
        ms = time_ms(run, fn, cudagraph=cudagraph)
        row["ms"] = round(ms, 5)
        if bytes_moved is not None:
            row["tb_s"] = round(bytes_moved / (ms * 1e-3) / 1e12, 4)
            row["frac_of_ceiling"] = round(row["tb_s"] / run.copy_tb_s, 4)
        if flops is not None:
            row["tflop_s"] = round(flops / (ms * 1e-3) / 1e12, 3)
            row["frac_of_ceiling"] = round(row["tflop_s"] / run.matmul_tflop_s, 4)
    except Exception as exc:  # noqa: BLE001 (a failed peer is a result, not a crash)
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
        if os.environ.get("FUSERVE_BENCH_TRACEBACK"):
            traceback.print_exc()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    run.rows.append(row)
    figure = row.get("tb_s", row.get("tflop_s", ""))
    print(f"{op:<24} {engine:<15} {shape} {row.get('ms', row.get('error'))} {figure}", flush=True)


def _engines(run: Run) -> list[str]:
    """The Triton kernels run on the GPU only; the smoke run on CPU checks the rest of the script."""
    return ["torch-ref"] if run.smoke else ["fuserve-triton", "torch-ref"]


def bench_rmsnorm(run: Run, model: ModelShape, sizes: Sizes) -> None:
    elem = run.dtype.itemsize
    for tokens in sizes.tokens:
        x = torch.randn(tokens, model.hidden, dtype=run.dtype, device=run.device)
        residual = torch.randn_like(x)
        weight = torch.randn(model.hidden, dtype=run.dtype, device=run.device)
        shape = {"tokens": tokens, "hidden": model.hidden}
        for engine in _engines(run):
            norm, fused = (
                (rmsnorm, fused_add_rmsnorm)
                if engine == "fuserve-triton"
                else (rmsnorm_ref, fused_add_rmsnorm_ref)
            )
            moved = (2 * tokens + 1) * model.hidden * elem
            record(run, engine, "rmsnorm", model, shape, partial(norm, x, weight, 1e-5), bytes_moved=moved)
            moved = (4 * tokens + 1) * model.hidden * elem
            fn = partial(fused, x, residual, weight, 1e-5)
            record(run, engine, "fused_add_rmsnorm", model, shape, fn, bytes_moved=moved)


def bench_silu_mul(run: Run, model: ModelShape, sizes: Sizes, ops: list[str]) -> None:
    """silu_mul, and silu_mul_fp8 (the FP8 W8A8 MLP's product quantized per token: e4m3 out, one fp32
    scale a token), of the ones in `ops`, on the same inputs."""
    elem = run.dtype.itemsize
    variants = [  # op, the Triton launcher, its torch reference, bytes moved per token
        ("silu_mul", silu_mul, silu_mul_ref, 3 * model.intermediate * elem),
        ("silu_mul_fp8", silu_mul_fp8, silu_mul_fp8_ref, model.intermediate * (2 * elem + 1) + 4),
    ]
    for tokens in sizes.tokens:
        x = torch.randn(tokens, 2 * model.intermediate, dtype=run.dtype, device=run.device)
        shape = {"tokens": tokens, "intermediate": model.intermediate}
        for op, kernel, ref, per_token in variants:
            if op not in ops:
                continue
            for engine in _engines(run):
                fn = kernel if engine == "fuserve-triton" else ref
                record(run, engine, op, model, shape, partial(fn, x), bytes_moved=tokens * per_token)


def bench_rotary(run: Run, model: ModelShape, sizes: Sizes) -> None:
    hq, hkv, d, bs = model.num_q_heads, model.num_kv_heads, model.head_dim, model.block_size
    for tokens in sizes.tokens:
        qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=run.dtype, device=run.device)
        q = qkv[:, : hq * d].view(tokens, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
        max_positions = 8192
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=run.device, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(max_positions, device=run.device, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        positions = torch.randint(0, max_positions, (tokens,), device=run.device)
        num_blocks = math.ceil(tokens / bs) + 1
        k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=run.dtype, device=run.device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(num_blocks * bs, device=run.device)[:tokens]
        shape = {"tokens": tokens, "q_heads": hq, "kv_heads": hkv, "head_dim": d}
        moved = 2 * tokens * (hq + 2 * hkv) * d * run.dtype.itemsize + tokens * (2 * d + 16)
        for engine in _engines(run):
            fn = rotary_kv_write if engine == "fuserve-triton" else rotary_kv_write_ref
            call = partial(fn, q, k, v, positions, cos, sin, k_cache, v_cache, slots)
            record(run, engine, "rotary_kv_write", model, shape, call, bytes_moved=moved)


def _paged_cache(
    run: Run, model: ModelShape, context_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches holding the sequences in shuffled blocks, and their block tables."""
    bs = model.block_size
    blocks_per_seq = [math.ceil(n / bs) for n in context_lens]
    num_blocks = sum(blocks_per_seq)
    shape = (num_blocks, bs, model.num_kv_heads, model.head_dim)
    k_cache = torch.empty(shape, dtype=run.dtype, device=run.device).normal_()
    v_cache = torch.empty(shape, dtype=run.dtype, device=run.device).normal_()
    ids = torch.randperm(num_blocks, device=run.device).int()
    tables = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32, device=run.device)
    start = 0
    for b, num in enumerate(blocks_per_seq):
        tables[b, :num] = ids[start : start + num]
        start += num
    return k_cache, v_cache, tables


def _gather_contiguous(
    k_cache: torch.Tensor, tables: torch.Tensor, context_len: int
) -> torch.Tensor:  # -> [B, Hkv, ctx, D]
    batch = tables.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2:]
    blocks = k_cache[tables.long()].reshape(batch, -1, num_kv_heads, head_dim)[:, :context_len]
    return blocks.transpose(1, 2).contiguous()


def bench_decode(run: Run, model: ModelShape, sizes: Sizes, flex: Callable | None) -> None:
    hq, hkv, d = model.num_q_heads, model.num_kv_heads, model.head_dim
    scale, op = d**-0.5, "paged_decode_attention"
    for batch in sizes.decode_batches:
        for context in sizes.decode_contexts:
            try:
                k_cache, v_cache, tables = _paged_cache(run, model, [context] * batch)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            q = torch.randn(batch, hq, d, dtype=run.dtype, device=run.device)
            lens = torch.full((batch,), context, dtype=torch.int32, device=run.device)
            shape = {"batch": batch, "context_len": context, "q_heads": hq, "kv_heads": hkv, "head_dim": d}
            moved = (
                2 * batch * context * hkv * d + 2 * batch * hq * d
            ) * run.dtype.itemsize + tables.numel() * 4
            args = (q, k_cache, v_cache, tables, lens, scale, context)
            if not run.smoke:
                for cudagraph in (False, True):
                    call = partial(paged_decode_attention, *args)
                    record(
                        run, "fuserve-triton", op, model, shape, call, bytes_moved=moved, cudagraph=cudagraph
                    )
            call = partial(paged_decode_attention_ref, *args)
            record(run, "torch-ref", op, model, shape, call, bytes_moved=moved)

            # peers read a contiguous copy of each sequence's K/V (the gather is not timed)
            try:
                k = _gather_contiguous(k_cache, tables, context)
                v = _gather_contiguous(v_cache, tables, context)
            except torch.OutOfMemoryError:  # the peers' rows then record the failure
                torch.cuda.empty_cache()
                k = v = None
            q4 = q[:, :, None, :]  # [B, Hq, 1, D]
            peer_shape = {**shape, "kv_layout": "contiguous"}
            call = partial(F.scaled_dot_product_attention, q4, k, v, scale=scale, enable_gqa=True)
            record(run, "torch-sdpa", op, model, peer_shape, call, bytes_moved=moved)
            if flex is not None:
                call = partial(flex, q4, k, v, scale=scale, enable_gqa=True)
                record(run, "flex-attention", op, model, peer_shape, call, bytes_moved=moved)
            del k_cache, v_cache, k, v
            if run.device.type == "cuda":
                torch.cuda.empty_cache()


def bench_prefill(run: Run, model: ModelShape, sizes: Sizes) -> None:
    hq, hkv, d = model.num_q_heads, model.num_kv_heads, model.head_dim
    scale, op = d**-0.5, "paged_prefill_attention"
    for batch, length in sizes.prefill:
        k_cache, v_cache, tables = _paged_cache(run, model, [length] * batch)
        q = torch.randn(batch * length, hq, d, dtype=run.dtype, device=run.device)
        starts = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=run.device)
        lens = torch.full((batch,), length, dtype=torch.int32, device=run.device)
        shape = {"batch": batch, "prompt_len": length, "q_heads": hq, "kv_heads": hkv, "head_dim": d}
        flops = 4 * hq * d * batch * length * (length + 1) / 2  # QKᵀ and PV over the causal pairs
        args = (q, k_cache, v_cache, tables, starts, lens, scale, length)
        for engine in _engines(run):
            fn = paged_prefill_attention if engine == "fuserve-triton" else paged_prefill_attention_ref
            record(run, engine, op, model, shape, partial(fn, *args), flops=flops)
        k, v = _gather_contiguous(k_cache, tables, length), _gather_contiguous(v_cache, tables, length)
        q4 = q.view(batch, length, hq, d).transpose(1, 2)
        call = partial(F.scaled_dot_product_attention, q4, k, v, is_causal=True, scale=scale, enable_gqa=True)
        record(run, "torch-sdpa", op, model, {**shape, "kv_layout": "contiguous"}, call, flops=flops)
        del k_cache, v_cache, k, v


def _compiled_flex(run: Run) -> Callable | None:
    """flex_attention must be compiled to be fast; a failure to import shows up as error rows."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        message = f"flex_attention unavailable: {exc}"

        def unavailable(*args: object, **kwargs: object) -> None:
            raise RuntimeError(message)

        return unavailable
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def _table_line(cells: tuple[object, ...]) -> str:
    op, model, shape, engine, timing, ms, figure, frac, error = (str(c) for c in cells)
    return (
        f"{op:<24} {model:<15} {shape:<26} {engine:<15} {timing:<9} {ms:>9} {figure:>12} {frac:>6}  {error}"
    )


def print_table(rows: list[dict[str, object]]) -> None:
    shape_keys = ("tokens", "hidden", "intermediate", "batch", "context_len", "prompt_len")
    print()
    header = ("op", "model", "shape", "engine", "timing", "ms", "TB/s|TFLOP/s", "frac", "error")
    print(_table_line(header))
    for row in rows:
        shape = " ".join(f"{k}={row[k]}" for k in shape_keys if k in row)
        figure = row.get("tb_s", row.get("tflop_s"))
        ms = f"{row['ms']:.4f}" if "ms" in row else "-"
        frac = f"{row['frac_of_ceiling']:.2f}" if "frac_of_ceiling" in row else "-"
        figure = "-" if figure is None else str(figure)
        cells = (
            row["op"],
            row["model"],
            shape,
            row["engine"],
            row["timing"],
            ms,
            figure,
            frac,
            row.get("error", ""),
        )
        print(_table_line(cells))


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, torch refs and peers only")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention (its compiles are slow)")
    args = parser.parse_args(argv)

    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --smoke")
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    run = Run(
        device=device,
        dtype=torch.bfloat16,
        smoke=args.smoke,
        base={
            "bench": "kernel",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": today,
            "commit": _commit(),
        },
    )
    torch.manual_seed(0)
    measure_ceilings(run)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}")
    models = [SMOKE_MODEL] if args.smoke else [MODELS[name.strip()] for name in args.models.split(",")]
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    flex = None if args.no_flex else _compiled_flex(run)

    for model in models:
        if "rmsnorm" in ops or "fused_add_rmsnorm" in ops:
            bench_rmsnorm(run, model, sizes)
        if "silu_mul" in ops or "silu_mul_fp8" in ops:
            bench_silu_mul(run, model, sizes, ops)
        if "rotary_kv_write" in ops:
            bench_rotary(run, model, sizes)
        if "decode" in ops:
            bench_decode(run, model, sizes, flex)
        if "prefill" in ops:
            bench_prefill(run, model, sizes)

    out = args.out or Path("benchmarks/results") / f"kernels{'-smoke' if args.smoke else ''}-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run.rows, indent=1) + "\n")
    print_table(run.rows)
    print(f"\n{len(run.rows)} rows -> {out}")
    return run.rows


if __name__ == "__main__":
    main()
