"""The feature-reading (EAGLE-1) draft's file: how a config names one, and what it holds.

training/train_eagle.py writes it (`write_eagle`), a fuserve draft file (shipped_draft.py's format and
target metadata) with `architecture: eagle1`:

    eagle.fc.weight [H, 2H], eagle.fc.bias [H]       row i: a_i = fc([embed(x_{i+1}), f_i])
    model.layers.N.* (HF names)                      Llama decoder layers over the a_i, at position i
                                                     (`num_hidden_layers` of the metadata: 1 or more)
    eagle.out_scale [H], eagle.out_shift [H]         h_i = layer_out * out_scale + out_shift ~ f_{i+1}
    model.norm.weight [H]                            the target's final norm: logits = head(norm(h_i))
    draft.vocab_token_ids [V'] (optional)            the head's rows: a subset of the tied embedding

The target's embedding (input and tied head) stays in the target's own files and is read from there.
A layer's 2-D weights may be stored as int8 rows, each with an fp32 scale beside it (`<name>.int8_scale`):
that is what lets a draft of two layers stay within the 8 MB a shipped file may weigh. They are widened
on load (`dequantized`); fc stays 16-bit, since its feature half is divided by per-dimension scales
that span four orders of magnitude and a row's int8 step would erase the small ones.
A config names such a draft as a .safetensors file or `shipped:<name>`; `is_feature_draft` tells it
from the independent draft (an HF folder), so every place that builds a draft runner picks the right one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fuserve.configs import ModelConfig
from fuserve.speculative.shipped_draft import (
    VOCAB_TENSOR,
    draft_hf_config,
    file_sha256,
    is_shipped,
    read_draft_metadata,
    shipped_draft_file,
    target_config_and_embedding,
)

EAGLE_ARCH = "eagle1"  # the draft file's `architecture` metadata
FC_WEIGHT, FC_BIAS = "eagle.fc.weight", "eagle.fc.bias"
OUT_SCALE, OUT_SHIFT = "eagle.out_scale", "eagle.out_shift"
INT8_SCALE = ".int8_scale"  # suffix: the fp32 per-row scale of the int8 weight named before it


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (output channel) int8: w ~ q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors with every int8 weight widened to fp32 by its scale, the scales dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(INT8_SCALE):
            continue
        scale = tensors.get(name + INT8_SCALE)
        out[name] = t if scale is None else t.float() * scale.float()[:, None]
    return out


def draft_file_of(cfg: ModelConfig | None) -> Path | None:
    """The single draft file a model config names (`shipped:<name>` or a .safetensors path), else None."""
    if cfg is None or not cfg.path:
        return None
    if is_shipped(cfg.path):
        return shipped_draft_file(cfg.path.removeprefix("shipped:"))
    path = Path(cfg.path)
    return path if path.is_file() and path.suffix == ".safetensors" else None


def is_feature_draft(cfg: ModelConfig | None) -> bool:
    """Whether the config names an eagle1 draft file (read from its metadata, not its name)."""
    file = draft_file_of(cfg)
    if file is None:
        return False
    with safe_open(str(file), framework="pt") as f:
        return (f.metadata() or {}).get("architecture") == EAGLE_ARCH


@dataclass
class FeatureDraftWeights:
    """Everything the served draft is built from, on the host in the file's dtypes."""

    hf_config: dict[str, Any]  # the target's architecture at the draft's depth and MLP width
    llama: dict[str, torch.Tensor]  # HF names: the target's embedding, the layers, the final norm
    fc_weight: torch.Tensor
    fc_bias: torch.Tensor
    out_scale: torch.Tensor
    out_shift: torch.Tensor
    vocab: torch.Tensor | None  # [V'] int64 target ids the head may propose; None: the whole vocabulary


def read_feature_draft(file: Path, target_source: Path) -> FeatureDraftWeights:
    """The draft of `file` on the target at `target_source` (a .gguf file or an HF folder). A file
    trained for another GGUF target (its sha256 in the metadata) is refused: its features differ."""
    meta = read_draft_metadata(file)
    if meta.get("architecture") != EAGLE_ARCH:
        raise ValueError(f"{file} is not a feature-reading draft (architecture {meta.get('architecture')!r})")
    trained_for = meta.get("target_sha256")
    if trained_for and target_source.is_file():
        digest = file_sha256(target_source)
        if digest != trained_for:
            raise ValueError(
                f"{file.name} was trained for a target with sha256 {trained_for[:12]}, but "
                f"{target_source} has {digest[:12]}: serve it with its own target "
                f"({meta.get('target_package')})"
            )
    target_config, embed = target_config_and_embedding(target_source)
    with safe_open(str(file), framework="pt") as f:
        tensors = dequantized({name: f.get_tensor(name) for name in f.keys()})
    vocab = tensors.pop(VOCAB_TENSOR, None)
    eagle = {name: tensors.pop(name) for name in (FC_WEIGHT, FC_BIAS, OUT_SCALE, OUT_SHIFT)}
    return FeatureDraftWeights(
        hf_config=draft_hf_config(target_config, meta),
        llama={"model.embed_tokens.weight": embed, **tensors},
        fc_weight=eagle[FC_WEIGHT],
        fc_bias=eagle[FC_BIAS],
        out_scale=eagle[OUT_SCALE],
        out_shift=eagle[OUT_SHIFT],
        vocab=vocab.to(torch.int64) if vocab is not None else None,
    )
