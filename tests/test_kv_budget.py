"""The KV pool's size from a GPU's memory parts: pure arithmetic, so it is tested without a GPU."""

import pytest

from fuserve.configs import CacheConfig
from fuserve.workers.kv_cache import KVBudget, num_blocks_for

GIB = 1 << 30


def test_budget_is_the_limit_less_others_and_the_peak() -> None:
    budget = KVBudget(limit=48 * GIB, others=GIB, weights=8 * GIB, peak=10 * GIB, per_block=2 << 20)
    assert budget.kv == 37 * GIB
    assert num_blocks_for(CacheConfig(), budget.per_block, budget) == 37 * 512
    text = budget.describe()
    assert "weights 8.00" in text and "activation peak 2.00" in text and "contexts 1.00" in text
    assert "earlier" not in text


def test_tensors_held_before_the_build_are_named_apart_from_the_weights() -> None:
    budget = KVBudget(
        limit=48 * GIB, others=GIB, weights=8 * GIB, peak=25 * GIB, per_block=2 << 20, earlier=15 * GIB
    )
    assert budget.kv == 22 * GIB and budget.activations == 2 * GIB
    assert "earlier tensors in this process 15.00 - weights 8.00 - activation peak 2.00" in budget.describe()


def test_config_blocks_win_and_cpu_uses_its_gib() -> None:
    assert num_blocks_for(CacheConfig(num_blocks=7), 1024, None) == 7
    assert num_blocks_for(CacheConfig(cpu_kv_cache_gib=1.0), GIB // 4, None) == 4


def test_no_room_names_the_parts_and_the_fix() -> None:
    budget = KVBudget(limit=10 * GIB, others=1 * GIB, weights=9 * GIB, peak=9 * GIB + 1, per_block=1024)
    with pytest.raises(RuntimeError, match="weights 9.00.*gpu_memory_utilization"):
        num_blocks_for(CacheConfig(), budget.per_block, budget)
