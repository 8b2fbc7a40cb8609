"""Weight quantization schemes: 8-bit weights with one scale per output channel.

A quantized linear layer keeps `weight` [N, K] as int8 or float8_e4m3fn and `weight_scale` [N] fp32,
with W[n, k] ~= weight[n, k] * weight_scale[n]. Per-channel scales are computed row by row, so
quantizing the fused QKV (or gate/up) weight equals quantizing its pieces one by one: the loader
quantizes each checkpoint slice as it lands and never holds the full-precision model.

  none     bf16/fp16/fp32 weights, as loaded
  int8-wo  int8 weights, activations in the model dtype (W8A16): dequantized in the GEMV/GEMM
  fp8-wo   float8_e4m3fn weights, activations in the model dtype (W8A16)
  fp8      float8_e4m3fn weights and activations quantized per token at run time (W8A8,
           torch._scaled_mm on Hopper for larger batches; the weight-only GEMV for a single row,
           where reading the weights is the whole cost and quantizing x saves nothing)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEME_NAMES = ("none", "int8-wo", "fp8-wo", "fp8")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
INT8_MAX = 127.0


@dataclass(frozen=True)
class QuantScheme:
    name: str
    weight_dtype: torch.dtype
    quantize_activations: bool
    int8_lm_head: bool = False  # the LM head in int8 as well, whatever the linear layers' format

    @property
    def qmax(self) -> float:
        return INT8_MAX if self.weight_dtype == torch.int8 else FP8_MAX


SCHEMES = {
    "int8-wo": QuantScheme("int8-wo", torch.int8, False),
    "fp8-wo": QuantScheme("fp8-wo", torch.float8_e4m3fn, False),
    "fp8": QuantScheme("fp8", torch.float8_e4m3fn, True),
}


def scheme_for(name: str) -> QuantScheme | None:
    """The scheme called `name`; None for "none" (full-precision weights)."""
    if name == "none":
        return None
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEME_NAMES)}")
    return SCHEMES[name]


def quantize_rows(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] in scheme.weight_dtype, scale [N] fp32), symmetric per row.

    The scale maps each row's largest magnitude onto the format's largest value (127, or 448 for
    e4m3); an all-zero row gets scale 1 so dequantization stays finite. Rounding is to nearest (int8)
    or the fp8 cast's round-to-nearest-even, computed in fp32 so every device gives the same bytes.
    """
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / scheme.qmax, torch.ones_like(amax))
    scaled = wf / scale[:, None]
    if scheme.weight_dtype == torch.int8:
        q = scaled.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize_rows` (up to its rounding), in `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (x_fp8 [M, K], scale [M, 1] fp32): the dynamic per-token scales of W8A8.

    The fused producers (kernels/rmsnorm.py, kernels/silu_mul.py in their fp8 mode) compute exactly
    this on their own output, rounded to the model dtype first, in the same pass."""
    amax = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@dataclass(frozen=True)
class Fp8Activations:
    """Activations already quantized per token by the kernel that produced them, for a W8A8 layer.

    `q` [M, K] float8_e4m3fn and `scale` [M, 1] fp32 are what `quantize_per_token_fp8` returns for
    the model-dtype activations x ~= q * scale; `dtype` is x's (the layer's output dtype). A W8A8
    linear layer multiplies them as they are instead of quantizing x with three more kernels."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        """x as the model dtype (q * scale): for a kernel that cannot take e4m3 input."""
        return (self.q.float() * self.scale).to(self.dtype)
