"""Shared set-up for the kernel tests.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the switch must be set
before any kernel module is imported (`@triton.jit` reads it when it wraps the function), hence at
import time here. With a GPU the same tests run on it, plus the larger `gpu`-marked variants.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_bf16_to_nearest_in_interpreter() -> None:
    """Make the interpreter round fp32 -> bf16 to nearest even, as the GPU does.

    Triton's interpreter (3.9) truncates on that cast, so every bf16 output would differ from torch
    by up to one ulp per rounding for no fault of the kernel. Only the interpreter is patched; if a
    later Triton moves this method, nothing is patched and the bf16 comparisons show whether it is
    still needed. Its fp32 -> fp8 (e4m3) cast is wrong where rounding carries into the exponent
    (124.0 -> 64, not 128; the GPU's cvt is right), so that cast takes torch's rounding too.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    truncating_cast = getattr(builder, "cast_impl", None)
    if truncating_cast is None:
        return

    def cast_impl(self, src, dst_type):  # noqa: ANN001, ANN202 (the interpreter's own signature)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating_cast(self, src, dst_type)

    builder.cast_impl = cast_impl
    fp_to_fp = getattr(builder, "create_fp_to_fp", None)
    if fp_to_fp is None:
        return

    def create_fp_to_fp(self, src, dst_type, rounding_mode):  # noqa: ANN001, ANN202
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn)
            return interpreter.TensorHandle(rounded.view(torch.uint8).numpy(), tl.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = create_fp_to_fp


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_in_interpreter()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# block-table entries past a sequence's blocks: the kernels must never read them
GARBAGE_BLOCK_IDS = (-1, 1 << 30)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh but reproducible inputs: each test draws from its own seed."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fill every floating-point `torch.empty`/`torch.empty_like` with NaN, so output elements (and
    split-K partials) that a kernel forgets to write fail the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))
    yield


@dataclass
class PagedKV:
    """A paged KV cache holding each sequence's context, plus its block tables."""

    k_cache: torch.Tensor  # [N, BS, Hkv, D]; slots no sequence owns hold NaN
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, M] int32; entries past a sequence's blocks hold garbage ids
    context_lens: torch.Tensor  # [B] int32


def build_paged_kv(
    context_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    spare_blocks: int = 3,
    spare_table_entries: int = 2,
) -> PagedKV:
    """Random K/V for `context_lens` sequences in shuffled, non-contiguous blocks (with unused blocks
    between them), NaN in every slot no sequence owns, garbage ids past each sequence's blocks."""
    blocks_per_seq = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    block_ids = torch.randperm(num_blocks)
    max_blocks = max(blocks_per_seq, default=0) + spare_table_entries
    tables = torch.empty((len(context_lens), max_blocks), dtype=torch.int32)
    for b in range(len(context_lens)):
        for j in range(max_blocks):
            tables[b, j] = GARBAGE_BLOCK_IDS[(b + j) % len(GARBAGE_BLOCK_IDS)]

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    next_block = 0
    for b, (n, num) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        ids = block_ids[next_block : next_block + num]
        next_block += num
        tables[b, :num] = ids.int()
        flat_slots = (ids[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[flat_slots] = torch.randn(n, num_kv_heads, head_dim).to(
                dtype
            )
    return PagedKV(
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
    )


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU under the interpreter."""
    return DEVICE


@pytest.fixture
def paged_kv() -> Callable[..., PagedKV]:
    """The `build_paged_kv` factory, for tests that need a filled paged cache."""
    return build_paged_kv
