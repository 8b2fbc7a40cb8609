"""The shared-memory plan ring (fuserve/parallel/plan_ring.py) and the plan transport over it, with
writer and readers in one process (threads where both must run at once). The TP=2 engine tests in
test_tensor_parallel.py run it across processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from fuserve.parallel import plan_ring
from fuserve.parallel.plan_broadcast import RingPlanReceiver, RingPlanSender
from fuserve.parallel.plan_ring import HEADER_WORDS, SHM_DIR, PlanRing, RingClosed, shm_usable
from fuserve.workers.step_plan import StepPlan

pytestmark = pytest.mark.skipif(shm_usable() is not None, reason=f"no plan ring here: {shm_usable()}")


@pytest.fixture
def ring() -> PlanRing:
    ring = PlanRing.create(num_readers=2, num_slots=3, slot_numel=5)
    yield ring
    ring.unlink()


def test_messages_of_any_length_arrive_in_order_to_every_reader(ring: PlanRing) -> None:
    readers = [PlanRing.attach(ring.path, r) for r in range(2)]
    got: list[list[list[int]]] = [[], []]
    lengths = [1, 5, 6, 0, 11, 40, 3] * 4  # 0 to 8 chunks per message; the ring has 3 slots

    def read(r: int) -> None:
        for n in lengths:
            words = readers[r].recv_chunk(timeout_s=10)  # a message is one chunk or more
            while len(words) < n:
                words += readers[r].recv_chunk(timeout_s=10)
            got[r].append(words[:n])

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    sent = [[1000 * i + j for j in range(n)] for i, n in enumerate(lengths)]
    for message in sent:
        ring.send(message, timeout_s=10)
    for t in threads:
        t.join(timeout=10)
    assert got == [sent, sent]


def test_a_full_ring_waits_for_the_slowest_reader(ring: PlanRing) -> None:
    fast, slow = PlanRing.attach(ring.path, 0), PlanRing.attach(ring.path, 1)
    for i in range(3):
        ring.send([i])
        assert fast.recv_chunk(timeout_s=1) == [i]
    with pytest.raises(TimeoutError, match="waiting for a worker"):
        ring.send([3], timeout_s=0.05)  # every slot still holds a message the slow reader has not taken
    assert slow.recv_chunk(timeout_s=1) == [0]
    ring.send([3], timeout_s=1)
    assert [slow.recv_chunk(timeout_s=1) for _ in range(3)] == [[1], [2], [3]]


def test_close_ends_a_blocked_send_and_a_blocked_receive(ring: PlanRing) -> None:
    reader = PlanRing.attach(ring.path, 0)
    errors: list[BaseException] = []

    def recv() -> None:
        try:
            reader.recv_chunk()
        except RingClosed as err:
            errors.append(err)

    t = threading.Thread(target=recv)
    t.start()
    time.sleep(0.05)
    reader.close()
    t.join(timeout=5)
    assert len(errors) == 1 and not t.is_alive()
    for i in range(3):
        ring.send([i])
    threading.Timer(0.05, ring.close).start()
    with pytest.raises(RingClosed):
        ring.send([3])  # full: readers never read


def _exited_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_a_reader_notices_that_the_writer_is_gone(ring: PlanRing) -> None:
    reader = PlanRing.attach(ring.path, 0)
    reader._words[3] = _exited_pid()  # as if rank 0 had been that process, now exited
    t0 = time.monotonic()
    with pytest.raises(RingClosed, match="is gone"):
        reader.recv_chunk()
    assert time.monotonic() - t0 < 5


def test_a_writer_invisible_at_attach_is_never_declared_gone(ring: PlanRing) -> None:
    """Another pid namespace (the writer's pid means nothing here): only Ray ends such a worker."""
    ring._words[3] = _exited_pid()
    reader = PlanRing.attach(ring.path, 0)
    with pytest.raises(TimeoutError):
        reader.recv_chunk(timeout_s=1.5)


def test_readers_say_they_attached(ring: PlanRing) -> None:
    assert not ring.all_attached()
    PlanRing.attach(ring.path, 1)
    assert not ring.all_attached()
    PlanRing.attach(ring.path, 0)
    assert ring.all_attached()


def test_no_room_in_dev_shm_is_an_error_at_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pages are taken up front: a full /dev/shm fails here, leaving no file, not with SIGBUS later."""

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    before = set(SHM_DIR.glob("fuserve-plans-*"))
    monkeypatch.setattr(plan_ring.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space"):
        PlanRing.create(num_readers=1)
    assert set(SHM_DIR.glob("fuserve-plans-*")) == before


def test_the_name_can_go_while_the_mapping_lives_on(ring: PlanRing) -> None:
    reader = PlanRing.attach(ring.path, 1)
    ring.unlink()
    assert not ring.path.exists()
    ring.send([7, 8])
    assert reader.recv_chunk(timeout_s=1) == [7, 8]
    with pytest.raises(FileNotFoundError):
        PlanRing.attach(ring.path, 0)


def test_attach_checks_what_it_maps(tmp_path) -> None:
    bogus = tmp_path / "not-a-ring"
    bogus.write_bytes(b"\0" * 8 * (HEADER_WORDS + 1))
    with pytest.raises(RuntimeError, match="not a fuserve plan ring"):
        PlanRing.attach(bogus, 0)


def test_plans_cross_the_ring_whole(ring: PlanRing) -> None:
    """Through the transport: plans spanning several slots, an empty one, then shutdown (None)."""
    sender = RingPlanSender(ring, timeout_s=10)
    receivers = [RingPlanReceiver(PlanRing.attach(ring.path, r), spin_s=0.0) for r in range(2)]
    plans = [
        StepPlan(input_ids=[5], positions=[3], slot_mapping=[7], query_start_loc=[0, 1], context_lens=[4],
                 block_tables=[[1]], sample_rows=[0], argmax_only=True),
        StepPlan(input_ids=list(range(30)), positions=list(range(30)), slot_mapping=list(range(30)),
                 query_start_loc=[0, 10, 30], context_lens=[10, 20], sample_rows=[0, 1],
                 block_tables=[[1, 2, 3], [4, 5, 6, 7, 8]], fill_positions=[9], fill_rows=[0]),
        StepPlan(),
    ]  # fmt: skip
    got: list[list[StepPlan | None]] = [[], []]

    def read(r: int) -> None:
        while (plan := receivers[r].recv()) is not None:
            got[r].append(plan)
        got[r].append(None)

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for plan in plans:
        sender.send(plan)
    sender.close(send_shutdown=True)
    for t in threads:
        t.join(timeout=10)
    assert got == [[*plans, None], [*plans, None]]
    assert not ring.path.exists(), "close unlinks the ring"
