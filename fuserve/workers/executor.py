"""Between the engine and its workers: one rank in this process, or rank 0 of a tensor-parallel group.

    engine.step(): plan -> executor.execute(plan, prev) -> SampledBatch; executor.wait(batch)
                   or, when grammars mask the step: executor.forward(plan, prev) -> logits, then
                   executor.sample(plan, logits, bitmask) -> SampledBatch
    UniprocExecutor   the Worker here
    TPExecutor        the Worker here as rank 0; ranks 1..N-1 (WorkerGroup, Ray actors) get each plan
                      first (shared-memory ring or gloo) and run the same step, in step with this one

Imports run one way: engine -> executor -> parallel.worker_group -> parallel.tp_worker -> worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fuserve.configs import FuserveConfig
from fuserve.parallel.tp_context import TPContext
from fuserve.workers.sampler import SampledBatch
from fuserve.workers.step_plan import StepPlan
from fuserve.workers.worker import Worker

if TYPE_CHECKING:  # Ray is imported only where ranks 1..N-1 are started: one GPU's engine runs without it
    from fuserve.parallel.worker_group import WorkerGroup


class UniprocExecutor:
    workers: WorkerGroup | None = None

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def execute(self, plan: StepPlan, prev: SampledBatch | None) -> SampledBatch | None:
        return self.worker.launch(plan, prev)

    def forward(self, plan: StepPlan, prev: SampledBatch | None) -> torch.Tensor | None:
        return self.worker.launch_logits(plan, prev)

    def sample(self, plan: StepPlan, logits: torch.Tensor, bitmask: torch.Tensor | None) -> SampledBatch:
        return self.worker.sample(plan, logits, bitmask)

    def wait(self, batch: SampledBatch) -> None:
        """Nothing to watch: the batch's own read-back waits on the device."""

    @property
    def healthy(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.worker.shutdown()


class TPExecutor:
    def __init__(self, worker: Worker, workers: WorkerGroup) -> None:
        self.worker = worker
        self.workers = workers

    def execute(self, plan: StepPlan, prev: SampledBatch | None) -> SampledBatch | None:
        with self.workers.guard("step"):
            self.workers.broadcast(plan)  # the other ranks run the same plan, in step with this one
            return self.worker.launch(plan, prev)

    def forward(self, plan: StepPlan, prev: SampledBatch | None) -> torch.Tensor | None:
        """The other ranks follow the whole plan; their share of `sample` is the token broadcast."""
        with self.workers.guard("step"):
            self.workers.broadcast(plan)
            return self.worker.launch_logits(plan, prev)

    def sample(self, plan: StepPlan, logits: torch.Tensor, bitmask: torch.Tensor | None) -> SampledBatch:
        with self.workers.guard("step"):
            return self.worker.sample(plan, logits, bitmask)

    def wait(self, batch: SampledBatch) -> None:
        """Polls the step's completion while watching the group: a dead worker fails it, not hangs it."""
        self.workers.wait(batch.ready)

    @property
    def healthy(self) -> bool:
        """False once a worker failed, even before a step notices."""
        return self.workers.healthy

    def shutdown(self) -> None:
        """Rank 0's graphs first, then the worker processes, which release their GPUs."""
        self.worker.shutdown()
        self.workers.shutdown()


Executor = UniprocExecutor | TPExecutor


def build_executor(config: FuserveConfig, workers: WorkerGroup | None = None) -> Executor:
    """`workers`: ranks 1..N-1, already started (tests, benchmarks, the engine core placing them in its
    replica's placement group); started here from `config.parallel` when tensor_parallel_size > 1."""
    if workers is None and config.parallel.tensor_parallel_size == 1:
        return UniprocExecutor(Worker(config, TPContext()))
    if workers is None:
        from fuserve.parallel.worker_group import WorkerGroup

        workers = WorkerGroup.start(config)
    try:
        with workers.guard("startup"):
            worker = Worker(config, workers.tp)
    except BaseException:
        workers.shutdown()
        raise
    workers.begin_serving()
    return TPExecutor(worker, workers)
