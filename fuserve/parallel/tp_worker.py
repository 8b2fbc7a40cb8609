"""One tensor-parallel rank >= 1, as a Ray actor: its own process, started by Ray (spawned, never forked
from the engine process, which holds threads and possibly a CUDA context that a fork would break).

Lifecycle, driven by worker_group.py on rank 0:
    __init__      cheap; records who it is
    init_group    checks its GPU, joins rank 0's store, forms the process groups with the other ranks
    run           builds the same Worker as rank 0 (same weights shard loading, KV sizing, CUDA graph
                  capture, so the collectives inside them pair up with rank 0's), then loops:
                  receive plan (shared-memory ring or gloo) -> forward (all-reduces) -> logits
                  collective -> repeat, until SHUTDOWN
`run` returns only at shutdown; rank 0 watches its result, so a worker that raises or dies is noticed
at once (worker_group.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ray
import torch

from fuserve.configs import FuserveConfig
from fuserve.gc_tuning import quiet_gc
from fuserve.parallel.placement import check_gpu_visible
from fuserve.parallel.plan_broadcast import PlanReceiver, RingPlanReceiver
from fuserve.parallel.plan_ring import PlanRing
from fuserve.parallel.process_group import connect_store, destroy_tp_context, init_tp_context
from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels import switches as kernel_switches
from fuserve.workers.worker import Worker, pick_dtype

log = logging.getLogger(__name__)

# How long a worker polls the plan ring busily after a plan before it polls with sleeps: a GPU decode step
# is a few ms (a busy wait answers in microseconds); on CPU the ranks share few cores with torch.
GPU_SPIN_S = 0.05
CPU_SPIN_S = 0.002


def arrival_key(rank: int) -> str:
    return f"fuserve/arrived/{rank}"


class TPWorker:
    def __init__(self, config: FuserveConfig, rank: int, size: int) -> None:
        self.config = config
        self.rank = rank
        self.size = size
        self.tp: TPContext | None = None

    def init_group(self, host: str, port: int, first_group_name: int = 0) -> dict[str, Any]:
        """Join rank 0's store, say so, then form the groups (returns once every rank has), named from
        `first_group_name` as on rank 0 (process_group.fresh_group_names), with the all-reduces and
        kernel switches of this rank's config, which is rank 0's."""
        switches = kernel_switches.apply_config(self.config)  # before the group's self-test kernels
        use_gpu = self.config.model.device == "cuda"
        if use_gpu:
            check_gpu_visible(
                f"tensor-parallel worker rank {self.rank}",
                torch.cuda.is_available(),
                os.environ.get("CUDA_VISIBLE_DEVICES"),
                ray.get_gpu_ids(),
            )
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        timeout = self.config.parallel.init_timeout_s
        store = connect_store(host, port, self.size, timeout)
        store.set(arrival_key(self.rank), str(os.getpid()))
        dtype = pick_dtype(self.config.model.dtype, device)
        par = self.config.parallel
        self.tp = init_tp_context(
            store,
            self.rank,
            self.size,
            device,
            dtype,
            timeout,
            par.all_reduce,
            first_group_name,
        )
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": list(ray.get_gpu_ids()),
            "one_shot": self.tp.fast_all_reduce is not None,
            "kernel_switches": dataclasses.asdict(switches),
        }

    def run(self, plan_ring: str | None = None) -> int:
        """Build this rank's Worker, then run plans until shutdown; returns the number of steps run.
        plan_ring: the shared-memory ring's path to read plans from (plan_ring.py), or None for gloo."""
        assert self.tp is not None, "init_group first"
        receiver = self._plan_receiver(plan_ring, self.tp)
        worker = Worker(self.config, self.tp)
        # as in the engine core: a full collection here stalls every rank at the next all-reduce
        quiet_gc()
        steps = 0
        reported = False
        while (plan := receiver.recv()) is not None:
            worker.follow(plan)
            steps += 1
            if not reported and (peer := self.tp.timed_out_rank()) is not None:
                # rank 0 fails the group for its own give-ups; this rank's says where it stood
                log.error(
                    "rank %d's GPU gave up waiting for rank %d in an all-reduce after %d steps (%s)",
                    self.rank,
                    peer,
                    steps,
                    self.tp.give_up_detail(),
                )
                reported = True
        worker.shutdown()
        destroy_tp_context()
        return steps

    def _plan_receiver(self, plan_ring: str | None, tp: TPContext) -> PlanReceiver | RingPlanReceiver:
        """Map the ring first thing (rank 0 waits for every worker to, then unlinks it), else gloo."""
        if plan_ring is None:
            return PlanReceiver(tp.cpu_group)
        try:
            ring = PlanRing.attach(plan_ring, reader=self.rank - 1)
        except FileNotFoundError as err:
            raise RuntimeError(
                f"rank {self.rank} cannot map rank 0's plan ring ({err}): it runs on rank 0's Ray node "
                "but does not see its /dev/shm; set parallel.plan_transport: gloo"
            ) from None
        return RingPlanReceiver(ring, GPU_SPIN_S if self.config.model.device == "cuda" else CPU_SPIN_S)
