"""The kernel switches of this process: which launch features the Triton kernels use.

Why a process value: a launcher runs ~300 times per decode step, deep under ops that never see the
config, so it reads a value set once instead of taking one more argument through every layer. Why not
environment variables: a switch read from the environment at launch time differs between ranks whenever
their environments differ (a worker on another node, a replica that changed its own environment), and
nothing in the config says which kernels ran. So the config holds them (`kernels.pdl`,
`kernels.l2_prefetch_mb`), and whoever builds a Worker, or forms a tensor-parallel group whose self-test
launches kernels, sets them here first from the same config; every rank builds from the same config, so
every rank runs the same kernels. Outside a Worker (kernel tests, micro-benchmarks) the defaults hold
until `using_switches` says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fuserve.configs import ConfigError, FuserveConfig

# The environment variables that set these switches until they became config fields, and the field that
# replaces each. A script that still sets one gets an error: ignoring it would silently time the wrong
# kernels in an A/B run.
RETIRED_ENV = {
    "FUSERVE_PDL": "kernels.pdl",
    "FUSERVE_L2_PREFETCH_MB": "kernels.l2_prefetch_mb",
    "FUSERVE_TWO_SHOT": "parallel.two_shot",
}


@dataclass(frozen=True)
class KernelSwitches:
    """pdl: launch with programmatic dependent launch where the device supports it (pdl.py).
    l2_prefetch_bytes: what one batch-1 GEMV may prefetch into L2 (l2_prefetch.py); 0: off.
    all_reduce_prefetch_bytes: what one fused all-reduce may prefetch of the next layer's weights
    (parallel/all_reduce_rmsnorm.py); 0: off."""

    pdl: bool = True
    l2_prefetch_bytes: int = 0
    all_reduce_prefetch_bytes: int = 0

    @classmethod
    def from_config(cls, config: FuserveConfig) -> KernelSwitches:
        check_no_retired_env()
        kernels = config.kernels
        mb = kernels.l2_prefetch_mb
        tp = config.parallel.tensor_parallel_size > 1
        if mb is None:
            mb = TP_L2_PREFETCH_MB if tp else 0.0
        ar_mb = kernels.all_reduce_prefetch_mb
        if ar_mb is None:
            ar_mb = TP_ALL_REDUCE_PREFETCH_MB if tp else 0.0
        return cls(
            pdl=kernels.pdl, l2_prefetch_bytes=int(mb * 2**20), all_reduce_prefetch_bytes=int(ar_mb * 2**20)
        )


TP_L2_PREFETCH_MB = 4.0  # kernels.l2_prefetch_mb when unset, under tensor parallelism (configs.py says why)
TP_ALL_REDUCE_PREFETCH_MB = 24.0  # kernels.all_reduce_prefetch_mb when unset, under tensor parallelism
_current = KernelSwitches()


def switches() -> KernelSwitches:
    """This process's switches, as the launchers read them."""
    return _current


def set_switches(value: KernelSwitches) -> KernelSwitches:
    """Set this process's switches; returns the previous ones. Call it before the first kernel of an
    engine runs (graphs captured earlier keep the launches they recorded)."""
    global _current
    previous, _current = _current, value
    return previous


def apply_config(config: FuserveConfig) -> KernelSwitches:
    """Set this process's switches from `config` (Worker, tensor-parallel group formation)."""
    value = KernelSwitches.from_config(config)
    set_switches(value)
    return value


@contextmanager
def using_switches(value: KernelSwitches) -> Iterator[None]:
    """These switches inside the block, the previous ones after it (tests, micro-benchmarks)."""
    previous = set_switches(value)
    try:
        yield
    finally:
        set_switches(previous)


def check_no_retired_env() -> None:
    """Fail, naming the config field, when an old script still sets a retired environment variable."""
    found = [name for name in RETIRED_ENV if name in os.environ]
    if found:
        fixes = ", ".join(f"{name} -> {RETIRED_ENV[name]}" for name in found)
        raise ConfigError(
            f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} set, but the kernel switches are "
            f"config fields now and the environment is no longer read: unset {' and '.join(found)} and "
            f"set the config field instead ({fixes}; e.g. `kernels: {{pdl: false}}` in the YAML)"
        )
