"""The manifest of a built model folder (`fuserve build`), and the check that a config may serve it.

A built folder holds one safetensors file per tensor-parallel rank, already fused (QKV, gate/up),
sharded and quantized, named as the model's own parameters, plus `fuserve-build.json`:

  format                  "fuserve-build/1"
  source                  what it was built from: kind (safetensors|gguf), name, path, sha256 of its bytes
  hf_config               the architecture (config.json), so the folder serves on its own
  tensor_parallel_size    ranks, one file each (rank_files)
  quantization            none | int8-wo | fp8-wo | fp8; scales: per output channel, fp32, in
                          `<layer>.weight_scale` beside each 8-bit `<layer>.weight` (listed in `scales`)
  dtype                   the dtype of every full-precision tensor (embedding, norms, LM head)
  kv_cache_dtype          auto | fp8: the KV cache it is served with
  kv_scales               fp8 only: the FP8 KV scales the build calibrated (what on, headroom; one fp32
                          per KV head in `<layer>.self_attn.{k,v}_scale` of each rank file, that rank's
                          heads, listed in `tensors`); empty: calibrated at start-up
  calibration             how the 8-bit weights were rounded: empty for round-to-nearest, else the method
                          (gptq), its calibration text, token count and settings (models/gptq_build.py)
  limits                  max_model_len it was built for
  tensors                 per rank: name -> shape and dtype

Serving checks the config against it and refuses a mismatch, naming the setting: another TP size,
another scheme, another KV cache dtype, another source (when model.build_source names the
checkpoint), a longer context.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "fuserve-build.json"
FORMAT = "fuserve-build/1"
_CHUNK = 8 << 20


@dataclass
class BuildManifest:
    source: dict[str, str]
    hf_config: dict[str, Any]
    tensor_parallel_size: int
    quantization: str
    dtype: str
    limits: dict[str, int]
    rank_files: list[str]
    tensors: list[dict[str, dict[str, Any]]]
    scales: dict[str, Any] = field(default_factory=dict)
    kv_cache_dtype: str = "auto"
    kv_scales: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        """Sorted keys, no timestamps: building twice writes the same bytes."""
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> BuildManifest:
        data = json.loads((folder / MANIFEST_NAME).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(
                f"{folder / MANIFEST_NAME} has format {data.get('format')!r}; this fuserve reads {FORMAT!r}: "
                "rebuild the folder with this version's `fuserve build`"
            )
        return cls(**data)


def is_built_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def source_files(path: Path) -> list[Path]:
    """The files whose bytes define a checkpoint: a GGUF file, or an HF folder's config and weights."""
    if path.is_file():
        return [path]
    return [path / "config.json", *sorted(path.glob("*.safetensors"))]


def source_sha256(path: Path) -> str:
    """sha256 over each source file's name and bytes (seconds per GB: read once per build)."""
    digest = hashlib.sha256()
    for f in source_files(path):
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def check_manifest(
    manifest: BuildManifest,
    folder: Path,
    tensor_parallel_size: int,
    quantization: str,
    max_model_len: int | None,
    build_source: str | None,
    kv_cache_dtype: str = "auto",
) -> None:
    """Refuse to serve a built folder that does not match the config, saying which setting and how to fix."""
    rebuild = f"rebuild it with `fuserve build SRC --out {folder}` and matching options"
    if manifest.tensor_parallel_size != tensor_parallel_size:
        raise ValueError(
            f"{folder} was built for tensor_parallel_size {manifest.tensor_parallel_size}, but "
            f"parallel.tensor_parallel_size is {tensor_parallel_size}: set it to "
            f"{manifest.tensor_parallel_size}, or {rebuild} (--tp {tensor_parallel_size})"
        )
    if quantization not in ("auto", manifest.quantization):
        raise ValueError(
            f"{folder} was built with quantization {manifest.quantization!r}, but model.quantization is "
            f"{quantization!r}: set it to 'auto' or {manifest.quantization!r}, or {rebuild} "
            f"(--quant {quantization})"
        )
    if kv_cache_dtype not in ("auto", manifest.kv_cache_dtype):
        raise ValueError(
            f"{folder} was built for kv_cache_dtype {manifest.kv_cache_dtype!r}, but cache.kv_cache_dtype is "
            f"{kv_cache_dtype!r}: set it to 'auto', or {rebuild} (--kv-cache {kv_cache_dtype})"
        )
    built_len = manifest.limits.get("max_model_len")
    if max_model_len is not None and built_len is not None and max_model_len > built_len:
        raise ValueError(
            f"{folder} was built for max_model_len {built_len}, but model.max_model_len is {max_model_len}: "
            f"lower it, or {rebuild} (--max-model-len {max_model_len})"
        )
    if build_source is not None:
        got = source_sha256(Path(build_source))
        if got != manifest.source["sha256"]:
            raise ValueError(
                f"{folder} was built from another source: {manifest.source['path']} (sha256 "
                f"{manifest.source['sha256'][:12]}), but model.build_source {build_source} hashes to "
                f"{got[:12]}: {rebuild}"
            )
