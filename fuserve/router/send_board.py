"""The requests that every router of one deployment on this node has just sent: a board in shared memory.

Behind HAProxy, Serve runs `RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE` router processes on each node,
and HAProxy spreads its routing calls over them. Each `LengthAwareRouter` learns what the others sent
only from the replicas' next reports (~0.5 s later), so in between, four routers place four requests as
if each were alone: measured on two H100s (2026-11-27), 2 of 6 short requests landed beside a long
prompt that another router had just placed, and TTFT p99 at 80% load fell to 0.87x of pow2's.

Each router process writes its sends to its own ring (one writer, no locks) and reads the other rings of
its deployment on this node before it ranks, so every router counts every send of the node as its own
(`length_aware_router`). A record: when, to which replica (a 64-bit key of its id), the work, the prompt
tokens it will compute, its output budget and its prefix keys.

The ring is anonymous memory (`memfd_create`, ~1.2 MB): it goes with its process however that ends, so
a killed router leaves nothing but an empty marker file, `PID-FD.ring`, in the board's folder; the other
routers map the ring through `/proc/PID/fd/FD` and delete markers whose process is gone. Where there is
no memfd (not Linux) there is no board, and each router counts only its own sends, as before.

A reader takes record i of a ring only if the record's own sequence number reads i before and after
it is copied: a record overwritten meanwhile (the ring wrapped, CAPACITY sends later) is skipped.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fuserve.process_liveness import pid_alive

CAPACITY = 2048  # records a ring holds: far more sends than a router makes between two reports
MAX_KEYS = 64  # prefix keys kept per send: routing_policy.prefix_keys gives 56 for 512 blocks
_MAGIC = 0x66757365_72766531  # "fuserve1"
_HEADER = struct.Struct("<QqqqQ")  # magic, capacity, record size, pid, write index
_FIXED = struct.Struct("<qdQqqqq")  # sequence, routed at, replica key, work, prefill, output, n keys
_KEYS = struct.Struct(f"<{MAX_KEYS}q")
_RECORD = _FIXED.size + _KEYS.size
_SEQ = struct.Struct("<q")
RESCAN_S = 0.5  # between two listings of the board's folder (routers started or gone)
BACKLOG_S = 2.0  # of a ring found late, the sends this recent are read: a few report periods


def replica_key(replica_id: str) -> int:
    """A 64-bit key of a replica's id, the same in every process."""
    return int.from_bytes(hashlib.blake2b(replica_id.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class BoardSend:
    replica: int  # replica_key of the replica it went to
    routed_at: float
    work: int
    prefill: int
    output: int
    prefix_keys: tuple[int, ...]
    late: bool = False  # made before this reader found its ring (the reader's admitted counts may hold it)


def boards_base() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def board_folder(cluster: str, app: str, deployment: str) -> Path:
    """The folder the routers of one deployment of one Ray cluster share on this node."""
    digest = hashlib.blake2b(f"{cluster}|{app}|{deployment}".encode(), digest_size=8).hexdigest()
    return boards_base() / f"fuserve-sends-{digest}"


class _Ring:
    """Another router's ring, mapped for reading through its process's descriptor."""

    def __init__(self, marker: Path, backlog_s: float) -> None:
        pid, fd = _marker_ids(marker)
        with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, self.capacity, record, self.pid, end = _HEADER.unpack_from(self.map, 0)
        if magic != _MAGIC or record != _RECORD or self.pid != pid:
            self.map.close()
            raise ValueError(f"{marker} does not name a send ring of this version")
        # found late (it started, or this one did, since the last look): its last backlog_s of sends
        self.next = max(0, end - self.capacity)
        self.found_at = end  # records before it were made before this reader looked: late
        self.not_before = time.time() - backlog_s

    def read_new(self) -> list[BoardSend]:
        end = _HEADER.unpack_from(self.map, 0)[4]
        start = max(self.next, end - self.capacity)
        sends = []
        for i in range(start, end):
            offset = _HEADER.size + (i % self.capacity) * _RECORD
            if _SEQ.unpack_from(self.map, offset)[0] != i:
                continue
            raw = self.map[offset : offset + _RECORD]
            if _SEQ.unpack_from(self.map, offset)[0] != i:  # overwritten while copied
                continue
            seq, at, replica, work, prefill, output, n = _FIXED.unpack_from(raw, 0)
            if i < self.found_at and at < self.not_before:
                continue
            keys = _KEYS.unpack_from(raw, _FIXED.size)[: min(n, MAX_KEYS)]
            sends.append(BoardSend(replica, at, work, prefill, output, tuple(keys), late=i < self.found_at))
        self.next = end
        return sends

    def close(self) -> None:
        self.map.close()


def _marker_ids(marker: Path) -> tuple[int, int]:
    pid, fd = marker.stem.split("-")
    return int(pid), int(fd)


def _writer_alive(marker: Path) -> bool:
    try:
        return pid_alive(_marker_ids(marker)[0])
    except ValueError:  # not a marker of ours: left alone
        return True


def sweep_stale_markers(base: Path, wait_s: float = 0.0) -> None:
    """Deletes the markers of routers that are gone, in every board under `base`, and empty boards;
    waits up to `wait_s` for routers still ending (a cluster that was just shut down)."""
    deadline = time.monotonic() + wait_s
    markers = list(base.glob("fuserve-sends-*/*.ring"))
    while time.monotonic() < deadline and any(_writer_alive(m) for m in markers):
        time.sleep(0.1)
    for marker in markers:
        if not _writer_alive(marker):
            marker.unlink(missing_ok=True)
    for folder in base.glob("fuserve-sends-*"):
        try:
            folder.rmdir()
        except OSError:
            pass


class SendBoard:
    """This process's ring, its marker in `folder`, and the other rings of that folder."""

    def __init__(self, folder: Path, capacity: int = CAPACITY) -> None:
        if not hasattr(os, "memfd_create"):
            raise OSError("no memfd_create on this system")
        self.folder = folder
        self.capacity = capacity
        size = _HEADER.size + capacity * _RECORD
        self._fd = os.memfd_create("fuserve-sends", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        for i in range(capacity):  # no record is valid until written
            _SEQ.pack_into(self._map, _HEADER.size + i * _RECORD, -1)
        self._written = 0
        _HEADER.pack_into(self._map, 0, _MAGIC, capacity, _RECORD, os.getpid(), 0)
        sweep_stale_markers(folder.parent)
        self.marker = folder / f"{os.getpid()}-{self._fd}.ring"
        for attempt in range(3):  # another router's sweep may take the empty folder in between
            folder.mkdir(mode=0o700, exist_ok=True)
            try:
                os.close(os.open(self.marker, os.O_WRONLY | os.O_CREAT, 0o600))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        self._peers: dict[Path, _Ring] = {}
        self._rescan()

    def publish(self, send: BoardSend) -> None:
        i = self._written
        offset = _HEADER.size + (i % self.capacity) * _RECORD
        keys = send.prefix_keys[:MAX_KEYS]
        _SEQ.pack_into(self._map, offset, -1)  # invalid while being rewritten
        _KEYS.pack_into(self._map, offset + _FIXED.size, *keys, *([0] * (MAX_KEYS - len(keys))))
        fields = (send.routed_at, send.replica, send.work, send.prefill, send.output, len(keys))
        _FIXED.pack_into(self._map, offset, -1, *fields)
        _SEQ.pack_into(self._map, offset, i)
        self._written = i + 1
        struct.pack_into("<Q", self._map, _HEADER.size - 8, self._written)

    def read_new(self) -> list[BoardSend]:
        """The other routers' sends published since the last call, oldest first per router; of a ring
        found since, its last BACKLOG_S seconds, marked `late`."""
        sends: list[BoardSend] = []
        for ring in self._peers.values():
            sends += ring.read_new()
        if time.monotonic() - self._scanned > RESCAN_S:
            self._rescan()
        return sends

    def _rescan(self) -> None:
        self._scanned = time.monotonic()
        try:
            present = {p for p in self.folder.glob("*.ring") if p != self.marker}
        except OSError:
            return
        for marker, ring in list(self._peers.items()):
            if marker not in present or not pid_alive(ring.pid):  # read to its end by now
                self._peers.pop(marker).close()
                marker.unlink(missing_ok=True)
        for marker in present - self._peers.keys():
            if not _writer_alive(marker):  # its router ended without taking it
                marker.unlink(missing_ok=True)
                continue
            try:
                self._peers[marker] = _Ring(marker, BACKLOG_S)
            except (OSError, ValueError):  # not ours to read, half made, or gone meanwhile
                continue

    def close(self) -> None:
        """Idempotent: the router's finalizer may call it after an explicit close, and closing the fd
        number twice could close whatever file the process opened under that number meanwhile."""
        if self._fd < 0:
            return
        for ring in self._peers.values():
            ring.close()
        self._peers.clear()
        self.marker.unlink(missing_ok=True)
        self._map.close()
        os.close(self._fd)
        self._fd = -1
        try:
            self.folder.rmdir()  # the last router out takes the folder
        except OSError:
            pass
