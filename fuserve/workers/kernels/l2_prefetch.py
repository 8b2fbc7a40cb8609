"""Pull a kernel's weights into L2 while the kernels before it still run.

A batch-1 decode step alternates weight streams (GEMVs, bandwidth-bound) with kernels that barely
touch memory (the all-reduces, decode attention, rotary, norms: latency-bound, ~30% of a TP=2 step).
With programmatic dependent launch (pdl.py) a GEMV's blocks are resident while its predecessors run,
waiting in `griddepcontrol.wait`; before that wait each block asks L2 for the first lines of its rows of
W (`prefetch.global.L2`: no registers held, nothing waits for it). The memory system then streams
weights during the latency-bound kernels, and the GEMV finds that part in L2.

The amount is a budget in MiB per GEMV launch, the config's `kernels.l2_prefetch_mb` (0: off; read
through switches.py). It must stay well under L2 (50 MiB on H100/H200): lines evicted before use cost
bandwidth twice. Only compiled Triton on a GPU prefetches; the interpreter has no inline PTX.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fuserve.workers.kernels.switches import switches

LINE_BYTES = 128
LINES_PER_STEP = tl.constexpr(16)  # lines per row per loop step: BLOCK_N x 16 addresses, a few per thread


def l2_prefetch_budget() -> int:
    """Bytes one GEMV launch may prefetch into L2 (kernels.l2_prefetch_mb; 0: off)."""
    return switches().l2_prefetch_bytes


def prefetch_columns(n: int, k: int, element_size: int, budget_bytes: int) -> int:
    """How many columns of every row of an [n, k] weight fit the budget (the GEMV prefetches those
    after its first tile, which it loads into registers anyway): whole L2 lines, at most k. Callers pass
    a budget of 0 where prefetch cannot run: without PDL there is no early window, and the interpreter
    and CPUs have no PTX."""
    if budget_bytes <= 0 or n <= 0:
        return 0
    line = LINE_BYTES // element_size
    cols = budget_bytes // (n * element_size)
    return min(k, cols // line * line)


@triton.jit
def prefetch_step_columns(k0, k_end, LINE: tl.constexpr):
    """The columns one step of prefetch_rows_l2 asks for: LINES_PER_STEP line starts from k0, those past
    the range clamped to its last column (a repeated address costs a request, not bandwidth), so the
    prefetch never reaches past the budget's columns."""
    return tl.minimum(k0 + tl.arange(0, LINES_PER_STEP) * LINE, k_end - 1)


@triton.jit
def prefetch_rows_l2(rows, k_start, k_end, LINE: tl.constexpr):
    """Ask L2 for columns [k_start, k_end) of the rows at pointers `rows` [BLOCK_N, 1] (row starts,
    valid addresses), one request per LINE-element line."""
    for k0 in range(k_start, k_end, LINES_PER_STEP * LINE):
        cols = prefetch_step_columns(k0, k_end, LINE)
        addresses = (rows + cols[None, :]).to(tl.int64, bitcast=True)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
            "=r,l",
            [addresses],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
