"""The benchmark client's collector pauses: counted per level, reset by each take."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # not a package
from client_gc import ClientGcWatch  # noqa: E402


def test_pauses_since_the_last_take() -> None:
    watch = ClientGcWatch()
    try:
        watch.take()
        gc.collect()
        gc.collect()
        got = watch.take()
        assert got["client_gc_count"] >= 2
        assert 0 < got["client_gc_ms_max"] <= got["client_gc_ms_total"]
        assert watch.take() == {"client_gc_ms_total": 0.0, "client_gc_ms_max": 0.0, "client_gc_count": 0}
    finally:
        watch.close()
    assert watch._on_gc not in gc.callbacks
