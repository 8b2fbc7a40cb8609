"""Step plans from rank 0 to the ranks of its own node through a shared-memory ring: no collective and
no system call per plan.

Why: on the two-H200 machine the gloo broadcast of a batch-1 decode plan took 88 us of rank 0's time per
step (of 2.65 ms), while the GPUs waited for the step to be queued. Here rank 0 copies the plan's words
into shared memory and each worker, polling, copies them out: microseconds (benchmarks/bench_plan_ring.py
measures both transports).

One file in /dev/shm, mapped by every rank; int64 words:
    header  [MAGIC, num_slots, slot_numel, writer pid, ack of reader 1, ..., ack of reader N-1]
    slots   num_slots x [seq, used, data: slot_numel words]
A message (the words of plan_broadcast.py's codec: kind, payload length, counts, payload) fills one or
more slots, one per chunk, each chunk taking the next sequence number s (from 1) and slot s % num_slots.
The writer fills a slot's `used` and data, then, after a memory fence, its `seq`; a reader waits until
the slot's seq is the one it expects, fences, copies the data, then stores s in its ack word. The writer
reuses a slot (for s + num_slots) only when every reader's ack has reached s. Aligned int64 stores are
single stores on x86-64 and aarch64, so a reader never sees half a seq or ack.

Rank 0 unlinks the file once every worker has mapped it (`unlink`), so a crash leaves nothing in
/dev/shm. Waits poll: busily for `spin_s`, then with short sleeps (an idle worker costs no core), and
they end on a deadline, on `close()`, or when the writer's process is gone.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAGIC = 0x66757365_706C616E  # "fuseplan"
HEADER_WORDS = 4  # magic, num_slots, slot_numel, writer pid; the readers' acks follow
SLOT_HEADER = 2  # seq, used
SHM_DIR = Path("/dev/shm")
SLEEP_S = 200e-6  # poll interval once the busy spin is over
PID_CHECK_S = 1.0  # how often a waiting reader checks that the writer's process is alive

_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier between the data and the sequence number that publishes it (taking and
    releasing a lock is one); x86 keeps stores in order anyway, aarch64 does not."""
    with _FENCE:
        pass


class RingClosed(RuntimeError):
    """The ring was closed (the group is shutting down or failed) while a send or receive waited."""


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class PlanRing:
    """One rank's mapping of the ring. Rank 0 `create`s it and writes; worker r `attach`es and reads
    with reader index r - 1."""

    def __init__(self, path: Path, words: np.ndarray, mapping: mmap.mmap, reader: int | None) -> None:
        self.path = path
        self._map = mapping
        self._words = words
        self.num_slots = int(words[1])
        self.slot_numel = int(words[2])
        self.num_readers = len(words) - HEADER_WORDS - self.num_slots * (SLOT_HEADER + self.slot_numel)
        self.reader = reader
        self._acks = words[HEADER_WORDS : HEADER_WORDS + self.num_readers]
        first = HEADER_WORDS + self.num_readers
        self._slots = words[first:].reshape(self.num_slots, SLOT_HEADER + self.slot_numel)
        self._next = 1  # the sequence number this end writes or reads next
        self._closed = threading.Event()

    @classmethod
    def create(cls, num_readers: int, num_slots: int = 16, slot_numel: int = 4096) -> PlanRing:
        if num_readers < 1 or num_slots < 2 or slot_numel < 1:
            raise ValueError("a plan ring needs >= 1 reader, >= 2 slots and >= 1 word per slot")
        words_total = HEADER_WORDS + num_readers + num_slots * (SLOT_HEADER + slot_numel)
        path = SHM_DIR / f"fuserve-plans-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, words_total * 8)
            mapping = mmap.mmap(fd, words_total * 8)
        finally:
            os.close(fd)
        words = np.frombuffer(mapping, dtype=np.int64)
        words[1:4] = [num_slots, slot_numel, os.getpid()]
        fence()
        words[0] = MAGIC
        return cls(path, words, mapping, reader=None)

    @classmethod
    def attach(cls, path: str | Path, reader: int) -> PlanRing:
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        words = np.frombuffer(mapping, dtype=np.int64)
        if int(words[0]) != MAGIC:
            raise RuntimeError(f"{path} is not a fuserve plan ring")
        ring = cls(Path(path), words, mapping, reader=reader)
        if not 0 <= reader < ring.num_readers:
            raise ValueError(f"reader {reader} of a ring with {ring.num_readers} readers")
        return ring

    # ---- both ends ------------------------------------------------------------------------------
    def close(self) -> None:
        """Make every current and later wait on this end raise RingClosed (the mapping stays valid)."""
        self._closed.set()

    def unlink(self) -> None:
        """Remove the name (rank 0, once every reader has attached); mappings live on."""
        self.path.unlink(missing_ok=True)

    def _wait(self, ready: Callable[[], bool], spin_s: float, timeout_s: float | None, what: str) -> None:
        if ready():
            return
        start = last_check = time.monotonic()
        while not ready():
            if self._closed.is_set():
                raise RingClosed(f"plan ring closed while {what}")
            now = time.monotonic()
            if timeout_s is not None and now - start > timeout_s:
                raise TimeoutError(f"no progress for {timeout_s:g} s while {what}")
            if now - start < spin_s:
                continue
            if self.reader is not None and now - last_check > PID_CHECK_S:
                last_check = now
                if not _alive(int(self._words[3])):
                    raise RingClosed(f"rank 0 (pid {int(self._words[3])}) is gone")
            time.sleep(SLEEP_S)

    # ---- rank 0 ---------------------------------------------------------------------------------
    def send(self, message: list[int], spin_s: float = 0.0, timeout_s: float | None = None) -> None:
        """Write one message; waits only while the ring is full (a reader is num_slots chunks behind)."""
        assert self.reader is None, "only rank 0 writes"
        data = np.asarray(message, dtype=np.int64)
        for begin in range(0, max(len(data), 1), self.slot_numel):
            chunk = data[begin : begin + self.slot_numel]
            seq = self._next
            reusable = seq - self.num_slots
            if reusable > 0:
                self._wait(
                    lambda r=reusable: int(self._acks.min()) >= r,
                    spin_s,
                    timeout_s,
                    "waiting for a worker to take an earlier plan",
                )
            slot = self._slots[seq % self.num_slots]
            slot[1] = len(chunk)
            slot[SLOT_HEADER : SLOT_HEADER + len(chunk)] = chunk
            fence()
            slot[0] = seq
            self._next += 1

    # ---- a worker -------------------------------------------------------------------------------
    def recv_chunk(self, spin_s: float = 0.0, timeout_s: float | None = None) -> list[int]:
        """The next chunk's words, once rank 0 has written it."""
        assert self.reader is not None, "rank 0 does not read"
        seq = self._next
        slot = self._slots[seq % self.num_slots]
        self._wait(lambda: int(slot[0]) == seq, spin_s, timeout_s, "waiting for the next plan")
        fence()
        words = slot[SLOT_HEADER : SLOT_HEADER + int(slot[1])].tolist()
        fence()
        self._acks[self.reader] = seq
        self._next += 1
        return words


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
