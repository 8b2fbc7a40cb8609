"""A router's view of one replica: its last report, plus what this router sent it since, aged to now.

    replica: routing_report(core stats, scheduler config) -> the dict `record_routing_stats` returns
    router:  view_from_report(id, that dict, now, known prefixes, sent since) -> ReplicaView | None
             PeerEstimate: how many routers send to these replicas (this router's sends vs the
             replicas' admitted counts), so that this router's own sends since a report count for
             the other routers' too

Freshness: a report is up to one polling period (0.25 s) plus the broadcast old. Three things keep
the view current between reports: the replica's work since the report is taken off (its measured
step cost tells how much prefill it did in that time: `ReplicaView.age_s`), every request this
router routed after the report is added to the queue in the engine's order, and completed requests
leave (`LengthAwareRouter.on_request_completed`). A report replaces all three.

Requests in transit: a send also counts until the replica's admitted count covers it
(`unadmitted_sends.py`), however many reports were taken while it was on its way.

Herding: several routers (one per proxy or ingress node) see the same report; each accounts only
for its own sends, so when one replica looks empty all of them fill it at once, K times over. Each
router learns K from the replicas' `num_admitted` counts against its own sends, and counts each of
its sends since the last report K times.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Sequence
from typing import Any

from fuserve.configs import SchedulerConfig
from fuserve.core_messages import CoreStats
from fuserve.router.ttft_model import QueuedSeq, ReplicaView, StepCost

MAX_PEERS = 64.0


def routing_report(stats: CoreStats, scheduler: SchedulerConfig) -> dict[str, Any]:
    """The TTFT model's part of a replica's routing stats (plain JSON-able values)."""
    return {
        "step_cost": [stats.step_base_s, stats.step_seq_s, stats.step_token_s],
        "step_samples": stats.step_cost_samples,
        "running_prefill": stats.running_prefill_tokens,
        "num_decoding": stats.num_decoding,
        "waiting_queue": [list(item) for item in stats.waiting_queue],
        "decode_left": list(stats.decode_left),
        "inflight_prefill": stats.inflight_prefill_tokens,
        "stats_at": stats.taken_at,
        "core_admitted": stats.num_requests_added,  # as of stats_at: what the queue figures include
        "token_budget": scheduler.max_num_batched_tokens,
        "max_num_seqs": scheduler.max_num_seqs,
        "aging_per_s": scheduler.aging_tokens_per_s,
        "fcfs": scheduler.policy == "fcfs",
    }


def covered_until(stats: dict[str, Any]) -> float:
    """Requests routed to the replica before this time are in its report's queue figures: when its
    engine core took them (`timestamp`, when the report last changed, for a replica without it)."""
    return float(stats.get("stats_at") or stats.get("timestamp") or 0.0)


def admitted_by(stats: dict[str, Any]) -> int:
    """The requests the report's queue figures include, ever (`unadmitted_sends`): the engine core's
    count as of `stats_at`; the frontend's (later, so it may count some not in the figures) before it."""
    return int(stats.get("core_admitted", stats.get("num_admitted", 0)))


def view_from_report(
    replica_id: str,
    stats: dict[str, Any],
    now: float,
    known_prefixes: Container[int],
    sent_since: Sequence[QueuedSeq] = (),
) -> ReplicaView | None:
    """None when the report has no step cost (a replica that predates the TTFT model, or none yet)."""
    cost = stats.get("step_cost")
    if not cost:
        return None
    base, seq, token = (float(c) for c in cost)
    default = StepCost()
    step = StepCost(base or default.base_s, seq, token or default.per_token_s)
    taken_at = covered_until(stats)
    age = max(now - taken_at, 0.0) if taken_at else 0.0
    waiting = [QueuedSeq(float(q[0]), int(q[1]), int(q[2]), age) for q in stats.get("waiting_queue", ())]
    waiting.extend(sent_since)
    return ReplicaView(
        replica_id=replica_id,
        cost=step,
        running_prefill=int(stats.get("running_prefill", 0)),
        num_running=int(stats.get("num_running", 0)),
        num_decoding=int(stats.get("num_decoding", 0)),
        waiting=waiting,
        decode_left=[int(x) for x in stats.get("decode_left", ())],
        known_prefixes=known_prefixes,
        token_budget=int(stats.get("token_budget", 2048)),
        max_num_seqs=int(stats.get("max_num_seqs", 128)),
        aging_per_s=float(stats.get("aging_per_s", 200.0)),
        fcfs=bool(stats.get("fcfs", False)),
        age_s=age,
        inflight_prefill=int(stats.get("inflight_prefill", -1)),
        cost_samples=int(stats.get("step_samples", 0)),
    )


class PeerEstimate:
    """K, the number of routers sending to the replicas, as (requests the replicas admitted) / (requests
    this router sent them) over recent reports, smoothed; 1 until enough requests were seen."""

    def __init__(self, smoothing: float = 0.8, min_sent: float = 2.0, max_log: int = 20_000) -> None:
        self.smoothing = smoothing
        self.min_sent = min_sent
        self._sends: dict[str, deque[float]] = {}
        self._last: dict[str, tuple[float, int]] = {}  # replica -> (report time, num_admitted)
        self.max_log = max_log
        self._admitted = 0.0
        self._sent = 0.0

    def on_sent(self, replica_id: str, at: float) -> None:
        log = self._sends.setdefault(replica_id, deque(maxlen=self.max_log))
        log.append(at)

    def on_report(self, replica_id: str, reported_at: float, num_admitted: int) -> None:
        """Call with every report seen; only a new one (a later `reported_at`) counts."""
        last = self._last.get(replica_id)
        if last is not None and reported_at <= last[0]:
            return
        self._last[replica_id] = (reported_at, num_admitted)
        if last is None or num_admitted < last[1]:  # first report, or the replica restarted
            return
        log = self._sends.get(replica_id, ())
        mine = sum(1 for t in log if last[0] < t <= reported_at)
        while log and log[0] <= last[0]:
            log.popleft()  # type: ignore[union-attr]
        s = self.smoothing
        self._admitted = s * self._admitted + (num_admitted - last[1])
        self._sent = s * self._sent + mine

    @property
    def factor(self) -> float:
        if self._sent < self.min_sent:
            return 1.0
        return min(max(self._admitted / self._sent, 1.0), MAX_PEERS)

    def forget(self, alive: Container[str]) -> None:
        for table in (self._sends, self._last):
            for rid in [k for k in table if k not in alive]:
                del table[rid]
