"""GGUF's block-quantized weights (Q4_0, Q4_1, Q8_0) and float tensors as torch tensors of a chosen dtype,
a slab of rows at a time; bit-identical to ggml's and gguf-py's reference dequantization."""

from __future__ import annotations

import math

import torch

from fuserve.workers.models.gguf_format import (
    BLOCK_TYPES,
    FLOAT_TYPES,
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q8_0,
    SUPPORTED_GGML_TYPES,
    ggml_type_name,
)

# Dequantize at most this many elements at a time, so the float32 scratch stays around 64 MiB however
# large the tensor is (a 128k-vocabulary embedding would otherwise need 2 GiB of scratch).
_CHUNK_ELEMENTS = 1 << 24


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
        raise ValueError(
            f"cannot dequantize {ggml_type_name(ggml_type)}; supported: {supported_type_names()}"
        )
    if ggml_type in FLOAT_TYPES:
        values = raw.view(FLOAT_TYPES[ggml_type][0]).view(shape)
        if row_order is not None:
            values = values[row_order]
        return values.to(device=device, dtype=dtype, copy=True)
    if row_order is not None and len(shape) != 2:
        # only a matrix has whole-block rows to gather on the bytes; anything else is gathered after
        return dequantize(raw, ggml_type, shape, dtype, device)[row_order.to(device)]

    columns = shape[-1] if shape else 1
    rows = math.prod(shape) // columns
    block_elements, block_bytes = BLOCK_TYPES[ggml_type]
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


def supported_type_names() -> str:
    return ", ".join(ggml_type_name(t) for t in sorted(SUPPORTED_GGML_TYPES))
