"""TPWorker variants that fail the ways a real worker can, for tests/test_tensor_parallel.py.

They live in their own module because Ray imports an actor's class by name in the worker process
(the tests put this folder on the workers' PYTHONPATH).
"""

from __future__ import annotations

import time
from typing import Any

from fuserve.parallel.plan_ring import PlanRing
from fuserve.parallel.tp_worker import TPWorker


class RaisingWorker(TPWorker):
    """Fails before joining rank 0, like a worker whose GPU or import is broken."""

    def init_group(self, host: str, port: int, first_group_name: int = 0) -> dict[str, Any]:
        raise ValueError("simulated: this worker cannot open its GPU")


class StuckWorker(TPWorker):
    """Never joins rank 0, like a worker waiting forever for a device or a lock."""

    def init_group(self, host: str, port: int, first_group_name: int = 0) -> dict[str, Any]:
        time.sleep(3600)
        return {}


class FailingBuildWorker(TPWorker):
    """Joins the group, then fails while building its shard (after rank 0 started building its own)."""

    def run(self, plan_ring: str | None = None) -> int:
        if plan_ring is not None:  # as TPWorker.run, which maps the ring before building its shard
            PlanRing.attach(plan_ring, reader=self.rank - 1)
        raise RuntimeError("simulated: CUDA out of memory while loading the shard")
