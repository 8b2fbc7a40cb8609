"""L2 prefetch of GEMV weights (kernels/l2_prefetch.py): the budget a user sets, the columns it buys,
and on a GPU the GEMV's numbers with it on. The prefetch instruction itself is checked by compiling for
Hopper (tests/hopper_compile.py); the interpreter has no PTX."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fuserve.configs import ConfigError, config_from_dict
from fuserve.workers.kernels.gemv import gemv, gemv_ref
from fuserve.workers.kernels.l2_prefetch import (
    LINES_PER_STEP,
    l2_prefetch_budget,
    prefetch_columns,
    prefetch_step_columns,
)
from fuserve.workers.kernels.switches import KernelSwitches, using_switches


def budget_switches(mib: float) -> KernelSwitches:
    return KernelSwitches.from_config(config_from_dict({"kernels": {"l2_prefetch_mb": mib}}))


def test_budget_from_config() -> None:
    assert l2_prefetch_budget() == 0  # the default, outside any Worker
    for mib, want in ((16, 16 * 2**20), (0.5, 2**19), (0, 0)):
        with using_switches(budget_switches(mib)):
            assert l2_prefetch_budget() == want
    assert l2_prefetch_budget() == 0, "the block's switches outlived it"
    for bad, why in (
        ("lots", "valid number"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
        (-1, "greater than or equal to 0"),
    ):
        with pytest.raises(ConfigError, match=rf"kernels\.l2_prefetch_mb: .*{why}"):
            budget_switches(bad)  # type: ignore[arg-type]


def test_columns_are_whole_lines_within_budget_and_row() -> None:
    mib16 = 16 * 2**20
    # Llama-3-8B at TP=2, bf16: qkv 3072 x 4096 (24 MiB) gets 2688 of 4096 columns, whole 128-byte lines
    cols = prefetch_columns(3072, 4096, 2, mib16)
    assert cols == 2688 and cols % 64 == 0 and 3072 * cols * 2 <= mib16
    assert prefetch_columns(4096, 2048, 2, mib16) == 2048  # o_proj's shard fits whole: capped at K
    assert prefetch_columns(64128, 4096, 2, mib16) == 128  # the LM head's shard: two lines per row
    assert prefetch_columns(64128, 4096, 4, mib16) == 64  # fp32: 32 elements a line, two of them
    assert prefetch_columns(3072, 4096, 2, 0) == 0
    assert prefetch_columns(2**20, 4096, 2, 2**20) == 0  # under one line per row: nothing
    assert prefetch_columns(0, 4096, 2, mib16) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, k", [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168), (100, 4100)])
def test_gemv_with_l2_prefetch_matches_reference(n: int, k: int) -> None:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    with using_switches(budget_switches(0)):
        plain = gemv(x, w)
    with using_switches(budget_switches(16)):
        torch.testing.assert_close(gemv(x, w).float(), gemv_ref(x, w).float(), rtol=1.6e-2, atol=1e-2)
        assert torch.equal(gemv(x, w), plain)  # same sums in the same order: prefetch changes no bit


@triton.jit
def _prefetched_columns_kernel(out_ptr, k_start, k_end, LINE: tl.constexpr):
    i = 0
    for k0 in range(k_start, k_end, LINES_PER_STEP * LINE):
        tl.store(
            out_ptr + i * LINES_PER_STEP + tl.arange(0, LINES_PER_STEP),
            prefetch_step_columns(k0, k_end, LINE),
        )
        i += 1


@pytest.mark.parametrize(
    "k_start, k_end, line", [(256, 2944, 64), (512, 4096, 64), (256, 320, 64), (128, 200, 32)]
)
def test_prefetch_asks_for_every_line_of_the_range_and_nothing_past_it(
    device: torch.device, k_start: int, k_end: int, line: int
) -> None:
    """gemv_block prefetches [BLOCK_K, BLOCK_K + prefetch_cols): the budget's columns, and no line beyond."""
    steps = -(-(k_end - k_start) // (LINES_PER_STEP * line))
    out = torch.full((steps * LINES_PER_STEP,), -1, dtype=torch.int32, device=device)
    _prefetched_columns_kernel[(1,)](out, k_start, k_end, LINE=line)
    cols = set(out.tolist())
    assert -1 not in cols and min(cols) == k_start and max(cols) < k_end
    assert {c // line for c in cols} == set(range(k_start // line, -(-k_end // line)))
