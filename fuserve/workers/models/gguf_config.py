"""An HF `config.json` equivalent from a GGUF's metadata, named and valued as transformers' own GGUF
loader does, including the rope scaling that llama.cpp stores only as per-frequency divisors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuserve.workers.models.gguf_format import FLOAT_TYPES, GGUFTensorInfo

# GGUF architecture -> (HF model_type, HF architectures entry)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}


def _architecture(metadata: dict[str, Any], path: Path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported by fuserve; "
            f"supported: {sorted(_ARCHITECTURES)}"
        )
    return arch


def _required(metadata: dict[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise ValueError(f"{path}: GGUF metadata lacks {key!r}, which the model config needs")
    return metadata[key]


def _read_f32_tensor(path: Path, info: GGUFTensorInfo) -> np.ndarray:
    """A small float tensor read eagerly (the rope factors), as float64 for fitting."""
    if info.ggml_type not in FLOAT_TYPES:
        raise ValueError(f"{path}: tensor {info.name!r} is {info.type_name}; expected a float type")
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset))
    return raw.view(FLOAT_TYPES[info.ggml_type][0]).double().numpy()


def _llama3_rope_from_factors(
    factors: np.ndarray, rope_theta: float, rotary_dim: int, original_context: int, path: Path
) -> dict[str, Any] | None:
    """Recover HF's llama3 `rope_scaling` dict from the per-frequency divisors llama.cpp stores.

    llama.cpp does not write Llama 3.1's scaling parameters; its converter evaluates them into the
    `rope_freqs` tensor (one divisor per rotary frequency). Those divisors are 1 for short
    wavelengths, `factor` for long ones, and `1 / ((1 - s) / factor + s)` in between, where
    `s = (original_context / wavelength - low) / (high - low)` is linear in 1 / wavelength. Fitting that
    line over the middle band gives `low` and `high`; the dict is checked by recomputing the divisors.
    """
    factors = factors.reshape(-1)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if inv_freq.shape != factors.shape:
        raise ValueError(
            f"{path}: rope_freqs has {factors.size} entries, "
            f"expected {inv_freq.size} for rotary dim {rotary_dim}"
        )
    wavelength = 2 * math.pi / inv_freq
    band = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() < 2:
        raise NotImplementedError(
            f"{path}: cannot recover llama3 rope scaling from rope_freqs (fewer than two frequencies in "
            "the smoothed band); this file's rope scaling is not supported"
        )
    smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(original_context / wavelength[band], smooth, 1)
    low = round(float(-intercept / slope), 6)
    high = round(float(low + 1.0 / slope), 6)
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 6),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(original_context),
    }
    expected = _llama3_divisors(scaling, wavelength)
    if not np.allclose(expected, factors, rtol=1e-4, atol=0):
        raise NotImplementedError(
            f"{path}: rope_freqs does not follow the llama3 rope scaling formula; this file's rope "
            "scaling is not supported"
        )
    return scaling


def _llama3_divisors(scaling: dict[str, Any], wavelength: np.ndarray) -> np.ndarray:
    """The per-frequency divisors HF's llama3 rope applies, for checking a recovered dict."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelength - low) / (high - low)
    middle = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < original / high, 1.0, np.where(wavelength > original / low, factor, middle))


def _rope_scaling(
    metadata: dict[str, Any],
    tensors: dict[str, GGUFTensorInfo],
    arch: str,
    rope_theta: float,
    rotary_dim: int,
    path: Path,
) -> dict[str, Any] | None:
    """HF's `rope_scaling` for this file: from `{arch}.rope.scaling.*` keys, or llama3's `rope_freqs`."""
    prefix = f"{arch}.rope.scaling."
    kind = metadata.get(prefix + "type")
    factor = metadata.get(prefix + "factor")
    original = metadata.get(prefix + "original_context_length")
    if kind in (None, "none"):
        if "rope_freqs.weight" in tensors:
            factors = _read_f32_tensor(path, tensors["rope_freqs.weight"])
            return _llama3_rope_from_factors(factors, rope_theta, rotary_dim, original or 8192, path)
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "llama3":
        return {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": metadata.get(prefix + "low_freq_factor", 1.0),
            "high_freq_factor": metadata.get(prefix + "high_freq_factor", 4.0),
            "original_max_position_embeddings": original or 8192,
        }
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        for gguf_key, hf_key in (
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
            ("attn_factor", "attention_factor"),
        ):
            if prefix + gguf_key in metadata:
                scaling[hf_key] = metadata[prefix + gguf_key]
        return scaling
    raise NotImplementedError(f"{path}: rope scaling type {kind!r} is not supported")


def build_config(metadata: dict[str, Any], tensor_list: list[GGUFTensorInfo], path: Path) -> dict[str, Any]:
    """An HF `config.json` equivalent, named and valued as transformers' own GGUF loader does."""
    arch = _architecture(metadata, path)
    model_type, hf_class = _ARCHITECTURES[arch]
    tensors = {info.name: info for info in tensor_list}
    key = lambda name: f"{arch}.{name}"

    hidden = int(_required(metadata, key("embedding_length"), path))
    heads = int(_required(metadata, key("attention.head_count"), path))
    kv_heads = metadata.get(key("attention.head_count_kv"), heads)
    if isinstance(kv_heads, list):
        raise NotImplementedError(f"{path}: per-layer KV head counts are not supported")
    head_dim = int(metadata.get(key("attention.key_length"), hidden // heads))
    rotary_dim = int(metadata.get(key("rope.dimension_count"), head_dim))
    if rotary_dim != head_dim:
        raise NotImplementedError(
            f"{path}: partial rotary embeddings (rope dim {rotary_dim} < head dim {head_dim}) "
            "are not supported"
        )
    rope_theta = float(metadata.get(key("rope.freq_base"), 10000.0))

    if key("vocab_size") in metadata:
        vocab_size = int(metadata[key("vocab_size")])
    elif "token_embd.weight" in tensors:
        vocab_size = tensors["token_embd.weight"].shape[0]
    else:
        vocab_size = len(_required(metadata, "tokenizer.ggml.tokens", path))

    return {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden,
        "intermediate_size": int(_required(metadata, key("feed_forward_length"), path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "num_hidden_layers": int(_required(metadata, key("block_count"), path)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_required(metadata, key("attention.layer_norm_rms_epsilon"), path)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, tensors, arch, rope_theta, rotary_dim, path),
        "max_position_embeddings": int(_required(metadata, key("context_length"), path)),
        "vocab_size": vocab_size,
        # llama.cpp writes `output.weight` only when the head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        # Qwen2 always has q/k/v biases; a Llama file has them only if it stores them
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
    }
