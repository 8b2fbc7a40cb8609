"""Form (and tear down) the torch.distributed groups of one replica's tensor-parallel ranks.

Rank 0 (the engine's own process) opens a TCPStore on its node with an OS-chosen port, so no port is
guessed or raced for; it passes host and port to the worker actors, which connect to it. Then, on every
rank, the same `init_tp_context` call:
    init_process_group(nccl on GPU | gloo on CPU)   activations: all-reduce, logits gather
    new_group(gloo)                                 host facts: startup agreements, step plans
    barrier on the gloo group                       bounded by the timeout, so a missing peer is an
                                                    error, not NCCL waiting forever in its first op
    (GPU) one NCCL all-reduce, then the one-shot all-reduce (or NCCL only)
The process-wide default group is used because the symmetric-memory and NCCL paths resolve groups by
name; hence one tensor-parallel group per process at a time, and each one formed in a process takes
names no earlier one used (`fresh_group_names`).

No silent waits: each of those steps is a named phase (`StartupPhases`) that every rank records in the
store as it enters it, and every wait in it is bounded by the timeout (the store's and the groups' own
timeouts; device work is polled against a deadline, `wait_device`). A rank that gives up raises
GroupFormationError naming its rank, the collective it waited in and where each other rank got to.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from fuserve.configs import AllReduceChoice
from fuserve.parallel.one_shot_all_reduce import OneShotAllReduce
from fuserve.parallel.tp_context import TPContext

# Set in every rank's environment before NCCL or symmetric memory start: NVLink multicast stays off in
# NCCL, torch's symmetric memory and NVSHMEM (it can take shared GPUs out of service), and symmetric
# memory accepts that Ray shows each actor its GPU as cuda:0 (see one_shot_all_reduce.py).
GPU_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1",
}


GROUP_NAME_STRIDE = 1000  # names one group formation may use (it uses two: the default group, gloo)
_formed_here = 0


def fresh_group_names() -> int:
    """Rank 0: the first process-group name for a new group, to hand to every rank (init_tp_context).

    torch names groups from a per-process counter that destroying the default group resets to 0, and
    its symmetric memory keeps the store of the first group it saw under a name for the life of the
    process. A second group formed in rank 0's process under a dead group's name would rendezvous
    through the dead group's store and wait forever (seen on two H200s: a one-shot engine started after
    another one in the same process hung in a TCPStore wait). So every formation in a process takes
    names no earlier one used, and all of its ranks take the same ones."""
    global _formed_here
    _formed_here += 1
    return GROUP_NAME_STRIDE * _formed_here


def open_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, on a port the OS picks (read it back from `.port`)."""
    return dist.TCPStore(
        host, 0, world_size, is_master=True, timeout=dt.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def connect_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=dt.timedelta(seconds=timeout_s))


PHASE_KEY = "fuserve/phase/{rank}"
DEVICE_POLL_S = 1e-4


class GroupFormationError(RuntimeError):
    """A rank gave up forming the tensor-parallel group: which rank, in which collective, and where the
    other ranks were."""


class StartupPhases:
    """Where each rank is in group formation, kept in the rendezvous store: a rank that fails or times
    out in a phase says which one, and where every other rank got to (the rank that is stuck, or gone)."""

    def __init__(self, store: dist.Store, rank: int, size: int) -> None:
        self.store, self.rank, self.size = store, rank, size

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.store.set(PHASE_KEY.format(rank=self.rank), name)
        t0 = time.monotonic()
        try:
            yield
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise GroupFormationError(
                f"rank {self.rank} gave up in {name} after {time.monotonic() - t0:.1f} s "
                f"({type(err).__name__}: {first}); {self.where_others()}"
            ) from err

    def where_others(self) -> str:
        """Each other rank's last phase, read without waiting (a rank that never wrote one never joined)."""
        places = []
        for r in range(self.size):
            if r == self.rank:
                continue
            key = PHASE_KEY.format(rank=r)
            try:
                where = self.store.get(key).decode() if self.store.check([key]) else "not joined"
            except Exception as err:  # the store itself is gone (rank 0's process ended)
                where = f"unknown ({type(err).__name__})"
            places.append(f"rank {r} at {where}")
        return ", ".join(places)


def wait_device(device: torch.device, what: str, timeout_s: float) -> None:
    """Wait for the work queued so far on this device, at most timeout_s: a collective whose peer never
    arrives would hold `torch.cuda.synchronize` forever."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    deadline = time.monotonic() + timeout_s
    while not done.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not complete on the GPU within {timeout_s:g} s")
        time.sleep(DEVICE_POLL_S)


MAX_PUSH_RANKS = 2


def init_tp_context(
    store: dist.Store,
    rank: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    timeout_s: float,
    all_reduce: AllReduceChoice = "auto",
    first_group_name: int = 0,
    two_shot: bool = True,
) -> TPContext:
    """Collective: every rank calls it with the same store, size, device type, choice (parallel.all_reduce)
    and `first_group_name` (from rank 0's `fresh_group_names`). `two_shot` False keeps the one-shot and
    fused kernels at any rank count: only for measuring them alone (benchmarks/bench_tp.py)."""
    from torch.distributed import distributed_c10d

    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a tensor-parallel group; shut that engine down first "
            "(one tensor-parallel engine per process)"
        )
    distributed_c10d._world.group_count = first_group_name  # the next groups' names count up from it
    timeout = dt.timedelta(seconds=timeout_s)
    phases = StartupPhases(store, rank, size)
    if device.type == "cuda":
        for key, value in GPU_ENV.items():
            os.environ.setdefault(key, value)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    with phases.phase(f"init_process_group ({backend})"):
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    with phases.phase("the gloo group's first barrier"):
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        dist.barrier(group=cpu_group)
    fast = None
    if device.type == "cuda":
        with phases.phase("the first NCCL all-reduce"):
            warm = torch.zeros(1, device=device)
            dist.all_reduce(warm)  # creates the NCCL communicator now, while every peer is known to be here
            wait_device(device, "the first NCCL all-reduce", timeout_s)
        if all_reduce != "nccl":
            with phases.phase("the one-shot all-reduce's set-up (symmetric-memory rendezvous, self-test)"):
                # The GEMV push hung at four ranks (four H200s, 2026-11-26: the self-test summed right,
                # then a chain of pushes never finished); it is measured and kept at two ranks only.
                push = size <= MAX_PUSH_RANKS
                fast = OneShotAllReduce.create(
                    dist.group.WORLD,
                    cpu_group,
                    device,
                    dtype,
                    push_gemv=push,
                    timeout_s=timeout_s,
                    two_shot=two_shot,
                )
    with phases.phase("the gloo group's last barrier"):
        dist.barrier(group=cpu_group)
    return TPContext(rank=rank, size=size, group=dist.group.WORLD, cpu_group=cpu_group, fast_all_reduce=fast)


def destroy_tp_context() -> None:
    """Leave the group so this process can form a new one. On NCCL always an abort: rank 0 leaves after
    its workers were killed (or died), and an abort is local and cancels work still waiting for a peer.
    Free CUDA graphs that hold NCCL kernels first (LLMEngine.shutdown): with them alive, both the
    graceful teardown and the abort hung on two H200s."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
        return
    dist.destroy_process_group()
