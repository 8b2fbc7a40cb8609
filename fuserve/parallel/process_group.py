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
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Literal

import torch
import torch.distributed as dist

from fuserve.parallel.one_shot_all_reduce import OneShotAllReduce
from fuserve.parallel.tp_context import TPContext

# auto: the fast paths where they fit (one-shot, fused add + RMSNorm, GEMV push); no-push: the same
# without the GEMV push (A/B runs); nccl: NCCL for every all-reduce
AllReduceChoice = Literal["auto", "no-push", "nccl"]

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


def init_tp_context(
    store: dist.Store,
    rank: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    timeout_s: float,
    all_reduce: AllReduceChoice = "auto",
    first_group_name: int = 0,
) -> TPContext:
    """Collective: every rank calls it with the same store, size, device type, choice and
    `first_group_name` (from rank 0's `fresh_group_names`)."""
    from torch.distributed import distributed_c10d

    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a tensor-parallel group; shut that engine down first "
            "(one tensor-parallel engine per process)"
        )
    distributed_c10d._world.group_count = first_group_name  # the next groups' names count up from it
    timeout = dt.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        for key, value in GPU_ENV.items():
            os.environ.setdefault(key, value)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    dist.barrier(group=cpu_group)
    fast = None
    if device.type == "cuda":
        warm = torch.zeros(1, device=device)
        dist.all_reduce(warm)  # creates the NCCL communicator now, while every peer is known to be here
        torch.cuda.synchronize(device)
        if all_reduce != "nccl":
            fast = OneShotAllReduce.create(
                dist.group.WORLD, cpu_group, device, dtype, push_gemv=all_reduce == "auto"
            )
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
