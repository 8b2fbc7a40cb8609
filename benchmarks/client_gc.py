"""The benchmark client's own garbage-collector pauses, per level.

An open-loop level runs its HTTP clients in the driver, which also holds Ray, Serve and every workload's
requests: a full collection there took ~75 ms on the CPU box (149k tracked objects) and more on slower
GPU hosts. A pause freezes the client's event loop: requests due meanwhile go out late, together, and
any request already started counts the pause in its TTFT. On two H200s (2026-11-28) three routers made no
routing call for 249 ms while five requests in flight got TTFTs of ~250 ms with ~25 ms inside the
replica. So router rows say how long the client spent collecting, and the driver's start-up heap is
frozen out of collections (`gc_tuning.quiet_gc`) before the levels.
"""

from __future__ import annotations

import gc
import time


class ClientGcWatch:
    """Collector pauses in this process since the last `take()`."""

    def __init__(self) -> None:
        self._pauses: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses.append(time.perf_counter() - self._started)

    def take(self) -> dict[str, float]:
        """Total and longest pause in ms since the last call, and how many collections."""
        pauses, self._pauses = self._pauses, []
        return {
            "client_gc_ms_total": round(sum(pauses) * 1e3, 2),
            "client_gc_ms_max": round(max(pauses, default=0.0) * 1e3, 2),
            "client_gc_count": len(pauses),
        }

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)
