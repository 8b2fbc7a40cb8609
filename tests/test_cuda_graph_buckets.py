"""The graph buckets: every decode batch up to the largest has a graph, and large batches pad little
(a throughput run decodes 256-1024 sequences a step; the list used to stop at 256); mixed steps' token
buckets; and how a step's inputs are padded to a bucket."""

from __future__ import annotations

import bisect

import pytest

from fuserve.configs import config_from_dict
from fuserve.workers.cuda_graphs import graph_buckets, pack_step, token_buckets
from fuserve.workers.step_plan import StepPlan
from fuserve.workers.worker import mixed_graph_max_tokens


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


def test_token_buckets_are_powers_of_two_then_every_64_then_every_128() -> None:
    assert token_buckets(512) == [16, 32, 64, 128, 192, 256, 320, 384, 512]  # no 448 (slow on an H100)
    assert token_buckets(1024) == [16, 32, 64, 128, 192, 256, 320, 384, 512, 640, 768, 896, 1024]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(16) == [16]
    assert token_buckets(2) == [2]
    assert token_buckets(200) == [16, 32, 64, 128, 192, 200]
    assert token_buckets(400) == [16, 32, 64, 128, 192, 256, 320, 384, 400]


def test_mixed_graphs_reach_2048_tokens_within_the_step_budget() -> None:
    """A 256-stream step (256 decodes + a prompt chunk) is over 512 tokens: by default it replays a graph,
    under tensor parallelism too (the 1,024 and 2,048 buckets ran on two H200s: parallel_gpu_checks.py)."""
    config = config_from_dict({"scheduler": {"max_num_batched_tokens": 8192}})
    assert mixed_graph_max_tokens(config) == 2048
    small_budget = config_from_dict({"scheduler": {"max_num_batched_tokens": 1024, "max_num_seqs": 256}})
    assert mixed_graph_max_tokens(small_budget) == 1024
    off = config_from_dict({"kernels": {"cuda_graph_max_tokens": 0}})
    assert mixed_graph_max_tokens(off) == 0


def test_pack_step_pads_tokens_and_sequence_slots() -> None:
    """A prompt chunk of 3 beside a decode, padded to 8 tokens and 4 sequence slots at 3 columns:
    padding tokens write slot -1, padding slots have no table entries and context 0."""
    plan = StepPlan(
        input_ids=[5, 6, 7, 9],
        positions=[0, 1, 2, 40],
        slot_mapping=[32, 33, 34, 72],
        query_start_loc=[0, 3, 4],
        context_lens=[3, 41],
        block_tables=[[2], [1, 4, 4]],
    )
    wide, lens, tables = pack_step(plan, tokens=8, seqs=4, width=3)
    assert [(a.typecode, a.itemsize) for a in (wide, lens, tables)] == [("q", 8), ("i", 4), ("i", 4)]
    ids, positions = [5, 6, 7, 9, 0, 0, 0, 0], [0, 1, 2, 40, 0, 0, 0, 0]
    slots = [32, 33, 34, 72, -1, -1, -1, -1]
    assert wide.tolist() == ids + positions + slots
    assert lens.tolist() == [3, 41, 0, 0]
    assert tables.tolist() == [2, 0, 0, 1, 4, 4] + [0] * 6
