"""The candidate 8-bit GEMVs of benchmarks/quant_gemv_variants.py against quant_gemv's torch reference,
and their integer-op conversions against torch's, for every byte (interpreter on CPU, the GPU if any).
A variant that computes wrongly must fail here, not after a GPU run has timed it."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from fuserve.workers.kernels.quant_gemv import quant_gemv_ref
from fuserve.workers.models.quant_scheme import SCHEMES, quantize_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _load_variants() -> types.ModuleType:
    """By path (benchmarks/ is not a package), after conftest has chosen the interpreter or not."""
    if "quant_gemv_variants" in sys.modules:
        return sys.modules["quant_gemv_variants"]
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quant_gemv_variants.py"
    spec = importlib.util.spec_from_file_location("quant_gemv_variants", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quant_gemv_variants"] = module
    spec.loader.exec_module(module)
    return module


variants = _load_variants()
weights_f32 = variants.weights_f32  # a global of the kernel below: the jit resolves it by name


@triton.jit
def _convert_kernel(w_ptr, out_ptr, FP8: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, weights_f32(tl.load(w_ptr + offs), FP8, BITS))


def _converted(byte_values: torch.Tensor, fp8: bool, bits: bool) -> torch.Tensor:
    w = byte_values.to(torch.int8).to(DEVICE)
    out = torch.zeros(w.numel(), dtype=torch.float32, device=DEVICE)
    _convert_kernel[(1,)](w, out, FP8=fp8, BITS=bits, BLOCK=w.numel())
    return out.cpu()


@pytest.mark.parametrize("bits", [True, False])
def test_int8_conversion_is_exact_for_every_value(bits: bool) -> None:
    values = torch.arange(-128, 128, dtype=torch.int32)
    got = _converted(values, fp8=False, bits=bits)
    assert torch.equal(got, values.float())


@pytest.mark.parametrize("bits", [True, False])
def test_e4m3_conversion_is_exact_for_every_finite_byte(bits: bool) -> None:
    patterns = torch.arange(256, dtype=torch.int32)
    finite = (patterns & 0x7F) != 0x7F  # 0x7F and 0xFF are e4m3's NaNs, never a quantized weight
    byte_values = torch.where(patterns < 128, patterns, patterns - 256)
    want = byte_values.to(torch.int8).view(torch.float8_e4m3fn).float()[finite]
    got = _converted(byte_values, fp8=True, bits=bits)[finite]
    assert torch.equal(got, want)  # subnormals included: 0x01 is 2^-9
    assert torch.equal(got.signbit(), want.signbit())  # 0x80 is -0.0


def _operands(n: int, k: int, scheme: str, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    q, scale = quantize_rows(torch.randn(n, k, generator=g) * 0.05, SCHEMES[scheme])
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, q.to(DEVICE), scale.to(DEVICE), b


@pytest.mark.parametrize("variant", list(variants.VARIANTS))
@pytest.mark.parametrize("scheme", ["int8-wo", "fp8-wo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n, k, bias",
    [
        (3, 1, True),  # K below one 8-byte vector
        (24, 128, False),  # whole tiles, two of them along K
        (37, 300, True),  # ragged rows, a ragged last tile and a ragged last vector
    ],
)
def test_variant_matches_reference(
    variant: str, scheme: str, dtype: torch.dtype, n: int, k: int, bias: bool
) -> None:
    x, q, scale, b = _operands(n, k, scheme, dtype, bias, seed=n * 1000 + k)
    fn, _ = variants.VARIANTS[variant]
    got = fn(x, q, scale, b)
    want = quant_gemv_ref(x, q, scale, b)
    assert got.shape == (1, n) and got.dtype == dtype
    tol = RTOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * k**0.5 * 0.05)


def test_variants_refuse_what_quant_gemv_refuses() -> None:
    fn, _ = variants.VARIANTS["grouped"]
    with pytest.raises(ValueError, match="int8 or float8"):
        fn(torch.zeros(1, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE), torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        fn(
            torch.zeros(2, 8, device=DEVICE),
            torch.zeros(4, 8, dtype=torch.int8, device=DEVICE),
            torch.ones(4, device=DEVICE),
        )
