"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts while its predecessor drains.

A batch-1 decode step is ~300 short kernels back to back in one CUDA graph; between two of them the GPU
finishes the last blocks of one, launches the next and waits for its first loads (~1-2 us each). With
PDL (`launch_pdl=True`) the next kernel is launched as soon as every block of the running one has
called `griddepcontrol.launch_dependents`; its blocks then stop in `griddepcontrol.wait` until the
predecessor has completed and its writes are visible. Work that does not depend on the predecessor
(a GEMV's first tile of weights) goes before the wait.

The rule that keeps it correct: every kernel launched with PDL calls `pdl_launch_and_wait` before it
reads anything an earlier kernel wrote and before it writes anything (an earlier kernel may still be
reading it). Waiting is transitive: the predecessor itself waited for its own.

`kernels.pdl: false` in the config turns it off (A/B runs; switches.py); the interpreter and GPUs
before sm_90 never use it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from fuserve.workers.kernels.switches import switches


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels reading `t` launch with PDL: a CUDA tensor on sm_90+, compiled (not interpreted)
    Triton, and the process's switches (kernels.pdl) not turning it off."""
    if not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" or not switches().pdl:
        return False
    return _device_supports_pdl(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_launch_and_wait(USE_PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (no-op without PDL)."""
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
