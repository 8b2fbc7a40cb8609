"""The host's CPU model and the speed of one of its cores, written beside results that depend on it.

Two benchmarks move with the host and not only the GPU: the served path (the frontend's event loop and
the client are Python; the 2026-11-26 serving bounds passed or failed by machine) and the offline
throughput run (the engine's Python step overlaps a ~25 ms GPU step at 1,024 rows; identical engines
gave 21-25k tok/s on different machines of the same kind, 2026-11-27)."""

from __future__ import annotations

import time
from typing import Any


def host_cpu() -> dict[str, Any]:
    """The CPU model and the ms one core takes for a fixed piece of pure Python (median of 5)."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            model = next(names, model)
    except OSError:
        pass
    times = []
    for _ in range(5):
        t = time.perf_counter()
        d: dict[int, int] = {}
        for i in range(200_000):
            d[i & 1023] = d.get(i & 1023, 0) + i
        times.append(1e3 * (time.perf_counter() - t))
    return {"host_cpu": model, "host_python_ms": sorted(times)[2]}
