"""Compiles while serving are reported with the kernel's name and how long they took."""

from __future__ import annotations

import time

import pytest
import torch

triton = pytest.importorskip("triton")

from fuserve.workers.kernels.compile_watch import watch_compiles  # noqa: E402


@pytest.fixture
def hooks() -> object:
    runtime = triton.knobs.runtime
    saved = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    yield runtime
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = saved


def test_slow_compiles_are_reported_fast_ones_are_not(hooks: object) -> None:
    """Called the way Triton's JITFunction._do_compile calls them (keyword arguments, the cache hook
    before and the post-compile hook after)."""
    seen: list[tuple[str, float]] = []
    assert watch_compiles(lambda kernel, s: seen.append((kernel, s)), min_seconds=0.02)
    for name, pause in (("_fast[num_warps=4](n: i32)", 0.0), ("_slow[num_warps=4](n: i32)", 0.03)):
        assert hooks.jit_cache_hook(key=(), repr=name, fn=None, compile={}, is_manual_warmup=False) is False
        time.sleep(pause)
        hooks.jit_post_compile_hook(key=(), repr=name, fn=None, compile={}, is_manual_warmup=False)
    assert [k for k, _ in seen] == ["_slow[num_warps=4](n: i32)"] and seen[0][1] >= 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_new_specialization_is_reported(hooks: object) -> None:
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    seen: list[str] = []
    watch_compiles(lambda kernel, s: seen.append(kernel), min_seconds=0.0)
    x = torch.zeros(32, device="cuda")
    _add_one[(1,)](x, 32, BLOCK=32)
    _add_one[(1,)](x, 17, BLOCK=32)  # n no longer divisible by 16: a second specialization
    _add_one[(1,)](x, 17, BLOCK=32)  # cached: no report
    assert len(seen) == 2 and all("_add_one" in k for k in seen)
