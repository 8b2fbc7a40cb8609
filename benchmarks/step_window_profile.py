"""A window of engine steps under torch.profiler: is a loaded step bound by the GPU or by the host?

The offline throughput run (bench_throughput.py) keeps ~1,000 sequences in a step. Whether its step is
the GPU's kernels or the host's Python decides what to optimize next, and neither per-step wall time
nor a host profiler alone can say: this records N steps' CUDA kernels and reports, per step, the wall
time, the time at least one kernel was running (the union of kernel intervals), the gaps between, and
the kernels grouped by name. Busy close to wall means GPU-bound; the rest is time the GPU waited.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap)."""
    total = 0.0
    end = float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def kernel_family(name: str) -> str:
    """Group a kernel's name: templated cuBLAS/CUTLASS names differ per tile shape, Triton's per
    specialization; the first 48 characters keep families apart without one row per variant."""
    return name.split("(")[0][:48]


def profile_steps(step: Callable[[], Any], num_steps: int, top: int = 16) -> dict[str, Any]:
    """Run `step` num_steps times under the CUDA profiler; per-step wall, GPU-busy and kernel table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    intervals = []
    families: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        intervals.append((ev.time_range.start, ev.time_range.end))
        fam = families[kernel_family(ev.name)]
        fam[0] += ev.time_range.end - ev.time_range.start
        fam[1] += 1
    busy = busy_us(intervals)
    kernels = sorted(
        (
            {"kernel": k, "ms_per_step": v[0] / 1e3 / num_steps, "launches_per_step": v[1] / num_steps}
            for k, v in families.items()
        ),
        key=lambda r: -r["ms_per_step"],
    )
    return {
        "steps": num_steps,
        "wall_ms_per_step": wall_us / 1e3 / num_steps,
        "gpu_busy_ms_per_step": busy / 1e3 / num_steps,
        "gpu_busy_fraction": busy / wall_us if wall_us else 0.0,
        "launches_per_step": len(intervals) / num_steps,
        "kernels": kernels[:top],
    }


def sync_sites(step: Callable[[], Any], num_steps: int) -> list[dict[str, Any]]:
    """Run `step` num_steps times with CUDA's sync debug mode on: every operation that makes the host
    wait for the GPU, counted by where fuserve called it. A wait inside a step's launch stalls the
    GPU until the host has launched the rest; the engine means to wait once a step, for the tokens."""
    import torch

    sites: dict[tuple[str, str], int] = defaultdict(int)

    def record(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        text = str(message).split("\n")[0]
        if text.startswith("Synchronization debug mode is a prototype"):  # torch's notice, not a wait
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/fuserve/" in f.filename]
        where = " < ".join(f"{f.filename.split('/fuserve/')[-1]}:{f.lineno}" for f in frames[-3:][::-1])
        sites[(where or "outside fuserve", text[:80])] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(num_steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [
        {"where": w, "what": m, "per_step": n / num_steps}
        for (w, m), n in sorted(sites.items(), key=lambda kv: -kv[1])
    ]


def print_sync_sites(sites: list[dict[str, Any]]) -> None:
    print(f"  host waits for the GPU: {len(sites)} sites" + ("" if sites else " (none)"))
    for s in sites:
        print(f"    {s['per_step']:6.1f}/step  {s['where']}  [{s['what']}]")


def print_profile(result: dict[str, Any]) -> None:
    print(
        f"  profile of {result['steps']} steps: wall {result['wall_ms_per_step']:.2f} ms/step, GPU busy "
        f"{result['gpu_busy_ms_per_step']:.2f} ({result['gpu_busy_fraction']:.0%}), "
        f"{result['launches_per_step']:.0f} kernels/step"
    )
    for k in result["kernels"]:
        print(f"    {k['ms_per_step']:8.3f} ms  x{k['launches_per_step']:<6.1f} {k['kernel']}")
