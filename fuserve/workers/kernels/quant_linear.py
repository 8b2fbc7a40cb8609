"""Which kernel a quantized linear layer runs, by batch size and scheme (the 8-bit `F.linear`).

  one row, CUDA                    quant_gemv: the 8-bit weights streamed at bandwidth (all schemes; at
                                   M = 1 quantizing x would save nothing, the weights are the cost)
  FP8 W8A8, >= FP8_ACT_MIN_ROWS    x quantized per token to e4m3, torch._scaled_mm with row-wise scales
  rows, sm_89+                     on the fp8 tensor cores; x comes already quantized (`Fp8Activations`)
                                   from the RMSNorm or SiLU·up kernel before QKV, gate/up and down, and
                                   is quantized here (one kernel, fp8_rows.py) only before o_proj
  other rows, CUDA                 quant_gemm: the tiled GEMM dequantizing weight tiles in registers
  CPU                              the torch reference, which follows the same W8A8 rule

Both `quant_linear` and `quant_linear_ref` take (x, qweight, scale, bias, quantize_activations), x a
tensor or `Fp8Activations`; `takes_fp8_input` tells the producer of x which one the layer wants.
"""

from __future__ import annotations

import functools

import torch

from fuserve.workers.kernels.fp8_rows import quantize_rows_fp8
from fuserve.workers.kernels.quant_gemm import quant_gemm
from fuserve.workers.kernels.quant_gemv import quant_gemv, quant_gemv_ref
from fuserve.workers.models.quant_scheme import Fp8Activations, quantize_per_token_fp8

# Below this many rows the fp8 scheme keeps activations in the model dtype (weight-only math): the
# layer is bound by reading weights there, and the tensor cores want tiles of at least 16 rows.
FP8_ACT_MIN_ROWS = 16


def uses_fp8_activations(x: torch.Tensor | Fp8Activations, quantize_activations: bool) -> bool:
    return quantize_activations and x.shape[0] >= FP8_ACT_MIN_ROWS


@functools.cache
def _has_fp8_tensor_cores(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _scaled_mm_fits(dtype: torch.dtype, device: torch.device, qweight: torch.Tensor) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (
        qweight.dtype == torch.float8_e4m3fn
        and dtype == torch.bfloat16  # row-wise scaled fp8 GEMMs write bf16
        and qweight.shape[1] % 16 == 0
        and qweight.shape[0] % 16 == 0
        and _has_fp8_tensor_cores(index)
    )


def takes_fp8_input(
    rows: int, dtype: torch.dtype, device: torch.device, qweight: torch.Tensor, quantize_activations: bool
) -> bool:
    """Whether a layer would quantize `rows` rows of x to e4m3 itself, so that the kernel producing x
    should hand them over quantized (`Fp8Activations`): the W8A8 rule, and on CUDA the fp8 GEMM fits."""
    if not (quantize_activations and rows >= FP8_ACT_MIN_ROWS):
        return False
    return device.type != "cuda" or _scaled_mm_fits(dtype, device, qweight)


def fp8_scaled_mm(
    x: torch.Tensor | Fp8Activations,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W8A8 on the fp8 tensor cores: x quantized per token (here, unless it comes quantized), one scale
    per weight row."""
    if isinstance(x, Fp8Activations):
        xq, x_scale, dtype = x.q, x.scale, x.dtype
    else:  # one Triton kernel (fp8_rows.py), not quantize_per_token_fp8's eight torch ops
        (xq, x_scale), dtype = quantize_rows_fp8(x), x.dtype
    y = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=dtype)
    return y + bias if bias is not None else y


def quant_linear(
    x: torch.Tensor | Fp8Activations,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    quantize_activations: bool,
) -> torch.Tensor:
    """y = x @ dequant(qweight)^T + bias on the fastest kernel for the shape; x: [M, K] -> [M, N]."""
    if isinstance(x, Fp8Activations):
        if x.q.is_cuda and _scaled_mm_fits(x.dtype, x.q.device, qweight):
            return fp8_scaled_mm(x, qweight, scale, bias)
        if not x.q.is_cuda:
            return quant_linear_ref(x, qweight, scale, bias, quantize_activations)
        x = x.dequantize()  # handed over quantized where the fp8 GEMM does not fit: not by the model
    if not (x.is_cuda and x.dim() == 2 and x.stride(1) == 1):
        return quant_linear_ref(x, qweight, scale, bias, quantize_activations)
    if x.shape[0] == 1:
        return quant_gemv(x, qweight, scale, bias)
    if uses_fp8_activations(x, quantize_activations) and _scaled_mm_fits(x.dtype, x.device, qweight):
        return fp8_scaled_mm(x, qweight, scale, bias)
    return quant_gemm(x, qweight, scale, bias)


def quant_linear_ref(
    x: torch.Tensor | Fp8Activations,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    quantize_activations: bool,
) -> torch.Tensor:
    """Plain torch, fp32 math: the activations quantized per token where `quant_linear` does so (x
    handed over quantized is multiplied as it is)."""
    if isinstance(x, Fp8Activations):
        (xq, x_scale), dtype = (x.q, x.scale), x.dtype
    elif not uses_fp8_activations(x, quantize_activations):
        return quant_gemv_ref(x, qweight, scale, bias)
    else:
        (xq, x_scale), dtype = quantize_per_token_fp8(x), x.dtype
    y = (xq.float() @ qweight.float().t()) * x_scale * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)
