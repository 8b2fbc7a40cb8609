"""`fuserve build --calibrate gptq`: requantize a built rank's 8-bit weights by error-compensated rounding.

The loader quantizes each slice to nearest as it lands (models/quant_scheme.py). With GPTQ the build
first measures every linear layer's input second moments on the whole full-precision model (TP 1, fp32,
models/calibration_hessians.py), then, per rank, rounds that rank's full-precision weights (the values
the loader would have quantized, in the build dtype) with GPTQ (models/gptq.py) into the same
parameters: same names, dtypes and per-row scales, so serving and the kernels do not change. A
row-parallel layer (o_proj, down_proj) holds a slice of the input columns under TP > 1: it takes the
matching block of H. Cost on the CPU for SmolLM2-135M: ~25 s of calibration, ~40 s (int8) to ~90 s
(e4m3) of rounding; too slow to run at every start-up, so it is a build option only.
"""

from __future__ import annotations

import torch

from fuserve.parallel.layers import _Linear
from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.models.calibration_hessians import (
    CALIBRATION_MODULES,
    CALIBRATION_TOKENS,
    SEQ_LEN,
    calibration_sequences,
    collect_hessians,
)
from fuserve.workers.models.gptq import BLOCK, DAMP, gptq_quantize_rows
from fuserve.workers.models.llama import LlamaArch, LlamaForCausalLM
from fuserve.workers.models.loader import ModelSource, build_model, load_tokenizer
from fuserve.workers.models.quant_scheme import QuantScheme

CALIBRATE_METHODS = ("none", "gptq")


def build_hessians(
    source: ModelSource, tokens: int = CALIBRATION_TOKENS
) -> tuple[dict[str, torch.Tensor], int]:
    """Every linear layer's H from the whole fp32 model on the calibration text; and the token count."""
    positions = min(SEQ_LEN, LlamaArch.from_hf(source.hf_config).max_position_embeddings)
    cpu = torch.device("cpu")
    model = build_model(source, TPContext(), KernelOps.reference(), torch.float32, cpu, positions)
    try:
        tokenizer = load_tokenizer(source)
    except FileNotFoundError as e:
        raise ValueError(
            f"--calibrate gptq reads calibration text through the model's tokenizer, and {source.path} "
            "has none: add its tokenizer.json, or build without --calibrate"
        ) from e
    sequences = calibration_sequences(tokenizer, model.arch.vocab_size, tokens, positions)
    return collect_hessians(model, sequences), sum(map(len, sequences))


def full_precision_weights(source: ModelSource, tp: TPContext, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This rank's linear weights as the loader fuses and slices them, unquantized, in `dtype`."""
    model = build_model(source, tp, KernelOps.reference(), dtype, torch.device("cpu"), 1)
    return {n: m.weight.data for n, m in model.named_modules() if isinstance(m, _Linear)}


def requantize_gptq(
    model: LlamaForCausalLM,
    weights: dict[str, torch.Tensor],
    hessians: dict[str, torch.Tensor],
    scheme: QuantScheme,
    tp: TPContext,
) -> None:
    """Overwrite each 8-bit layer's weight and weight_scale with GPTQ's rounding of `weights[name]`."""
    for name, module in model.named_modules():
        if not isinstance(module, _Linear) or module.weight_scale is None:
            continue
        w, h = weights[name].float(), hessians[name]
        k = w.shape[1]
        if h.shape[0] != k:  # row-parallel: this rank's contiguous slice of the input columns
            h = h[tp.rank * k : (tp.rank + 1) * k, tp.rank * k : (tp.rank + 1) * k]
        q, scale = gptq_quantize_rows(w, h, scheme)
        module.weight.data.copy_(q)
        module.weight_scale.data.copy_(scale)


def calibration_record(tokens: int) -> dict[str, object]:
    """What the manifest says about the rounding (`calibration`)."""
    return {
        "method": "gptq",
        "text": f"workers/kv_calibration.txt and CPython stdlib {', '.join(CALIBRATION_MODULES)}",
        "tokens": tokens,
        "sequence_length": SEQ_LEN,
        "damp": DAMP,
        "block": BLOCK,
        "column_order": "descending H diagonal",
        "hessian_model": "fp32, TP 1",
    }
