"""Rank 0's side of a tensor-parallel group: start the N-1 worker actors, feed them step plans, notice
when one fails, and end them. Rank 0 itself is the engine's own process (a Serve replica, or the
offline LLM's process), so a step costs no Ray call.

    WorkerGroup.start(config)   placement (placement.py) -> store -> worker actors -> process groups
                                (process_group.py) -> `run` on every worker
    LLMEngine                   builds rank 0's shard inside `guard("startup")`, then `begin_serving()`
    LLMEngine.step              inside `guard("step")`: `broadcast(plan)` (shared-memory ring on one
                                node, else gloo: plan_broadcast.py), then rank 0's own forward
    shutdown()                  SHUTDOWN message, wait, kill, leave the groups, release the bundles

Failure: a watchdog thread waits (ray.wait) on the workers' `run` results. `run` returns only at
shutdown, so a result before that is a failure: the worker raised, or its process died. The watchdog
records the first cause and kills the other workers, so that a gloo collective rank 0 is blocked in
fails now instead of at its timeout; on GPU it also aborts NCCL. `guard` turns whatever the blocked
collective raised into a WorkerGroupError that names the cause, and every later step fails the same
way. Timeouts (parallel.init_timeout_s, on every collective and every startup wait) bound what the
watchdog cannot see: a worker that is alive but stuck. At startup the phase a rank gave up in and where
the other ranks were is the error (process_group.StartupPhases); in a step, rank 0 waits for its GPU at
most `step_timeout_s` and then fails the group, naming the step's collectives and the workers that had
not taken its plan.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import get_current_placement_group

from fuserve.configs import FuserveConfig
from fuserve.parallel.placement import (
    Placement,
    bundle_gpu_index,
    check_gpu_visible,
    reserve_placement,
    worker_options,
)
from fuserve.parallel.plan_broadcast import PlanSender, RingPlanSender
from fuserve.parallel.plan_ring import PlanRing, shm_usable
from fuserve.parallel.process_group import (
    GPU_ENV,
    GroupFormationError,
    destroy_tp_context,
    fresh_group_names,
    init_tp_context,
    open_store,
)
from fuserve.parallel.tp_context import TPContext
from fuserve.parallel.tp_worker import TPWorker, arrival_key
from fuserve.workers.kernels import switches as kernel_switches
from fuserve.workers.step_plan import StepPlan
from fuserve.workers.worker import pick_dtype

log = logging.getLogger(__name__)

POLL_S = 50e-6  # rank 0 polls its step's completion at this interval while watching the group
CAUSE_WAIT_S = 2.0  # after a failed collective, how long to let the watchdog name the rank that died


def step_timeout_s(timeout_s: float) -> float:
    """How long rank 0 waits for one step's device work: half the collective timeout, so that this wait,
    which names what it waited for, ends before NCCL's own watchdog, which ends the process instead."""
    return max(1.0, timeout_s / 2)


class WorkerGroupError(RuntimeError):
    """The tensor-parallel group cannot run: a worker failed to start, died, or timed out."""


def describe(err: BaseException) -> str:
    """One line for a Ray error: the worker's own exception, or that its process died."""
    if isinstance(err, RayActorError):
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"died (its process exited){': ' + first if first else ''}"
    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None) or err
        lines = str(cause).strip().splitlines()
        return f"raised {type(cause).__name__}: {lines[0] if lines else ''}"
    return f"{type(err).__name__}: {err}"


def _wants_gpu(config: FuserveConfig, current: Any) -> bool:
    """model.device, with `auto` read as Ray placed it: a GPU bundle means a GPU rank, even when this
    process cannot see the GPU (that is the error to report, not a reason to fall back to CPU)."""
    choice = config.model.device
    if choice != "auto":
        return choice == "cuda"
    bundle_gpu = current is not None and current.bundle_specs[0].get("GPU", 0) > 0
    return torch.cuda.is_available() or bundle_gpu


class WorkerGroup:
    def __init__(
        self,
        tp: TPContext,
        actors: dict[int, Any],
        infos: list[dict[str, Any]],
        run_refs: dict[Any, int],
        placement: Placement,
        store: Any,
        device: torch.device,
        timeout_s: float,
        ring: PlanRing | None = None,
    ) -> None:
        self.tp = tp
        self.actors = actors  # rank -> actor handle
        self.infos = infos
        self.placement = placement
        self.device = device
        self.failure: str | None = None
        self._store = store  # rank 0 hosts the rendezvous store; it lives as long as the group
        self._run_refs = run_refs
        self._lock = threading.Lock()
        self._failed = threading.Event()
        self.step_timeout_s = step_timeout_s(timeout_s)
        self._stopping = False
        self._serving = False
        self._closed = False
        self.sender: PlanSender | RingPlanSender = (
            RingPlanSender(ring, timeout_s)
            if ring is not None
            else PlanSender(tp.cpu_group, min(10.0, timeout_s / 4), self._on_sender_error)
        )
        self._watchdog = threading.Thread(target=self._watch, name="fuserve-tp-watchdog", daemon=True)
        self._watchdog.start()

    # ---- startup --------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        config: FuserveConfig,
        worker_cls: type = TPWorker,
        placement_group: Any = None,
    ) -> WorkerGroup:
        """Place and start ranks 1..N-1 and form the groups with this process as rank 0. Inside a Serve
        replica the workers take bundles 1..N-1 of its placement group (`placement_group`: the replica's,
        passed to its engine-core process, which is not a Ray worker); elsewhere a placement group is
        reserved here. The all-reduces are config.parallel.all_reduce's, and every rank sets
        its kernel switches from the same config before the group's self-test launches a kernel. Fails
        with WorkerGroupError/PlacementError, never waits past init_timeout_s."""
        par = config.parallel
        size, timeout = par.tensor_parallel_size, par.init_timeout_s
        if torch.distributed.is_initialized():
            raise WorkerGroupError(
                "this process already belongs to a tensor-parallel group; shut that engine down first "
                "(one tensor-parallel engine per process)"
            )
        kernel_switches.apply_config(config)  # before any kernel here (the one-shot self-test)
        if not ray.is_initialized():
            ray.init()  # offline use: a local Ray instance, or the cluster RAY_ADDRESS names
        current = placement_group or get_current_placement_group()
        use_gpu = _wants_gpu(config, current)
        if use_gpu:
            check_gpu_visible(
                "rank 0 (the engine process)",
                torch.cuda.is_available(),
                os.environ.get("CUDA_VISIBLE_DEVICES"),
                list(ray.get_gpu_ids()) if current is not None else [],
            )
        placement = reserve_placement(size, use_gpu, par.placement_strategy, timeout, current)
        deadline = time.monotonic() + timeout
        device_type = "cuda" if use_gpu else "cpu"
        worker_config = config.model_copy(
            update={"model": config.model.model_copy(update={"device": device_type})}
        )
        actors: dict[int, Any] = {}
        ring: PlanRing | None = None
        try:
            device = torch.device("cpu")
            if use_gpu:
                owned = placement.owned
                index = bundle_gpu_index(placement, 0, timeout) if owned else torch.cuda.current_device()
                device = torch.device("cuda", index)
                torch.cuda.set_device(device)
            host = ray.util.get_node_ip_address()
            store = open_store(host, size, timeout)
            remote_cls = ray.remote(worker_cls)
            for rank in range(1, size):
                opts = worker_options(placement, rank, use_gpu)
                if use_gpu:
                    opts["runtime_env"] = {"env_vars": dict(GPU_ENV)}
                actors[rank] = remote_cls.options(**opts).remote(worker_config, rank, size)
            names = fresh_group_names()
            init_refs = {a.init_group.remote(host, store.port, names): r for r, a in actors.items()}
            _await_arrival(store, init_refs, size, deadline, timeout)
            dtype = pick_dtype(config.model.dtype, device)
            tp = init_tp_context(store, 0, size, device, dtype, timeout, par.all_reduce, names)
            infos = ray.get(list(init_refs), timeout=max(1.0, deadline - time.monotonic()))
            ring = _create_plan_ring(par.plan_transport, infos, size)
            ring_path = str(ring.path) if ring is not None else None
            run_refs = {a.run.remote(ring_path): r for r, a in actors.items()}
            if ring is not None:
                _await_ring_attached(ring, run_refs, deadline, timeout)
        except BaseException as err:
            _kill(actors.values())
            if ring is not None:
                ring.unlink()
            if torch.distributed.is_initialized():  # rank 0 got into (part of) the group
                destroy_tp_context()
            placement.release()
            if isinstance(err, RayTaskError | RayActorError):
                raise WorkerGroupError(f"tensor-parallel startup failed: {describe(err)}") from None
            if isinstance(err, GroupFormationError):
                raise WorkerGroupError(f"tensor-parallel startup failed: {err}") from None
            if isinstance(err, ray.exceptions.GetTimeoutError):
                raise WorkerGroupError(
                    f"tensor-parallel workers did not finish forming the group within {timeout:g} s "
                    "(parallel.init_timeout_s)"
                ) from None
            raise
        log.info(
            "tensor-parallel group of %d formed (step plans over %s): %s",
            size,
            "shared memory" if ring is not None else "gloo",
            infos,
        )
        return cls(tp, actors, infos, run_refs, placement, store, device, timeout, ring)

    def begin_serving(self) -> None:
        """Rank 0's engine is built (so every worker's is): the gloo group is free for the heartbeat."""
        self._serving = True
        self.sender.begin_serving()

    # ---- steps ----------------------------------------------------------------------------------
    def broadcast(self, plan: StepPlan) -> None:
        self.sender.send(plan)

    def check(self, what: str = "step") -> None:
        if self.failure is None and (rank := self.tp.timed_out_rank()) is not None:
            detail = self.tp.give_up_detail()
            where = f" ({detail})" if detail else ""
            self._fail(f"rank 0's GPU gave up waiting for rank {rank} in an all-reduce{where}")
        if self.failure is not None:
            raise WorkerGroupError(self._message(what))

    def wait(self, ready: Callable[[], bool], what: str = "step") -> None:
        """Wait for rank 0's device work without blocking in CUDA: a dead peer can leave this GPU
        waiting in a collective, and a failure must surface now, not when (or if) the GPU gets free. A
        live peer that never arrives fails the group after `step_timeout_s`."""
        deadline = time.monotonic() + self.step_timeout_s
        while not ready():
            self.check(what)
            if time.monotonic() > deadline:
                self._fail(self._stuck(what))
                self.check(what)
            time.sleep(POLL_S)
        self.check(what)

    def _stuck(self, what: str) -> str:
        lagging = self.sender.lagging_ranks()
        where = (
            f"worker rank(s) {lagging} had not taken its plan"
            if lagging
            else "every worker had taken its plan, so a worker's GPU or process is stuck in the same step"
            if lagging is not None
            else "plans go over gloo, which cannot tell whether a worker took it"
        )
        return (
            f"rank 0's {what} did not finish on its GPU within {self.step_timeout_s:g} s: it waits in the "
            f"step's collectives (the forward's all-reduces, then the argmax all-reduce or the logits "
            f"gather) for a peer; {where}"
        )

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run rank 0's part of a collective phase; a failure inside becomes WorkerGroupError naming the
        rank that failed, and marks the group dead."""
        self.check(what)
        try:
            yield
        except Exception as err:
            if not self._failed.wait(CAUSE_WAIT_S):
                self._fail(f"rank 0's {what} failed: {type(err).__name__}: {err}")
            raise WorkerGroupError(self._message(what)) from err

    @property
    def healthy(self) -> bool:
        return self.failure is None and not self._closed

    @property
    def worker_pids(self) -> list[int]:
        return [info["pid"] for info in self.infos]

    def _message(self, what: str) -> str:
        return (
            f"tensor-parallel group (size {self.tp.size}) failed during {what}: {self.failure}. "
            "This engine cannot run steps any more; restart it (Serve replaces an unhealthy replica)"
        )

    # ---- failure --------------------------------------------------------------------------------
    def _watch(self) -> None:
        pending = dict(self._run_refs)
        while pending and not self._stopping:
            try:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            except Exception:  # Ray itself is shutting down (interpreter exit): nothing left to watch
                return
            for ref in ready:
                rank = pending.pop(ref)
                if self._stopping:
                    return
                try:
                    steps = ray.get(ref)
                    cause = f"worker rank {rank} left its step loop after {steps} steps"
                except Exception as err:
                    cause = f"worker rank {rank} {describe(err)}"
                self._fail(cause)
                return

    def _on_sender_error(self, err: BaseException) -> None:
        if not self._stopping and not self._failed.wait(CAUSE_WAIT_S):
            self._fail(f"sending a heartbeat failed: {type(err).__name__}: {err}")

    def _fail(self, cause: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = cause
        log.error("tensor-parallel group failed: %s", cause)
        self._failed.set()
        self.sender.close(send_shutdown=False)
        _kill(self.actors.values())
        if self.device.type == "cuda":
            destroy_tp_context()  # on NCCL an abort: unblocks NCCL work waiting for the dead rank

    # ---- shutdown -------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 10.0) -> None:
        """End every worker process and leave the groups; safe to call twice and after a failure."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        clean = self.failure is None and self._serving
        try:
            self.sender.close(send_shutdown=clean)
            if clean:
                ray.wait(list(self._run_refs), num_returns=len(self._run_refs), timeout=timeout_s)
        except Exception as err:  # a worker went away meanwhile; killing below ends the rest
            log.warning("tensor-parallel shutdown message failed: %s", err)
        _kill(self.actors.values())
        destroy_tp_context()
        self.placement.release()
        self._store = None
        self._watchdog.join(timeout=2.0)


def _create_plan_ring(transport: str, infos: list[dict[str, Any]], size: int) -> PlanRing | None:
    """The shared-memory ring for step plans (parallel.plan_transport), or None for gloo. Only ranks on
    rank 0's Ray node can map it; `auto` takes gloo wherever the ring cannot run, `shm` says why not."""
    if transport == "gloo":
        return None
    here = ray.get_runtime_context().get_node_id()
    elsewhere = sorted({info["node_ip"] for info in infos if info["node_id"] != here})
    why = f"workers run on other nodes ({', '.join(elsewhere)})" if elsewhere else shm_usable()
    if why is None:
        try:
            return PlanRing.create(num_readers=size - 1)
        except OSError as err:
            why = f"creating it in /dev/shm failed ({err})"
    if transport == "shm":
        raise WorkerGroupError(f"parallel.plan_transport is shm but {why}; set it to auto or gloo")
    log.info("step plans over gloo: the shared-memory ring is out (%s)", why)
    return None


def _await_ring_attached(ring: PlanRing, run_refs: dict[Any, int], deadline: float, timeout_s: float) -> None:
    """Wait until every worker has mapped the ring, then drop its name, so that no crash from here on
    leaves it in /dev/shm. A worker's `run` ending first is a failure (it cannot map the ring, or died)."""
    _await_workers(
        ring.all_attached,
        run_refs,
        deadline,
        "tensor-parallel group failed during startup: worker rank {rank} {cause}",
        lambda: (
            f"tensor-parallel workers did not map the plan ring within {timeout_s:g} s "
            "(parallel.init_timeout_s)"
        ),
    )
    ring.unlink()


def _kill(actors: Iterable[Any]) -> None:
    """End worker processes now (SIGKILL through Ray), whatever state they are in."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass


def _await_arrival(
    store: Any, init_refs: dict[Any, int], size: int, deadline: float, timeout_s: float
) -> None:
    """Wait until every worker has joined the store, failing at once when one raises or dies first
    (init_group cannot return before rank 0 joins the group, so an early result is an error)."""
    keys = [arrival_key(r) for r in range(1, size)]

    def late() -> str:
        missing = [r for r in range(1, size) if not store.check([arrival_key(r)])]
        return (
            f"tensor-parallel workers {missing} did not start within {timeout_s:g} s "
            "(parallel.init_timeout_s): their actors are still waiting for resources in their "
            "placement-group bundles, or are stuck before joining rank 0"
        )

    _await_workers(
        lambda: store.check(keys),
        init_refs,
        deadline,
        "tensor-parallel worker rank {rank} failed to start: {cause}",
        late,
    )


def _await_workers(
    done: Callable[[], bool], refs: dict[Any, int], deadline: float, failed: str, late: Callable[[], str]
) -> None:
    """Poll `done` until it holds. The worker calls in `refs` (ref -> rank) end only after it holds, so
    one that ends first is a failure, raised as `failed` (formatted with the rank and the cause); past
    `deadline`, `late()` is the error."""
    while True:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.01)
        if ready:
            try:
                ray.get(ready[0])
                cause = "returned before its start-up was over"
            except Exception as err:
                cause = describe(err)
            raise WorkerGroupError(failed.format(rank=refs[ready[0]], cause=cause)) from None
        if done():
            return
        if time.monotonic() > deadline:
            raise WorkerGroupError(late())
