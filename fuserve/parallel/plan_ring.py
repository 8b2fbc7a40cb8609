"""Step plans from rank 0 to the ranks of its own node through a shared-memory ring: no collective and
no system call per plan.

Why: on the two-H200 machine the gloo broadcast of a batch-1 decode plan took 88 us of rank 0's time per
step (of 2.65 ms), while the GPUs waited for the step to be queued. Here rank 0 copies the plan's words
into shared memory and each worker, polling, copies them out: microseconds (benchmarks/
bench_plan_transport.py measures both transports).

One file in /dev/shm, mapped by every rank; int64 words:
    header  [MAGIC, num_slots, slot_numel, writer pid, ack of each reader..., attached flag of each]
    slots   num_slots x [seq, used, data: slot_numel words]
A message (the words of plan_broadcast.py's codec: kind, payload length, counts, payload) fills one or
more slots, one per chunk, each chunk taking the next sequence number s (from 1) and slot s % num_slots.
The writer fills a slot's `used` and data, then its `seq`; a reader waits until the slot's seq is the
one it expects, copies the data, then stores s in its ack word. The writer reuses a slot (for
s + num_slots) only when every reader's ack has reached s. This relies on the CPU keeping stores in
order and loads in order, which x86-64 does (TSO) and aarch64 does not, and Python has no fence to add:
so the ring is offered on x86-64 only (`shm_usable`), gloo carries plans elsewhere. Aligned int64
stores are single stores, so a reader never sees half a seq or ack.

The file's pages are allocated at creation (a full /dev/shm is an error then, not a SIGBUS mid-serving),
and rank 0 unlinks it as soon as every reader has attached (`all_attached`), so a crash after that leaves
nothing in /dev/shm. Waits poll: busily for `spin_s`, then with short sleeps, longer once idle for a
second; they end on a deadline, on `close()`, or when the writer's process is gone.
"""

from __future__ import annotations

import mmap
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fuserve.process_liveness import pid_alive

MAGIC = 0x66757365_706C616E  # "fuseplan"
HEADER_WORDS = 4  # magic, num_slots, slot_numel, writer pid; the readers' acks and attached flags follow
SLOT_HEADER = 2  # seq, used
SHM_DIR = Path("/dev/shm")
SLEEP_S = 200e-6  # poll interval once the busy spin is over
IDLE_S = 1.0  # waiting longer than this: poll every IDLE_SLEEP_S, and check the writer's process
IDLE_SLEEP_S = 2e-3


class RingClosed(RuntimeError):
    """The ring was closed (the group is shutting down or failed) while a send or receive waited."""


def shm_usable() -> str | None:
    """None when this machine can run the ring, else why not (plan_transport `auto` then takes gloo)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the ring needs x86-64's store and load order, this CPU is {platform.machine()}"
    if not (SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)):
        return f"{SHM_DIR} is not a writable directory"
    return None


class PlanRing:
    """One rank's mapping of the ring. Rank 0 `create`s it and writes; worker r `attach`es and reads
    with reader index r - 1."""

    def __init__(self, path: Path, words: np.ndarray, mapping: mmap.mmap, reader: int | None) -> None:
        self.path = path
        self._map = mapping
        self._words = words
        self.num_slots = int(words[1])
        self.slot_numel = int(words[2])
        slots_words = self.num_slots * (SLOT_HEADER + self.slot_numel)
        self.num_readers = (len(words) - HEADER_WORDS - slots_words) // 2
        self.reader = reader
        self._acks = words[HEADER_WORDS : HEADER_WORDS + self.num_readers]
        self._attached = words[HEADER_WORDS + self.num_readers : HEADER_WORDS + 2 * self.num_readers]
        first = HEADER_WORDS + 2 * self.num_readers
        self._slots = words[first:].reshape(self.num_slots, SLOT_HEADER + self.slot_numel)
        self._next = 1  # the sequence number this end writes or reads next
        self._closed = threading.Event()
        self._check_writer = False  # a reader checks the writer's pid only if it could see it at attach

    @classmethod
    def create(cls, num_readers: int, num_slots: int = 16, slot_numel: int = 4096) -> PlanRing:
        if num_readers < 1 or num_slots < 2 or slot_numel < 1:
            raise ValueError("a plan ring needs >= 1 reader, >= 2 slots and >= 1 word per slot")
        size = 8 * (HEADER_WORDS + 2 * num_readers + num_slots * (SLOT_HEADER + slot_numel))
        path = SHM_DIR / f"fuserve-plans-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # pages now: a full /dev/shm fails here, not with SIGBUS later
            mapping = mmap.mmap(fd, size)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        words = np.frombuffer(mapping, dtype=np.int64)
        words[1:4] = [num_slots, slot_numel, os.getpid()]
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
        ring._check_writer = pid_alive(int(words[3]))  # False: another pid namespace, so never checked
        ring._attached[reader] = 1
        return ring

    def all_attached(self) -> bool:
        """Whether every reader has mapped the ring (then rank 0 can drop its name)."""
        return bool((self._attached == 1).all())

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
            if now - start < IDLE_S:
                time.sleep(SLEEP_S)
                continue
            if self._check_writer and now - last_check > IDLE_S:
                last_check = now
                if not pid_alive(int(self._words[3])):
                    raise RingClosed(f"rank 0 (pid {int(self._words[3])}) is gone")
            time.sleep(IDLE_SLEEP_S)

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
                try:
                    self._wait(
                        lambda r=reusable: int(self._acks.min()) >= r,
                        spin_s,
                        timeout_s,
                        "waiting for a worker to take an earlier plan",
                    )
                except TimeoutError as err:
                    late = [r + 1 for r in range(self.num_readers) if int(self._acks[r]) < reusable]
                    raise TimeoutError(f"{err}: worker rank(s) {late} stopped taking plans") from None
            slot = self._slots[seq % self.num_slots]
            slot[1] = len(chunk)
            slot[SLOT_HEADER : SLOT_HEADER + len(chunk)] = chunk
            slot[0] = seq  # published after the data (x86-64 keeps stores in order)
            self._next += 1

    def lagging_ranks(self) -> list[int]:
        """The worker ranks (reader + 1) that have not yet taken the last chunk written."""
        last = self._next - 1
        return [r + 1 for r in range(self.num_readers) if int(self._acks[r]) < last]

    # ---- a worker -------------------------------------------------------------------------------
    def recv_chunk(self, spin_s: float = 0.0, timeout_s: float | None = None) -> list[int]:
        """The next chunk's words, once rank 0 has written it."""
        assert self.reader is not None, "rank 0 does not read"
        seq = self._next
        slot = self._slots[seq % self.num_slots]
        self._wait(lambda: int(slot[0]) == seq, spin_s, timeout_s, "waiting for the next plan")
        words = slot[SLOT_HEADER : SLOT_HEADER + int(slot[1])].tolist()
        self._acks[self.reader] = seq  # after the copy: only then may rank 0 reuse the slot
        self._next += 1
        return words
