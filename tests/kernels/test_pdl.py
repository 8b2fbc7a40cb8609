"""Programmatic dependent launch: a kernel that read its input before its predecessor finished writing it
would give different numbers, so a chain of dependent kernels replayed from a CUDA graph with PDL must
equal the same chain run eagerly without it, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fuserve.workers.kernels.gemv import gemv
from fuserve.workers.kernels.pdl import pdl_enabled
from fuserve.workers.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from fuserve.workers.kernels.silu_mul import silu_mul
from fuserve.workers.kernels.switches import KernelSwitches, using_switches

PDL_OFF = KernelSwitches(pdl=False)


def test_pdl_off_on_cpu_and_by_switch() -> None:
    assert not pdl_enabled(torch.zeros(1))
    if torch.cuda.is_available():
        with using_switches(PDL_OFF):
            assert not pdl_enabled(torch.zeros(1, device="cuda"))


def _chain(x: torch.Tensor, layers: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """An MLP-shaped chain where every kernel reads what the one before wrote."""
    h, residual = rmsnorm(x, layers[0][2], 1e-6), x
    for gate_up, down, norm_w in layers:
        y = gemv(silu_mul(gemv(h, gate_up)), down)
        h, residual = fused_add_rmsnorm(y, residual, norm_w, 1e-6)
    return h


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("l2_prefetch_mb", [0, 16])
def test_pdl_graph_chain_matches_eager(l2_prefetch_mb: int) -> None:
    """With L2 prefetch too: the GEMV's prefetches before its wait must not change a single bit."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90+")
    with using_switches(KernelSwitches(pdl=True, l2_prefetch_bytes=l2_prefetch_mb * 2**20)):
        _check_graph_chain()


def _check_graph_chain() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter = 2048, 4096

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=g) / shape[-1] ** 0.5).bfloat16()

    layers = [(rand(2 * inter, hidden), rand(hidden, inter), 1 + rand(hidden)) for _ in range(16)]
    x = torch.randn(1, hidden, device="cuda", generator=g).bfloat16()

    with using_switches(PDL_OFF):
        want = _chain(x, layers)
    assert pdl_enabled(x)
    _chain(x, layers)  # compile the PDL variants outside the capture
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        out = _chain(static_x, layers)
    for i in range(20):
        static_x.copy_(x if i % 2 == 0 else -x)
        graph.replay()
        torch.cuda.synchronize()
        expect = want if i % 2 == 0 else None
        if expect is None:
            with using_switches(PDL_OFF):
                expect = _chain(-x, layers)
        assert torch.equal(out, expect), f"replay {i} differs from the eager chain"
