"""The inputs' second moments H = X^T X / n of every 8-bit-able linear layer, for GPTQ (models/gptq.py).

One full-precision forward per calibration sequence, with a hook on each linear layer's input. The
calibration text is offline, fixed and disjoint from the held-out text of the accuracy checks
(models/perplexity.py reads textwrap, shlex, ...): the shipped prose and chat sample
(workers/kv_calibration.txt) and other CPython standard-library modules, cut into sequences of
SEQ_LEN tokens. The stdlib files are those of the Python that runs the build: the same machine and
Python build the same bytes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fuserve.parallel.layers import _Linear
from fuserve.workers.kv_scales import CALIBRATION_TEXT
from fuserve.workers.models.llama import LlamaForCausalLM
from fuserve.workers.models.perplexity import STDLIB_MODULES, score_text
from fuserve.workers.tokenizer import Tokenizer

CALIBRATION_MODULES = ("argparse", "dataclasses", "functools", "csv", "difflib", "pprint", "calendar")
CALIBRATION_TOKENS = 4096
SEQ_LEN = 512
assert not set(CALIBRATION_MODULES) & set(STDLIB_MODULES), "calibration text must not be the held-out text"


def calibration_text() -> str:
    """The shipped sample, then the calibration modules' sources."""
    parts = [CALIBRATION_TEXT.read_text()]
    for name in CALIBRATION_MODULES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        parts.append(Path(spec.origin).read_text())
    return "\n".join(parts)


def calibration_sequences(
    tokenizer: Tokenizer, vocab_size: int, tokens: int = CALIBRATION_TOKENS, seq_len: int = SEQ_LEN
) -> list[list[int]]:
    """The first `tokens` ids of the calibration text, in sequences of `seq_len`."""
    ids = [i for i in tokenizer.encode(calibration_text(), add_special_tokens=False) if i < vocab_size][
        :tokens
    ]
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]


@torch.inference_mode()
def collect_hessians(model: LlamaForCausalLM, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Module name -> H [K, K] float64 of that linear layer's input, over every token of `sequences`.
    The model must hold full-precision weights (the layer's own inputs, unperturbed by quantization)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):  # noqa: ANN202 - a forward pre-hook
        def accumulate(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if not isinstance(x, torch.Tensor):
                raise ValueError("calibrate a model with full-precision weights (quantization none)")
            x = x.reshape(-1, x.shape[-1]).double()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                counts[name] = 0
            sums[name] += x.T @ x
            counts[name] += x.shape[0]

        return accumulate

    for name, module in model.named_modules():
        if isinstance(module, _Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        for ids in sequences:
            score_text(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in sorted(sums)}
