"""Step plans from rank 0 to the other tensor-parallel ranks: no Ray call per step.

A Ray actor call costs ~1.5 ms, a decode step ~6 ms, so plans travel as int64 words instead, by one of
two transports: a shared-memory ring when every rank is on rank 0's node (RingPlanSender/Receiver over
plan_ring.py; the default), else broadcasts over the gloo group (PlanSender/Receiver). Over gloo one
message is one or two broadcasts:
    first  [FIRST_NUMEL] int64: header (kind, payload length, one count per plan field) + the
           payload's first part
    rest   [payload length - what fit] int64, only when the plan did not fit in the first
Decode plans of small batches fit in the first broadcast. The payload is the plan's int lists back to
back, in StepPlan's field order; a list of lists (block tables) is its row lengths, then its rows; an
int or bool field is one entry.
Every StepPlan field crosses except `sample_requests`: only rank 0 samples. The field list is read
from the dataclass, so a field added to StepPlan travels without a change here. Block tables cross as
diffs against the previous plan (plan_diff.py).

Kinds: PLAN (run it), HEARTBEAT (nothing to run; keeps the gloo wait of an idle worker under its
timeout), SHUTDOWN (leave the loop). The sender takes a lock per message, so rank 0's heartbeat thread
and its engine thread never interleave halves of two messages.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from fuserve.parallel.plan_diff import TableDiffReceiver, TableDiffSender
from fuserve.parallel.plan_ring import PlanRing
from fuserve.workers.step_plan import StepPlan

# only rank 0 samples; own_last_keys belongs to decode rows, which each rank makes from its plan
NOT_SENT = {"sample_requests", "draft_ids", "own_last_keys"}
SHUTDOWN_WAIT_S = 5.0  # how long the ring's SHUTDOWN message may wait for room before shutdown kills


class Shape(enum.Enum):
    LIST = "list"  # list[int]: its length is its count
    RAGGED = "ragged"  # list[list[int]]: its row count is its count; the row lengths lead its payload
    SCALAR = "scalar"  # int or bool: count 1, one payload entry


def _shape(type_name: str) -> Shape:
    if "list[list[" in type_name:
        return Shape.RAGGED
    return Shape.LIST if type_name.startswith("list[") else Shape.SCALAR


# (field name, shape, type) for every plan field that crosses, in declaration order
PLAN_FIELDS = [
    (f.name, _shape(str(f.type)), bool if str(f.type) == "bool" else int)
    for f in dataclasses.fields(StepPlan)
    if f.name not in NOT_SENT
]
HEADER_NUMEL = 16
FIRST_NUMEL = 512  # 4 KiB: a decode plan of up to ~10 sequences with short block tables fits
assert 2 + len(PLAN_FIELDS) <= HEADER_NUMEL, "StepPlan grew past the broadcast header"


class Kind(enum.IntEnum):
    PLAN = 1
    HEARTBEAT = 2
    SHUTDOWN = 3


def encode_plan(plan: StepPlan) -> tuple[list[int], list[int]]:
    """(counts, payload): one count per field (rows, for a list of lists) says where each list ends."""
    counts: list[int] = []
    payload: list[int] = []
    for name, shape, _ in PLAN_FIELDS:
        value = getattr(plan, name)
        if shape is Shape.SCALAR:
            counts.append(1)
            payload.append(int(value))
            continue
        counts.append(len(value))
        if shape is Shape.RAGGED:
            payload.extend(len(row) for row in value)
            for row in value:
                payload.extend(row)
        else:
            payload.extend(value)
    return counts, payload


def decode_plan(counts: list[int], payload: list[int]) -> StepPlan:
    values: dict[str, Any] = {}
    pos = 0
    for (name, shape, scalar_type), n in zip(PLAN_FIELDS, counts, strict=False):
        if shape is Shape.SCALAR:
            values[name] = scalar_type(payload[pos])
            pos += 1
        elif shape is Shape.RAGGED:
            lengths = payload[pos : pos + n]
            pos += n
            rows = []
            for length in lengths:
                rows.append(payload[pos : pos + length])
                pos += length
            values[name] = rows
        else:
            values[name] = payload[pos : pos + n]
            pos += n
    return StepPlan(**values)


def header(kind: Kind, counts: list[int], payload: list[int]) -> list[int]:
    """A message's first HEADER_NUMEL words: kind, payload length, one count per plan field, zeros."""
    words = [int(kind), len(payload), *counts]
    return words + [0] * (HEADER_NUMEL - len(words))


def read_header(words: list[int]) -> tuple[Kind, int, list[int]]:
    """(kind, payload length, counts) of a message's first words."""
    return Kind(words[0]), words[1], words[2 : 2 + len(PLAN_FIELDS)]


class PlanSender:
    """Rank 0's end over the gloo group. `begin_serving` (the heartbeat) only once every rank is in its
    receive loop: before that the gloo group carries the startup collectives, which a heartbeat would cut
    into."""

    def __init__(self, group: Any, heartbeat_s: float, on_error: Callable[[BaseException], None]) -> None:
        self.group = group
        self.heartbeat_s = heartbeat_s
        self.on_error = on_error
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._diff = TableDiffSender()

    def send(self, plan: StepPlan) -> None:
        counts, payload = encode_plan(self._diff.encode(plan))
        self._send(Kind.PLAN, counts, payload)

    def _send(self, kind: Kind, counts: list[int], payload: list[int]) -> None:
        room = FIRST_NUMEL - HEADER_NUMEL
        first = header(kind, counts, payload) + payload[:room]
        first += [0] * (FIRST_NUMEL - len(first))
        with self._lock:
            dist.broadcast(torch.tensor(first, dtype=torch.int64), src=0, group=self.group)
            if len(payload) > room:
                dist.broadcast(torch.tensor(payload[room:], dtype=torch.int64), src=0, group=self.group)
            self._last_send = time.monotonic()

    def lagging_ranks(self) -> list[int] | None:
        """Unknown over gloo: a broadcast returns on rank 0 once sent, not once received."""
        return None

    def begin_serving(self) -> None:
        """Every rank is in its receive loop: start the heartbeat."""
        self._thread = threading.Thread(target=self._beat, name="fuserve-tp-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 2):
            if time.monotonic() - self._last_send < self.heartbeat_s / 2:
                continue
            try:
                self._send(Kind.HEARTBEAT, [], [])
            except Exception as err:  # a peer is gone: the group's watchdog decides what it means
                self.on_error(err)
                return

    def close(self, send_shutdown: bool) -> None:
        """Stop the heartbeat; with `send_shutdown`, tell the workers to leave their loops."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s)
        if send_shutdown:
            self._send(Kind.SHUTDOWN, [], [])


class PlanReceiver:
    """A worker's end over the gloo group: `recv()` blocks until the next plan; None means shut down."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._first = torch.empty(FIRST_NUMEL, dtype=torch.int64)
        self._diff = TableDiffReceiver()

    def recv(self) -> StepPlan | None:
        room = FIRST_NUMEL - HEADER_NUMEL
        while True:
            dist.broadcast(self._first, src=0, group=self.group)
            first = self._first.tolist()
            kind, length, counts = read_header(first)
            if kind == Kind.HEARTBEAT:
                continue
            if kind == Kind.SHUTDOWN:
                return None
            payload = first[HEADER_NUMEL : HEADER_NUMEL + min(length, room)]
            if length > room:
                rest = torch.empty(length - room, dtype=torch.int64)
                dist.broadcast(rest, src=0, group=self.group)
                payload += rest.tolist()
            return self._diff.apply(decode_plan(counts, payload))


class RingPlanSender:
    """Rank 0's end over a shared-memory ring (plan_ring.py), when every rank is on rank 0's node. No
    heartbeat: a worker polls shared memory, with no collective timeout to keep it from."""

    def __init__(self, ring: PlanRing, timeout_s: float) -> None:
        self.ring = ring
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._diff = TableDiffSender()

    def send(self, plan: StepPlan) -> None:
        counts, payload = encode_plan(self._diff.encode(plan))
        self._send(Kind.PLAN, counts, payload)

    def _send(self, kind: Kind, counts: list[int], payload: list[int]) -> None:
        with self._lock:
            self.ring.send(header(kind, counts, payload) + payload, timeout_s=self.timeout_s)

    def lagging_ranks(self) -> list[int] | None:
        """The worker ranks that have not taken the last plan sent."""
        return self.ring.lagging_ranks()

    def begin_serving(self) -> None:
        """Nothing to start: the ring lost its name once every worker had mapped it."""

    def close(self, send_shutdown: bool) -> None:
        """With `send_shutdown`, tell the workers to leave their loops; then end any wait on the ring."""
        try:
            # a stuck worker (a full ring, or a send blocked on one) must not hold shutdown for long
            if send_shutdown and self._lock.acquire(timeout=SHUTDOWN_WAIT_S):
                try:
                    message = header(Kind.SHUTDOWN, [], [])
                    self.ring.send(message, timeout_s=min(self.timeout_s, SHUTDOWN_WAIT_S))
                finally:
                    self._lock.release()
        finally:
            self.ring.close()
            self.ring.unlink()


class RingPlanReceiver:
    """A worker's end over the ring: `recv()` polls until the next plan; None means shut down. Raises
    RingClosed when rank 0's process is gone."""

    def __init__(self, ring: PlanRing, spin_s: float) -> None:
        self.ring = ring
        self.spin_s = spin_s
        self._diff = TableDiffReceiver()

    def recv(self) -> StepPlan | None:
        while True:
            words = self.ring.recv_chunk(self.spin_s)
            while len(words) < HEADER_NUMEL:
                words += self.ring.recv_chunk(self.spin_s)
            kind, length, counts = read_header(words)
            while len(words) < HEADER_NUMEL + length:
                words += self.ring.recv_chunk(self.spin_s)
            if kind == Kind.SHUTDOWN:
                return None
            if kind == Kind.PLAN:
                return self._diff.apply(decode_plan(counts, words[HEADER_NUMEL : HEADER_NUMEL + length]))
