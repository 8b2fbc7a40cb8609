"""Where a replica's tensor-parallel ranks run: one placement-group bundle per rank, rank 0 in bundle 0.

Inside a Serve replica, Serve already reserved the bundles (the deployment's `placement_group_bundles`,
see `rank_bundles`) and started the replica in bundle 0, so the workers go into bundles 1..N-1 of
that current placement group. A placement group created from inside one would wait for resources
the replica's own group already holds; that is the trap behind vLLM's "No current placement group
found", so inside Serve a missing placement group is an error that says what to configure.
Outside Serve (offline LLM, tests, benchmarks) this module reserves the bundles itself, waits at most
the startup timeout, and releases them at shutdown.

GPU visibility: Ray shows an actor only the GPUs it asked for (CUDA_VISIBLE_DEVICES), and none at all
to one that asked for none, so "CUDA is not available" inside a replica usually means the replica or
its bundle lacks `GPU: 1`; `check_gpu_visible` says so instead of letting torch say less.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """The ranks cannot be placed: no or too few GPUs, wrong bundles, or no room within the timeout."""


@dataclass
class Placement:
    group: PlacementGroup
    owned: bool  # reserved here (outside Serve): released at shutdown

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group,
            placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=False,
        )

    def bundle(self, index: int) -> dict[str, float]:
        return dict(self.group.bundle_specs[index])

    def release(self) -> None:
        if self.owned:
            remove_placement_group(self.group)


def rank_bundles(size: int, use_gpu: bool) -> list[dict[str, float]]:
    """What a Serve deployment reserves for one replica of tensor_parallel_size `size`:
    `placement_group_bundles=rank_bundles(n, True)`, `placement_group_strategy="STRICT_PACK"`, and
    `ray_actor_options={"num_gpus": 1, "num_cpus": 1}` so the replica (rank 0) fits bundle 0."""
    one = {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}
    return [dict(one) for _ in range(size)]


def in_serve_replica() -> bool:
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:
        return False
    return True


def reserve_placement(
    size: int, use_gpu: bool, strategy: str, timeout_s: float, current: PlacementGroup | None = None
) -> Placement:
    """The bundles for ranks 0..size-1: `current` (the replica's, handed to its engine core), else the
    current placement group's, or a new one."""
    current = current or get_current_placement_group()
    if current is not None:
        placement = Placement(current, owned=False)
        check_bundles(placement, size, use_gpu)
        return placement
    if in_serve_replica():
        raise PlacementError(
            f"tensor_parallel_size {size} needs a placement group, and this Serve replica has none "
            "(vLLM reports this as 'No current placement group found'). Give the deployment "
            f"placement_group_bundles={rank_bundles(size, use_gpu)} and placement_group_strategy "
            "'STRICT_PACK'; a placement group made from inside the replica would wait forever."
        )
    bundles = rank_bundles(size, use_gpu)
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in bundles[0]}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) < v}
    if short:
        what = ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
        raise PlacementError(f"tensor_parallel_size {size} needs {what}")
    group = placement_group(bundles, strategy=strategy)
    if not group.wait(timeout_s):
        remove_placement_group(group)
        raise PlacementError(
            f"could not reserve {size} x {bundles[0]} ({strategy}) within {timeout_s:g} s "
            f"(parallel.init_timeout_s); available now: {ray.available_resources()}. Other work holds "
            "the resources, or no single node has them all (STRICT_PACK needs one node)"
        )
    return Placement(group, owned=True)


def check_bundles(placement: Placement, size: int, use_gpu: bool) -> None:
    count = placement.group.bundle_count
    if count < size:
        raise PlacementError(
            f"tensor_parallel_size {size} needs {size} placement-group bundles (one per rank), the "
            f"current placement group has {count}: set placement_group_bundles={rank_bundles(size, use_gpu)}"
        )
    if use_gpu:
        lacking = [i for i in range(size) if placement.bundle(i).get("GPU", 0.0) < 1.0]
        if lacking:
            raise PlacementError(
                f"bundles {lacking} of the current placement group hold no GPU; each rank needs one: "
                f"set placement_group_bundles={rank_bundles(size, use_gpu)}"
            )


def worker_options(placement: Placement, bundle: int, use_gpu: bool) -> dict:
    """Ray actor options for the rank in `bundle`: exactly its GPU, at most its bundle's CPU."""
    spec = placement.bundle(bundle)
    return dict(
        num_gpus=1 if use_gpu else 0,
        num_cpus=min(1.0, spec.get("CPU", 0.0)),
        scheduling_strategy=placement.strategy(bundle),
    )


def check_gpu_visible(what: str, cuda_available: bool, visible: str | None, gpu_ids: list) -> None:
    """Raise a clear error when a process that needs a GPU sees none (facts passed in for testing)."""
    if cuda_available:
        return
    if visible is not None and visible.strip() == "":
        raise PlacementError(
            f"{what} sees no GPU: Ray gave it none (CUDA_VISIBLE_DEVICES is empty). A replica needs "
            "ray_actor_options num_gpus=1 and bundle 0 with GPU: 1; each worker bundle needs GPU: 1"
        )
    raise PlacementError(
        f"{what} needs a GPU but CUDA sees none (Ray GPU ids {gpu_ids}, CUDA_VISIBLE_DEVICES={visible!r}); "
        "check the driver and torch's CUDA build, or set model.device: cpu"
    )


def _gpu_ids_of_bundle() -> list:
    return list(ray.get_gpu_ids())


def bundle_gpu_index(placement: Placement, bundle: int, timeout_s: float) -> int:
    """The CUDA index, in this process, of the GPU Ray reserved for `bundle` (offline rank 0: the driver
    sees every GPU, and must use the one its bundle holds, not whichever is cuda:0)."""
    probe = ray.remote(num_gpus=1, num_cpus=0)(_gpu_ids_of_bundle)
    ids = ray.get(probe.options(scheduling_strategy=placement.strategy(bundle)).remote(), timeout=timeout_s)
    if len(ids) != 1:
        raise PlacementError(f"bundle {bundle} should hold exactly one GPU, Ray gave {ids}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        names = [v.strip() for v in visible.split(",")]
        if str(ids[0]) not in names:
            raise PlacementError(f"GPU {ids[0]} of bundle {bundle} is not in CUDA_VISIBLE_DEVICES={visible}")
        return names.index(str(ids[0]))
    return int(ids[0])
