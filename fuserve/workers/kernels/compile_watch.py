"""Kernel compiles while serving, reported: each one stalls every running sequence for its duration.

Triton compiles a kernel once per specialization (its constexprs, and each integer argument's
"equals 1" and "divisible by 16" facts). Start-up warms the shapes it knows; a combination first
met under load compiles mid-step, and every stream waits (~1 s on an H100 host, seen as a TTFT p99
of ~950 ms at one load level of the serving benchmark, gone with a warm Triton cache). This names
the kernel and its specialization, so the warm-up can cover it or the argument stop specializing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Report = Callable[[str, float], None]  # (the kernel and its specialization, seconds it took)


def watch_compiles(report: Report, min_seconds: float = 0.05) -> bool:
    """Calls `report` for every kernel compile (or load from the disk cache) that takes at least
    `min_seconds`, from now on. False where this Triton has no compile hooks (before 3.4)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = knobs.runtime
    if not hasattr(runtime, "jit_post_compile_hook"):
        return False
    started: dict[str, float] = {}

    def before(*, repr: str, **_: Any) -> bool:
        started[repr] = time.perf_counter()
        return False  # False: go on and compile

    def after(*, repr: str, **_: Any) -> None:
        t0 = started.pop(repr, None)
        if t0 is not None and (took := time.perf_counter() - t0) >= min_seconds:
            report(repr, took)

    runtime.jit_cache_hook = before
    runtime.jit_post_compile_hook = after
    return True
