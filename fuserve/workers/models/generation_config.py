"""The model author's generation settings (an HF folder's generation_config.json): stop tokens, and the
sampling defaults of requests that leave a setting unset.

Some stop tokens live only in this file: Llama-3-Instruct ends a turn with <|eot_id|>, which some of
its releases list in generation_config.json's eos_token_id but not in config.json. A server that skips
the file runs every chat turn to max_tokens. Its ids are always stop tokens.

Its temperature, top_p, top_k, min_p and repetition_penalty are the defaults the author tuned the model
for (Llama-3.1-Instruct: temperature 0.6, top_p 0.9). With `model.generation_config: auto` a request that
leaves one of them unset gets the file's value, as vLLM does; `none` keeps the OpenAI API's defaults.
A value equal to transformers' own default (top_k 50, temperature 1.0, ...) is not one the author chose,
so it is not taken; `do_sample` is ignored, as vLLM does. Its `max_new_tokens` caps the output of a
request that sets no max_tokens (a chat request, or gRPC without the field), which otherwise runs to
the end of the context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuserve.sampling_params import RequestError, SamplingParams

FILE_NAME = "generation_config.json"
# the sampling settings a model may default, and transformers' GenerationConfig defaults for them
SAMPLING_FIELDS: dict[str, float | int | None] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": None,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: tuple[int, ...] = ()
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)
    # the output length of a request that sets no max_tokens (vLLM takes it too), else the room left
    max_new_tokens: int | None = None


def _ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def _whole(path: Path, name: str, value: Any, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value < 1):
        raise ValueError(
            f"{path} sets {name} to {value!r}, not a {'positive ' if positive else ''}whole number; fix the "
            "file or set model.generation_config: none"
        )
    return value


def read_generation_config(folder: Path | None, sampling_defaults: bool = True) -> GenerationConfig:
    """The file's stop ids, and (when `sampling_defaults`) its sampling defaults; empty when the model
    has no such file (a GGUF file, dummy weights, a folder without one)."""
    path = folder / FILE_NAME if folder is not None and folder.is_dir() else None
    if path is None or not path.is_file():
        return GenerationConfig()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); fix or remove it") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}; fix or remove it")
    defaults: dict[str, float | int] = {}
    if sampling_defaults:
        for name, hf_default in SAMPLING_FIELDS.items():
            value = raw.get(name)
            if name == "top_k" and value is not None:
                value = _whole(path, name, value)
                value = 0 if value == -1 else value  # -1 is "off" in vLLM's convention, 0 in ours
            if value is not None and value != hf_default:
                defaults[name] = value
        try:
            SamplingParams(**defaults)
        except (RequestError, TypeError) as err:
            raise ValueError(
                f"{path} sets a sampling default fuserve cannot use: {err}; fix the file or set "
                "model.generation_config: none"
            ) from None
    max_new = raw.get("max_new_tokens") if sampling_defaults else None
    if max_new is not None:
        max_new = _whole(path, "max_new_tokens", max_new, positive=True)
    return GenerationConfig(_ids(raw.get("eos_token_id")), defaults, max_new)
