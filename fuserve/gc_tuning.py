"""Python's garbage collector set for a process that serves: few collections, none over start-up's objects.

A serving step allocates thousands of short-lived containers (step plans, outputs, messages, SSE
chunks), so the collector's youngest generation fills many times a step, and every so often a full
collection walks every tracked object the process holds: the model's modules, torch's, Ray's and
Serve's state. On the CPU (benchmarks/bench_host_step.py, 1,024 sequences a step) collections were a
third or more of the engine's host time a step; on an H100 serving 256 streams the engine core's host
time a step fell 8% with these settings (benchmarks/NOTES.md, issue 15). Freezing what exists once
the process is up takes it out of every later collection, and a larger first threshold makes
collections rare; reference cycles are still collected. vLLM's engine-core process freezes its
start-up heap for the same reason.
"""

from __future__ import annotations

import gc
import time

GEN0_THRESHOLD = 10_000  # Python's default is 700 allocations between young collections


class _GcClock:
    """Seconds this process has spent in the collector, from gc.callbacks (reported on /metrics)."""

    def __init__(self) -> None:
        self.seconds_total = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds_total += time.perf_counter() - self._started


_clock: _GcClock | None = None


def gc_seconds_total() -> float:
    """Seconds spent collecting since this process first asked (0.0 on the first call)."""
    global _clock
    if _clock is None:
        _clock = _GcClock()
    return _clock.seconds_total


def quiet_gc() -> None:
    """Called once a serving process has built everything it keeps (the engine, the app): what is alive
    then is frozen out of later collections, and young collections come after 10,000 allocations."""
    gc_seconds_total()  # start the clock
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])


def live_instances(cls: type) -> list:
    """The live objects of exactly `cls`. A frozen heap (quiet_gc) is out of gc.get_objects' sight, so
    the search thaws it and freezes it again."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    found = [obj for obj in gc.get_objects() if type(obj) is cls]
    if frozen:
        gc.freeze()
    return found
