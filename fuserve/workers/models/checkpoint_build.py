"""`fuserve build`: convert a checkpoint ahead of time into what each tensor-parallel rank loads.

The same loader that serves an HF folder or a GGUF file builds each rank's model on the CPU (fusing
QKV and gate/up, taking the rank's shard, quantizing each slice per output channel as it lands) and
its parameters are written as they are, one safetensors file per rank, named as the parameters. At
start-up a rank then copies its file straight onto its device: no fusing, slicing or quantizing.

  SRC (HF folder | .gguf) ──load as rank r of N (CPU, --dtype, --quant)──► rank-r.safetensors
                          └──sha256, config, limits───────────────────────► fuserve-build.json
  plus the tokenizer and generation_config files of an HF folder, so the folder serves on its own.

With `--kv-cache fp8` the build also calibrates the FP8 KV cache's per-head scales (workers/kv_scales.py)
once, on the whole model (TP 1, the scheme's weights), reading text shipped with fuserve through the
model's own tokenizer and the start-up's random tokens, and writes each rank's heads' scales into its
file: serving then skips the start-up calibration. The calibration holds the whole model in CPU
memory once.

With `--calibrate gptq` (8-bit schemes) the 8-bit weights are rounded by error-compensated rounding
on calibration text instead of to nearest (models/gptq_build.py): the same tensors, better values;
the manifest records it under `calibration`.

Deterministic: the tensors, their order, the metadata and the manifest depend only on the inputs, so
building twice writes the same bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from fuserve.configs import ModelConfig
from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.kv_scales import (
    CALIBRATION_TEXT,
    CALIBRATION_TOKENS,
    HEADROOM,
    calibrate_kv_scales,
    kv_scale_state,
    random_calibration_ids,
    text_calibration_ids,
)
from fuserve.workers.models.build_manifest import MANIFEST_NAME, BuildManifest, source_sha256
from fuserve.workers.models.gptq_build import (
    CALIBRATE_METHODS,
    build_hessians,
    calibration_record,
    full_precision_weights,
    requantize_gptq,
)
from fuserve.workers.models.llama import LlamaArch, LlamaForCausalLM
from fuserve.workers.models.loader import (
    ModelSource,
    build_model,
    load_tokenizer,
    quant_scheme,
    resolve_source,
)
from fuserve.workers.models.quant_scheme import QuantScheme

# what an HF folder holds besides its weights that serving reads
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# replaces the loader's round-to-nearest 8-bit weights of a rank's model (or leaves them)
RoundWeights = Callable[[LlamaForCausalLM, TPContext], None]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _calibrated_model(
    source: ModelSource, scheme: QuantScheme | None, dtype: torch.dtype, round_weights: RoundWeights
) -> tuple[LlamaForCausalLM, str]:
    """The whole model (TP 1) with its FP8 KV scales calibrated, and what it was calibrated on: the
    shipped text through the model's tokenizer and the start-up's seeded random ids."""
    positions = min(CALIBRATION_TOKENS, LlamaArch.from_hf(source.hf_config).max_position_embeddings)
    cpu = torch.device("cpu")
    model = build_model(source, TPContext(), KernelOps.reference(), dtype, cpu, positions, quant=scheme)
    round_weights(model, TPContext())
    vocab = model.arch.vocab_size
    sequences, what = [random_calibration_ids(vocab)], f"{CALIBRATION_TOKENS} random tokens (seed 0)"
    try:
        text = text_calibration_ids(load_tokenizer(source), vocab)
        sequences.insert(0, text)
        what = f"the first {len(text)} tokens of {CALIBRATION_TEXT.name} and {what}, the larger amax per head"
    except FileNotFoundError:  # an HF folder without tokenizer.json
        what += " only (the checkpoint has no tokenizer)"
    calibrate_kv_scales(model, block_size=16, sequences=sequences)
    return model, what


def _weight_rounding(
    source: ModelSource, scheme: QuantScheme | None, calibrate: str, dtype: torch.dtype
) -> tuple[RoundWeights, dict[str, object]]:
    """How each rank's 8-bit weights are rounded, and the manifest's record of it."""
    if calibrate not in CALIBRATE_METHODS:
        raise ValueError(f"unknown --calibrate {calibrate!r}; choose one of {', '.join(CALIBRATE_METHODS)}")
    if calibrate == "none":
        return lambda model, tp: None, {}
    if scheme is None:
        raise ValueError(f"--calibrate {calibrate} rounds 8-bit weights: add --quant int8-wo, fp8-wo or fp8")
    hessians, tokens = build_hessians(source)

    def gptq(model: LlamaForCausalLM, tp: TPContext) -> None:
        requantize_gptq(model, full_precision_weights(source, tp, dtype), hessians, scheme, tp)

    return gptq, calibration_record(tokens)


def build_checkpoint(
    src: str,
    out: Path,
    tensor_parallel_size: int = 1,
    quantization: str = "none",
    dtype: str = "bfloat16",
    max_model_len: int | None = None,
    kv_cache_dtype: str = "auto",
    calibrate: str = "none",
) -> BuildManifest:
    """Write `out` (created or overwritten) and return its manifest."""
    model_cfg = ModelConfig(path=src, quantization=quantization)  # type: ignore[arg-type]
    source = resolve_source(model_cfg)
    if source.kind not in ("safetensors", "gguf"):
        raise ValueError(f"{src} is a {source.kind} model; `fuserve build` reads an HF folder or .gguf file")
    assert source.path is not None
    arch = LlamaArch.from_hf(source.hf_config)
    limit = min(max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
    scheme = quant_scheme(source, model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank-*.safetensors"):
        stale.unlink()
    round_weights, calibration = _weight_rounding(source, scheme, calibrate, DTYPES[dtype])
    calibrated, kv_scales = None, {}
    if kv_cache_dtype == "fp8":
        calibrated, what = _calibrated_model(source, scheme, DTYPES[dtype], round_weights)
        kv_scales = {"calibration": what, "granularity": "per-layer per-KV-head", "headroom": HEADROOM}
    rank_files, tensors, scales = [], [], []
    for rank in range(tensor_parallel_size):
        tp = TPContext(rank=rank, size=tensor_parallel_size)
        if calibrated is not None and tensor_parallel_size == 1:
            model = calibrated  # the same TP 1 model: no second build
        else:
            model = build_model(
                source, tp, KernelOps.reference(), DTYPES[dtype], torch.device("cpu"), 1, quant=scheme
            )
            round_weights(model, tp)
        state = {name: p.data.contiguous() for name, p in model.named_parameters()}
        if calibrated is not None:
            state.update(kv_scale_state(calibrated, model))
        name = f"rank-{rank}.safetensors"
        # one metadata key: safetensors writes its metadata map in hash order (2 keys: differs run to run)
        save_file(state, str(out / name), metadata={"format": "pt"})
        rank_files.append(name)
        tensors.append({n: {"shape": list(t.shape), "dtype": _dtype_name(t)} for n, t in state.items()})
        if rank == 0:
            scales = sorted(n for n in state if n.endswith(".weight_scale"))
            if calibrated is not None:
                kv_scales["tensors"] = sorted(n for n in state if n.endswith((".k_scale", ".v_scale")))
        del model, state
    del calibrated
    if source.kind == "safetensors":
        for side in SIDE_FILES:
            if (source.path / side).is_file():
                shutil.copyfile(source.path / side, out / side)
    manifest = BuildManifest(
        source={
            "kind": source.kind,
            "name": source.name,
            "path": str(source.path.resolve()),
            "sha256": source_sha256(source.path),
        },
        hf_config=source.hf_config,
        tensor_parallel_size=tensor_parallel_size,
        quantization=scheme.name if scheme is not None else "none",
        dtype=dtype,
        limits={"max_model_len": limit},
        rank_files=rank_files,
        tensors=tensors,
        scales={"granularity": "per-output-channel", "dtype": "float32", "tensors": scales},
        kv_cache_dtype=kv_cache_dtype,
        kv_scales=kv_scales,
        calibration=calibration,
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest
