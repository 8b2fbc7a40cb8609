"""Engine decode and prefill on one GPU vs HF transformers eager, with the bandwidth floor.

Llama-3-8B shape, random bf16 weights (load_format dummy), prompt P + N new tokens, batch 1/16/64.
Measured in one run: device copy bandwidth (the floor = weight bytes / bandwidth per decode step),
bf16 GEMM rate (the prefill ceiling), HF transformers eager `generate`, fuserve (eager and with
CUDA graphs). Prints a table last and writes flat JSON rows (DESIGN.md's schema).

    python benchmarks/bench_decode.py --out $OUT/decode.json            # on the GPU machine
    python benchmarks/bench_decode.py --smoke                           # tiny shapes on CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

LLAMA3_8B: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
TINY: dict[str, Any] = dict(
    LLAMA3_8B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def commit() -> str:
    """FUSERVE_COMMIT first: the device machine's copy of the tree carries a stale .git."""
    if os.environ.get("FUSERVE_COMMIT"):
        return os.environ["FUSERVE_COMMIT"]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet"], check=False).returncode != 0
        return f"{sha}-dirty" if dirty else sha
    except Exception:
        return "unknown"


def median_ms(fn: Any, reps: int, cuda: bool) -> float:
    """Median ms of fn() over reps (CUDA events on GPU: device time, host launches included only where
    the GPU waits for them)."""
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def graph_us(fn: Any, calls: int = 20, replays: int = 15) -> float:
    """Microseconds per call: `calls` calls captured in one CUDA graph (warmed on a side stream first),
    the median of `replays` replays divided by `calls`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return median_ms(g.replay, replays, True) * 1e3 / calls


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    if not torch.cuda.is_available():
        return float("nan")
    import triton.testing

    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def gemm_rate() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def layer_params(cfg: dict[str, Any]) -> int:
    """The decoder layers' GEMM weights (q, k, v, o, gate, up, down), every layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return cfg["num_hidden_layers"] * (h * (h + 2 * kv) + h * h + 3 * h * i)


def weight_bytes(cfg: dict[str, Any], elem: int = 2) -> int:
    """Bytes of weights one decode step reads: the layers, their norms, the final norm and the head. Not
    the embedding table, of which a step reads one row a token (until 2026-11-30 it was counted, which
    put the 8B's floor 7% high and its batch-1 step at 0.96-0.98 of the floor instead of 0.89-0.92)."""
    h = cfg["hidden_size"]
    norms = (2 * cfg["num_hidden_layers"] + 1) * h
    return elem * (layer_params(cfg) + norms + cfg["vocab_size"] * h)


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def dummy_engine_config(
    cfg: dict[str, Any], batches: list[int], prompt_len: int, output_len: int, smoke: bool, **sections: dict
) -> dict[str, Any]:
    """The engine config every decode benchmark uses: random weights of `cfg`'s shape, room for the
    prompt and output, a batch as large as the largest measured; `sections` add or extend sections."""
    config: dict[str, Any] = {
        "model": {
            "load_format": "dummy",
            "hf_config": cfg,
            "max_model_len": prompt_len + output_len + 16,
            "dtype": "float32" if smoke else "bfloat16",
        },
        "scheduler": {"max_num_seqs": max(batches), "max_num_batched_tokens": max(4096, prompt_len * 8)},
        "kernels": {"cuda_graph_max_batch": max(batches)},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


_TIMED_RUNS = itertools.count()


def time_decode(engine: Any, batch: int, prompt_len: int, output_len: int, vocab: int) -> dict[str, float]:
    """Run `batch` greedy requests to completion; the median step after the first token is the
    per-token time, the whole run (prefill included) gives output tokens/s. Every call in a process
    draws new prompts: a warm-up's prompts again would be prefix-cache hits, a prefill not timed."""
    from fuserve.gc_tuning import gc_seconds_total
    from fuserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts(batch, prompt_len, vocab, seed=batch * 1000 + next(_TIMED_RUNS))):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", p, params)
    step_times = []
    gc_before = gc_seconds_total()
    started_at = time.time()
    start = time.perf_counter()
    first_token_at = None
    while engine.has_unfinished():
        s = time.perf_counter()
        outs = engine.step()
        e = time.perf_counter()
        if first_token_at is None and outs:
            first_token_at = e
        elif outs:
            step_times.append(e - s)
    total = time.perf_counter() - start
    median = sorted(step_times)[len(step_times) // 2]
    return dict(
        ms_per_token=1e3 * median,
        output_tok_s=batch * output_len / total,
        ttft_ms=1e3 * ((first_token_at or start) - start),
        # where the run's time went besides median steps: the steps after the first token in all, and
        # those over 3x the median (the prompts' last prefill chunks, stalls), in order, ms
        steps_ms=1e3 * sum(step_times),
        slow_steps_ms=[round(1e3 * t, 2) for t in step_times if t > 3 * median],
        gc_ms=1e3 * (gc_seconds_total() - gc_before),  # this process's time in Python's collector
        # every step after the first token, in order, and when the run began (epoch s): to line a slow run
        # up with the GPUs' clocks sampled beside it (tp_two_gpu_run.sh's gpu-clocks.log)
        step_ms=[round(1e3 * t, 3) for t in step_times],
        started_at=round(started_at, 3),
    )


def run_fuserve(
    cfg: dict[str, Any], batches: list[int], prompt_len: int, output_len: int, graphs: bool, smoke: bool
) -> list[dict[str, Any]]:
    from fuserve.configs import config_from_dict
    from fuserve.workers.engine import LLMEngine

    config = config_from_dict(
        dummy_engine_config(cfg, batches, prompt_len, output_len, smoke, kernels={"cuda_graphs": graphs})
    )
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    init_s = time.perf_counter() - t0
    rows = []
    for batch in batches + batches[:1]:  # the first batch size again at the end: a warm repeat
        timing = time_decode(engine, batch, prompt_len, output_len, cfg["vocab_size"])
        rows.append(
            dict(
                engine="fuserve" + ("" if graphs else "-eager"),
                batch=batch,
                prompt_len=prompt_len,
                output_len=output_len,
                **timing,
                init_s=init_s,
            )
        )
        print(rows[-1], flush=True)
    # the repeat of the first batch size replaces its cold row
    first = rows.pop()
    rows[0] = first
    del engine
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def run_hf(
    cfg: dict[str, Any], batches: list[int], prompt_len: int, output_len: int, smoke: bool
) -> list[dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    dtype = torch.float32 if smoke else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(old)
    rows = []
    for batch in batches:
        ids = torch.tensor(prompts(batch, prompt_len, cfg["vocab_size"], seed=batch), device=device)
        kw = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            sync()
            t0 = time.perf_counter()
            model.generate(ids[:, :], **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
            sync()
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            sync()
            total = time.perf_counter() - t0
        rows.append(
            dict(
                engine="hf-transformers",
                batch=batch,
                prompt_len=prompt_len,
                output_len=output_len,
                ms_per_token=1e3 * (total - ttft) / (output_len - 1),
                output_tok_s=batch * output_len / total,
                ttft_ms=1e3 * ttft,
            )
        )
        print(rows[-1], flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def run_prefill(cfg: dict[str, Any], length: int, gemm: float, smoke: bool) -> dict[str, Any]:
    from fuserve.configs import config_from_dict
    from fuserve.sampling_params import SamplingParams
    from fuserve.workers.engine import LLMEngine

    config = config_from_dict(
        {
            "model": {
                "load_format": "dummy",
                "hf_config": cfg,
                "max_model_len": length + 16,
                "dtype": "float32" if smoke else "bfloat16",
            },
            "scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": length},
            "kernels": {"cuda_graphs": False},
        }
    )
    engine = LLMEngine(config)
    times = []
    for rep in range(4):
        engine.add_request(
            f"p{rep}",
            prompts(1, length, cfg["vocab_size"], seed=rep)[0],
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        )
        sync()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    s = sorted(times[1:])[len(times[1:]) // 2]
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    # the layers' GEMMs for every token, the head for the last only, causal attention (QK^T, PV); until
    # 2026-11-30 the embedding table and the head counted for every token, 15% more than the work
    flops = 2 * layer_params(cfg) * length + 2 * cfg["vocab_size"] * h + 2 * layers * length * length * h
    del engine
    gc.collect()
    return dict(
        engine="fuserve",
        bench="prefill",
        batch=1,
        prompt_len=length,
        output_len=1,
        ms=1e3 * s,
        tflop_s=flops / s / 1e12,
        frac_of_gemm=flops / s / gemm,
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, just checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = TINY if args.smoke else LLAMA3_8B
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        batches, args.prompt_len, args.output_len, args.prefill_len = [1, 2], 8, 6, 32

    bw, gemm = copy_bandwidth(), gemm_rate()
    floor_ms = 1e3 * weight_bytes(cfg) / bw
    print(
        f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s, "
        f"weights {weight_bytes(cfg) / 1e9:.2f} GB -> batch-1 floor {floor_ms:.2f} ms/token",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    if not args.skip_hf:
        rows += [
            dict(r, bench="decode")
            for r in run_hf(cfg, batches, args.prompt_len, args.output_len, args.smoke)
        ]
    if not args.skip_eager:
        rows += [
            dict(r, bench="decode")
            for r in run_fuserve(cfg, batches, args.prompt_len, args.output_len, False, args.smoke)
        ]
    if torch.cuda.is_available():
        rows += [
            dict(r, bench="decode")
            for r in run_fuserve(cfg, batches, args.prompt_len, args.output_len, True, args.smoke)
        ]
    rows.append(run_prefill(cfg, args.prefill_len, gemm, args.smoke))

    hf = {r["batch"]: r for r in rows if r["engine"] == "hf-transformers"}
    meta = dict(
        model="llama3-8b" if not args.smoke else "tiny",
        device=device_name(),
        date=dt.date.today().isoformat(),
        commit=commit(),
        copy_tb_s=bw / 1e12,
        gemm_tflop_s=gemm / 1e12,
    )
    for r in rows:
        r.update(meta)
        if r.get("bench") == "decode":
            r["frac_of_floor"] = floor_ms / r["ms_per_token"] if r["batch"] == 1 else None
            base = hf.get(r["batch"])
            r["speedup"] = base["ms_per_token"] / r["ms_per_token"] if base else None
    print(f"\n{'engine':<18}{'batch':>6}{'ms/token':>10}{'tok/s':>10}{'ttft ms':>9}{'x HF':>7}{'floor':>7}")
    for r in rows:
        if r.get("bench") == "decode":
            print(
                f"{r['engine']:<18}{r['batch']:>6}{r['ms_per_token']:>10.2f}{r['output_tok_s']:>10.0f}"
                f"{r['ttft_ms']:>9.1f}{(r['speedup'] or 0):>7.1f}{(r['frac_of_floor'] or 0):>7.2f}"
            )
        else:
            print(
                f"prefill {r['prompt_len']} tokens: {r['ms']:.1f} ms, {r['tflop_s']:.0f} TFLOP/s "
                f"= {r['frac_of_gemm']:.2f} of the measured GEMM rate"
            )
    out = Path(args.out or f"benchmarks/results/decode-{meta['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
