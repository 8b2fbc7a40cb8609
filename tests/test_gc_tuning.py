"""The serving processes' collector settings (fuserve/gc_tuning.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from fuserve.gc_tuning import (
    GEN0_THRESHOLD,
    GcPauses,
    gc_seconds_total,
    live_instances,
    quiet_gc,
    take_gc_pauses,
)


@pytest.fixture
def restore_gc() -> Iterator[None]:
    """quiet_gc changes this process's collector; the rest of the test session gets Python's back."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_quiet_gc_freezes_the_heap_and_raises_the_first_threshold(restore_gc: None) -> None:
    kept = [[i] for i in range(1000)]  # alive when the process is "up"
    quiet_gc()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold()[0] == GEN0_THRESHOLD
    cycle: list = []
    cycle.append(cycle)  # garbage made after start-up is still collected
    del cycle
    assert gc.collect() >= 1


def test_gc_seconds_total_counts_collections(restore_gc: None) -> None:
    before = gc_seconds_total()
    for _ in range(3):
        gc.collect()
    assert gc_seconds_total() > before


def test_pauses_since_the_last_take(restore_gc: None) -> None:
    """bench_serve's router rows report the client's collections a level (`client_gc_*`)."""
    take_gc_pauses()
    gc.collect()
    gc.collect()
    got = take_gc_pauses()
    assert got.count >= 2
    assert 0 < got.longest_s <= got.seconds
    assert take_gc_pauses() == GcPauses()


def test_live_instances_sees_past_a_frozen_heap(restore_gc: None) -> None:
    class Marker:
        pass

    kept = Marker()
    gc.freeze()
    assert live_instances(Marker) == [kept]
    assert gc.get_freeze_count() > 0  # frozen again afterwards
