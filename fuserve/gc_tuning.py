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
from dataclasses import dataclass

GEN0_THRESHOLD = 10_000  # Python's default is 700 allocations between young collections


@dataclass(frozen=True)
class GcPauses:
    """The collections of a stretch of time: how many, their seconds, the longest one."""

    count: int = 0
    seconds: float = 0.0
    longest_s: float = 0.0


class _GcClock:
    """Seconds this process has spent in the collector, from gc.callbacks (reported on /metrics), and the
    pauses since the last `take_pauses` (a benchmark's client: a pause holds every request in flight)."""

    def __init__(self) -> None:
        self.seconds_total = 0.0
        self.pauses = GcPauses()
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._started
            self.seconds_total += pause
            p = self.pauses
            self.pauses = GcPauses(p.count + 1, p.seconds + pause, max(p.longest_s, pause))


_clock: _GcClock | None = None


def _the_clock() -> _GcClock:
    global _clock
    if _clock is None:
        _clock = _GcClock()
    return _clock


def gc_seconds_total() -> float:
    """Seconds spent collecting since this process first asked (0.0 on the first call)."""
    return _the_clock().seconds_total


def take_gc_pauses() -> GcPauses:
    """The collections since the last call (none on the first: the clock starts then)."""
    clock = _the_clock()
    pauses, clock.pauses = clock.pauses, GcPauses()
    return pauses


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
