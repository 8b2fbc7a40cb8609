"""FP8 W8A8 with the activation quantization fused into the kernels that produce the activations
(RMSNorm before QKV, add+RMSNorm before gate/up, SiLU·up before down): the tiny model's greedy tokens
are those of the unfused path (each layer quantizing x itself), with enough sequences that decode
batches, not only prefills, take the fused path; and a W8A8 layer given x already quantized returns
what it returns when it quantizes x itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from fuserve import LLM, SamplingParams
from fuserve.configs import config_from_dict
from fuserve.parallel import layers
from fuserve.workers.kernels import quant_linear, rmsnorm, silu_mul
from fuserve.workers.models.quant_scheme import SCHEMES, Fp8Activations, quantize_per_token_fp8, quantize_rows

# 18 sequences at once: decode steps of >= 16 rows run W8A8 with quantized activations, like prefills
PROMPTS = [list(range(10 + i, 15 + i + (i * 7) % 21)) for i in range(18)]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _generate(path: Path, **model: object) -> list[list[int]]:
    config = config_from_dict(
        {
            "model": {"path": str(path), "max_model_len": 128, "quantization": "fp8", **model},
            "cache": {"block_size": 4 if not torch.cuda.is_available() else 16, "num_blocks": 256},
        }
    )
    return [r.outputs[0].token_ids for r in LLM(config).generate(PROMPTS, GREEDY)]


def test_fused_activation_quantization_keeps_the_greedy_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = make_checkpoint(tmp_path / "llama3", "llama3", seed=3)
    calls: dict[str, list[int]] = {
        "rmsnorm_fp8_ref": [],
        "fused_add_rmsnorm_fp8_ref": [],
        "silu_mul_fp8_ref": [],
    }
    for module in (rmsnorm, silu_mul):
        for name in calls:
            if hasattr(module, name):
                original = getattr(module, name)

                def counted(*args, _name=name, _original=original):  # noqa: ANN002, ANN202
                    calls[_name].append(args[0].shape[0])
                    return _original(*args)

                monkeypatch.setattr(module, name, counted)
    fused = _generate(checkpoint)
    assert all(calls.values()), calls  # each fused producer ran
    assert calls["silu_mul_fp8_ref"].count(len(PROMPTS)) >= GREEDY.max_tokens - 1  # in decode steps too
    assert min(min(rows) for rows in calls.values()) >= quant_linear.FP8_ACT_MIN_ROWS

    with monkeypatch.context() as unfused:  # every W8A8 layer quantizes its input itself, as before
        unfused.setattr(layers._Linear, "takes_fp8_input", lambda self, rows, dtype, device: False)
        before = sum(map(len, calls.values()))
        assert _generate(checkpoint) == fused
        assert sum(map(len, calls.values())) == before


@pytest.mark.parametrize("bias", [False, True])
def test_quantized_input_is_multiplied_as_it_is(bias: bool) -> None:
    x = torch.randn(20, 64) * 3
    qweight, scale = quantize_rows(torch.randn(48, 64), SCHEMES["fp8"])
    b = torch.randn(48) if bias else None
    xq, x_scale = quantize_per_token_fp8(x)
    for fn in (quant_linear.quant_linear, quant_linear.quant_linear_ref):
        got = fn(Fp8Activations(xq, x_scale, x.dtype), qweight, scale, b, True)
        assert torch.equal(got, fn(x, qweight, scale, b, True))
    assert not quant_linear.takes_fp8_input(15, torch.float32, x.device, qweight, True)  # weight-only rows
    assert quant_linear.takes_fp8_input(16, torch.float32, x.device, qweight, True)
    assert not quant_linear.takes_fp8_input(64, torch.float32, x.device, qweight, False)  # fp8-wo


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs fp8 tensor cores",
)
def test_fused_activation_quantization_on_gpu_keeps_the_greedy_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hopper, bf16, Triton kernels and CUDA graphs, shapes the fp8 GEMM takes (multiples of 16): the
    fused producers hand `_scaled_mm` the bytes the layer's own quantization kernel would, so the
    greedy tokens are identical."""
    checkpoint = make_checkpoint(
        tmp_path / "llama3",
        "llama3",
        seed=3,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=1,
    )
    fused = _generate(checkpoint, dtype="bfloat16")
    with monkeypatch.context() as unfused:
        unfused.setattr(layers._Linear, "takes_fp8_input", lambda self, rows, dtype, device: False)
        assert _generate(checkpoint, dtype="bfloat16") == fused
