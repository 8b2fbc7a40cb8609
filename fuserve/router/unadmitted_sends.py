"""How many of this router's sends a replica has not admitted yet: counted from the admitted count.

A request reaches its replica's engine some time after it is routed (HAProxy, the replica's event
loop, the frontend-to-core message). Covering a send by time alone (`replica_view.covered_until`:
drop it once a report taken after its routing time arrives) drops every send still in transit when
that report was taken: the replica looks emptier than it is, and the next requests go there.

The replica's report carries how many requests its engine core has taken in (`core_admitted`,
the same moment as its queue figures). Per replica, with A = that count and S = this router's
sends to it when the report is first seen, A - S = (admissions from elsewhere) - (this router's
sends not admitted by then) is at most the admissions from elsewhere, which never decrease. So its
running maximum G over the reports seen is at most the admissions from elsewhere at the last one,
and

    unadmitted = G - (A_last - S_now)

is at most this router's sends that the last report does not include: never an over-count (exact
with one router once any report found all sends admitted). The router counts that many of its
latest sends in the replica's queue, besides those routed after the report was taken.

A send that never arrives (refused with a 429, dropped by HAProxy, sent elsewhere on a retry)
would count for ever; one counted for longer than `ttl_s` is taken off G for good, which keeps the
estimate an under-count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Container, Sequence
from typing import TypeVar

T = TypeVar("T")

TRANSIT_TTL_S = 10.0  # a send not admitted after this long never will be (HAProxy waits 5 s for a route)


class UnadmittedSends:
    def __init__(self, ttl_s: float = TRANSIT_TTL_S, max_log: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_log = max_log
        self._sent: dict[str, int] = {}  # replica -> this router's sends to it, ever
        self._times: dict[str, deque[float]] = {}  # replica -> the latest sends' times
        self._gap: dict[str, int] = {}  # replica -> G, the running max of (admitted - sent when seen)
        self._last: dict[str, tuple[float, int]] = {}  # replica -> (report time, admitted)

    def on_sent(self, replica_id: str, at: float) -> None:
        self._sent[replica_id] = self._sent.get(replica_id, 0) + 1
        log = self._times.get(replica_id)
        if log is None:
            log = self._times[replica_id] = deque(maxlen=self.max_log)
        log.append(at)

    def on_report(self, replica_id: str, reported_at: float, admitted: int) -> None:
        """Call with every report as it is seen; only a newer one (a later `reported_at`) counts. A
        count that went down is a restarted replica: what was sent before is gone with it."""
        last = self._last.get(replica_id)
        if last is not None and reported_at <= last[0]:
            return
        gap = admitted - self._sent.get(replica_id, 0)
        if last is None or admitted < last[1]:
            self._gap[replica_id] = gap
        else:
            self._gap[replica_id] = max(self._gap[replica_id], gap)
        self._last[replica_id] = (reported_at, admitted)

    def count(self, replica_id: str, now: float) -> int:
        """This router's latest sends to the replica that its last report does not include (at most)."""
        last = self._last.get(replica_id)
        if last is None:
            return 0  # no report yet: the time-based covering counts every send
        n = self._gap[replica_id] - (last[1] - self._sent.get(replica_id, 0))
        log = self._times.get(replica_id, ())
        n = max(0, min(n, len(log)))
        while n and log[-n] < now - self.ttl_s:  # the oldest counted is lost: never count it again
            self._gap[replica_id] -= 1
            n -= 1
        return n

    def forget(self, alive: Container[str]) -> None:
        for table in (self._sent, self._times, self._gap, self._last):
            for rid in [k for k in table if k not in alive]:
                del table[rid]


def still_unreported(
    sends: Sequence[T], routed_at: Callable[[T], float], covered: float, unadmitted: int
) -> list[T]:
    """The sends (to one replica, oldest first) that its report does not include: the last `unadmitted`
    of them, and any routed after the report was taken (`covered`, replica_view.covered_until)."""
    first_counted = len(sends) - unadmitted
    return [s for i, s in enumerate(sends) if i >= first_counted or routed_at(s) > covered]
