"""Property tests of the scheduler and block manager, without a model.

Random interleavings of add / step / finish / abort run against a fake model that samples random
tokens; after every step the block pool's books must balance, and every admitted request must
finish within a bounded number of steps.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fuserve.configs import SchedulerConfig
from fuserve.sampling_params import SamplingParams
from fuserve.workers.block_manager import BlockManager
from fuserve.workers.scheduler import Scheduler
from fuserve.workers.sequence import FinishReason, Sequence, SequenceStatus


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def check_books(sched: Scheduler, live: list[Sequence]) -> None:
    """Every block is free, evictable or referenced exactly as often as block tables list it."""
    bm = sched.block_manager
    refs = Counter(b for s in live if not s.is_finished for b in s.block_table)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == refs.get(block, 0), f"block {block} ref count off"
    free, evictable = set(bm.free_ids), set(bm.evictable)
    assert len(free) == len(bm.free_ids), "a block is on the free list twice"
    assert not free & evictable
    in_use = set(refs)
    assert not in_use & (free | evictable), "a referenced block is also free"
    assert len(free) + len(evictable) + len(in_use) == bm.num_blocks, "a block leaked"
    for h, b in bm.block_of_hash.items():
        assert bm.hash_of_block[b] == h
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
    for s in sched.waiting:
        assert not s.block_table and s.status is SequenceStatus.WAITING
    # the queue's books: its work kept as sequences come and go equals its work summed now, and its
    # order by the keys fixed on joining is the order by priority now
    assert sched.waiting_work == sum(s.remaining_work for s in sched.waiting)
    now = sched.clock()
    priorities = [sched.priority(s, now) for s in sched.waiting_in_order()]
    assert all(a <= b + 1e-6 for a, b in itertools.pairwise(priorities)), "waiting out of priority order"


op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 24), st.integers(0, 3)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
    st.tuples(st.just("finish"), st.integers(0, 1000)),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(op, min_size=1, max_size=60),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(4, 64),
    chunked=st.booleans(),
    prefix=st.booleans(),
    policy=st.sampled_from(["swf", "fcfs"]),
    pipelined=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_workloads_balance_and_finish(
    ops, num_blocks, block_size, budget, chunked, prefix, policy, pipelined, seed
) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    capacity = num_blocks * block_size
    cfg = SchedulerConfig(
        max_num_seqs=6,
        max_num_batched_tokens=max(budget, capacity) if not chunked else budget,
        enable_chunked_prefill=chunked,
        policy=policy,
        aging_tokens_per_s=50.0,
    )
    bm = BlockManager(num_blocks, block_size, prefix)
    sched = Scheduler(cfg, bm, clock)
    live: list[Sequence] = []
    shared = [rng.randrange(50) for _ in range(40)]  # common prefixes make prefix hits likely

    inflight: list = []  # pipelined: the step launched last, whose tokens are not read back yet

    def complete(out) -> None:
        sampled = [rng.randrange(50) if item.samples else None for item in out.scheduled]
        sched.update_from_output(out, sampled)

    def step() -> None:
        clock.now += 0.1
        out = sched.schedule()
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
        sched.on_launched(out)
        if pipelined:
            if inflight:
                complete(inflight.pop())
            if out.scheduled:
                inflight.append(out)
        else:
            complete(out)
        check_books(sched, live)

    for item in ops:
        kind = item[0]
        if kind == "add":
            _, plen, max_tokens, variant = item
            plen = min(plen, capacity - max_tokens - 1) if capacity > max_tokens + 1 else 1
            max_tokens = min(max_tokens, capacity - plen)
            prompt = shared[:plen] if variant < 2 else [rng.randrange(50) for _ in range(plen)]
            seq = Sequence(
                f"s{len(live)}", prompt, SamplingParams(max_tokens=max_tokens), clock.now, max_tokens
            )
            live.append(seq)
            sched.add(seq)
        elif kind == "step":
            for _ in range(item[1]):
                step()
        elif live:
            seq = live[item[1] % len(live)]
            sched.finish(seq, FinishReason.ABORT if kind == "abort" else FinishReason.STOP)
            check_books(sched, live)

    # Drain: every admitted request must finish; the bound is generous but finite.
    limit = 20 * sum(s.num_tokens + s.max_tokens for s in live) + 100
    steps = 0
    while sched.has_unfinished() or inflight:
        step()
        steps += 1
        assert steps < limit, "a request never finished (starvation or livelock)"
    assert all(t >= 0 for s in live for t in s.token_ids), "a placeholder was left behind"
    assert all(s.is_finished for s in live)
    assert bm.num_free_blocks == num_blocks, "blocks leaked after all requests finished"
    for s in live:
        if s.finish_reason is FinishReason.LENGTH:
            assert s.num_output_tokens == s.max_tokens


def test_shortest_work_first_with_aging() -> None:
    clock = FakeClock()
    bm = BlockManager(64, 4)
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, aging_tokens_per_s=10.0)
    sched = Scheduler(cfg, bm, clock)
    long = Sequence("long", [1] * 8, SamplingParams(), 0.0, max_tokens=100)
    sched.add(long)
    clock.now = 5.0  # long has waited 5 s = 50 tokens of credit: 107 - 50 = 57
    short = Sequence("short", [2] * 8, SamplingParams(), 5.0, max_tokens=10)  # 17
    sched.add(short)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["short"]
    sched.finish(short, FinishReason.STOP)
    # A stream of short requests cannot starve the long one: its credit grows without bound.
    clock.now = 20.0
    newcomer = Sequence("newcomer", [3] * 8, SamplingParams(), 20.0, max_tokens=10)
    sched.add(newcomer)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["long"]


def test_prefix_hit_reuses_blocks_and_evicts_lru() -> None:
    bm = BlockManager(6, 4)
    a = Sequence("a", list(range(9)), SamplingParams(), 0.0, 4)
    bm.allocate(a)
    a.num_computed_tokens = 9
    bm.commit_computed(a)  # blocks 0, 1 full and hashed
    bm.free(a)
    assert len(bm.evictable) == 2
    b = Sequence("b", list(range(8)) + [99, 98], SamplingParams(), 0.0, 4)
    bm.allocate(b)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a_blocks_of(bm, 2)
    c = Sequence("c", [50] * 16, SamplingParams(), 0.0, 4)
    assert not bm.can_allocate(c)  # 4 blocks needed, 3 free, none evictable
    bm.free(b)
    assert bm.can_allocate(c)
    bm.allocate(c)  # evicts the least recently freed cached block first
    assert bm.num_free_blocks == 2


def a_blocks_of(bm: BlockManager, n: int) -> list[int]:
    return sorted(bm.block_of_hash.values())[:n]


def test_a_full_batch_does_not_rank_the_queue() -> None:
    """While the batch is full no waiting sequence can be admitted, so none is ranked: a queue of
    thousands (the offline benchmark keeps ~4,800) cost a sort every step (67 -> 22 ms of host work a
    step at 1,024 rows, bench_host_step on the CPU). Once a place frees, the best-ranked one enters."""
    clock = FakeClock()
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, policy="swf", aging_tokens_per_s=0.0)
    sched = Scheduler(cfg, BlockManager(64, 4, False), clock)
    seqs = [Sequence(f"s{i}", [1, 2, 3], SamplingParams(max_tokens=9 - i), 0.0, 9 - i) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    ranked: list[int] = []
    plain = sched.waiting_in_order
    sched.waiting_in_order = lambda: ranked.append(len(sched.waiting)) or plain()  # type: ignore[method-assign]
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["s5", "s4"]  # least work first
    sched.on_launched(out)
    sched.update_from_output(out, [7, 7])
    ranked.clear()
    out = sched.schedule()
    assert ranked == [], "the queue is not ranked while the batch is full"
    sched.on_launched(out)
    sched.update_from_output(out, [7, 7])
    sched.finish(seqs[5], FinishReason.STOP)
    out = sched.schedule()
    assert ranked == [4]
    assert "s3" in [s.seq.seq_id for s in out.scheduled]  # a place freed: the next-best enters


def test_running_sequences_sort_in_priority_order() -> None:
    """The running batch is sorted each step by a key without `now` (aging moves every priority alike);
    preemption victims come from its back, so that order must be the order by priority."""
    clock = FakeClock()
    rng = random.Random(3)
    for policy in ("swf", "fcfs"):
        cfg = SchedulerConfig(policy=policy, aging_tokens_per_s=25.0)
        sched = Scheduler(cfg, BlockManager(64, 4, False), clock)
        seqs = []
        for i in range(40):
            n = rng.randint(1, 30)
            seq = Sequence(f"s{i}", [1] * n, SamplingParams(), rng.uniform(0, 100), rng.randint(1, 200))
            seq.num_computed_tokens = rng.randint(0, n)
            seq.token_ids += [5] * rng.randint(0, 20)
            seqs.append(seq)
        now = 150.0
        by_key = sorted(seqs, key=sched._priority_key())
        priorities = [sched.priority(s, now) for s in by_key]
        assert all(a <= b + 1e-6 for a, b in itertools.pairwise(priorities)), policy
