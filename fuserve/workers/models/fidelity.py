"""Refuse a checkpoint whose config asks for computation fuserve does not implement.

An HF config.json field that changes the model's math and is ignored gives wrong tokens without a
word (Mistral's `sliding_window` diverged from HF once the sequence passed the window; `hidden_act:
gelu` ran as SiLU). Each such field is checked here when the model loads, and a config that needs
what is not built is refused with the field's name, its value and the way out:

    check_implemented(hf_config, max_model_len)   # raises UnsupportedConfigError

Fields that do not change the output (dropout, `pretraining_tp`, `use_cache`, ids and names) pass.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_ACTIVATIONS = ("silu", "swish")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# fields that must be absent or falsy: each changes the computation in a way the Llama model does not
UNIMPLEMENTED_FLAGS = (
    "mlp_bias",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "use_qk_norm",
    "qk_layernorm",
)


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something fuserve does not compute; the message names it."""


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The attention window the HF model applies, or None when every layer attends to all tokens.
    Mistral applies `sliding_window` whenever it is set; Qwen2 only with `use_sliding_window`, and
    then to the layers its `layer_types` mark (from `max_window_layers` on)."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if cfg.get("model_type") == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return None
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            if "sliding_attention" not in layer_types:
                return None
        elif cfg.get("max_window_layers", 0) >= cfg.get("num_hidden_layers", 0):
            return None
    return int(window)


def _rope_type(cfg: dict[str, Any]) -> str:
    for key in ("rope_scaling", "rope_parameters"):
        scaling = cfg.get(key)
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind != "default":
                return str(kind)
    return "default"


def _partial_rotary(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(cfg.get("partial_rotary_factor", 1.0) or 1.0)


def check_implemented(cfg: dict[str, Any], max_model_len: int) -> None:
    """Raises UnsupportedConfigError naming the first field whose value fuserve would not honor.
    `max_model_len` is the longest sequence served: a window at least that long never takes effect."""
    act = cfg.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedConfigError(
            f"config.json sets hidden_act {act!r}, but fuserve's MLP computes SiLU only "
            f"({', '.join(SUPPORTED_ACTIVATIONS)}); this checkpoint cannot be served correctly"
        )
    for name in UNIMPLEMENTED_FLAGS:
        if cfg.get(name):
            raise UnsupportedConfigError(
                f"config.json sets {name} = {cfg[name]!r}, which fuserve does not implement; "
                "this checkpoint cannot be served correctly"
            )
    kind = _rope_type(cfg)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"config.json sets rope_scaling type {kind!r}; fuserve implements "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if _partial_rotary(cfg) != 1.0:
        raise UnsupportedConfigError(
            f"config.json sets partial_rotary_factor {_partial_rotary(cfg)}; fuserve rotates whole heads only"
        )
    window = _sliding_window(cfg)
    if window is not None and window < max_model_len:
        raise UnsupportedConfigError(
            f"config.json sets sliding_window {window} (attention sees only the last {window} tokens), "
            f"which fuserve does not implement, and max_model_len is {max_model_len}: set "
            f"model.max_model_len to at most {window} so the window never takes effect"
        )
