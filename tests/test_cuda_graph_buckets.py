"""The decode-graph batch buckets: every batch up to the largest has a graph, and large batches pad
little (a throughput run decodes 256-1024 sequences a step; the list used to stop at 256)."""

from __future__ import annotations

import bisect

import pytest

from fuserve.workers.cuda_graphs import graph_buckets


def test_buckets_up_to_256_are_the_powers_of_two() -> None:
    assert graph_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_buckets(1) == [1]


def test_the_largest_batch_is_always_a_bucket() -> None:
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert graph_buckets(1024)[-1] == 1024
    assert graph_buckets(1000)[-2:] == [960, 1000]


@pytest.mark.parametrize("max_batch", [1, 3, 64, 100, 256, 300, 512, 1000, 1024, 2048])
def test_every_batch_replays_a_graph_padded_by_little(max_batch: int) -> None:
    buckets = graph_buckets(max_batch)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
    for batch in range(1, max_batch + 1):
        padded = buckets[bisect.bisect_left(buckets, batch)]
        assert padded >= batch
        if batch > 256:  # past the powers of two: at most 63 padding rows (<= 25 % of the batch)
            assert padded - batch < 64
