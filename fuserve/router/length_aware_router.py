"""The Ray Serve request router for the engine deployment: lowest predicted time to first token.

With a request's prompt and output lengths in hand (an `EngineRequest` or a `RoutingHint`) and
replicas that report their step cost and queue (`replica_view.routing_report`), the replicas are
ranked by predicted TTFT (`ttft_model.rank_by_ttft` on `replica_view.view_from_report`: the report,
plus the requests sent since: this router's, the other routers' of this node through their shared
send board (`send_board.py`), and, for routers elsewhere, this node's counted once per node sending to
them, `PeerEstimate`). `policy="prefix_affinity"` ranks like Ray Serve LLM's PrefixCacheAffinityRouter
instead (`prefix_affinity.py`, a baseline for benchmarks). A replica without those figures gets the
token-count ranking below, which is also what a request without a body gets.

Ray Serve's default router balances *request counts* (power of two choices). LLM requests differ
in cost by orders of magnitude (a 20-token chat turn vs a 4k-token document), so equal counts
are not equal work. This router ranks replicas by outstanding tokens with `routing_policy`:

    load(replica) = its last reported outstanding tokens (record_routing_stats, polled every 0.5 s)
                  + the work this router sent it after that load was measured

Its own accounting starts in `choose_replicas` (so a burst of simultaneous requests does not all
pick the same replica before any is confirmed), is confirmed in `on_request_routed` and ends in
`on_request_completed`. A choice never confirmed stops counting once the replica reports figures
taken after it and the replica's admitted count covers it (`unadmitted_sends`: a request in transit
while the report was taken is not in it), or after `UNCONFIRMED_TTL_S`. Every method
runs on the router's event loop, so no locks.

What the router learns about a request depends on who calls it (the first positional argument):

- an `EngineRequest` (a handle call from a frontend) or a `RoutingHint` (the HAProxy ingress
  router, `cluster/ingress_routing.py`, which calls `choose_replica(hint, _reserve=False)`): the
  full policy, `work_tokens` and `prefix_keys` included. A hint is a pick only: HAProxy, not this
  router, sends the request, so Serve never confirms or completes it; it counts until a report.
- anything else (Serve's Python proxy passes the pickled ASGI request, blind to the body; a call
  with no arguments): replica stats alone, least outstanding tokens first, then the shortest
  queue. Each such request counts as `blind_tokens` of load until its replica's next report, so a
  burst of them is spread over the replicas instead of all landing on the one least loaded at the
  last report.

One Serve detail shapes this file: every handle call made while serving one HTTP request carries
that request's `internal_request_id` (a completions request with several prompts makes several
engine calls), so requests are told apart by their `PendingRequest` object, not by that id.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from fuserve.router.engine_messages import EngineRequest
from fuserve.router.prefix_affinity import AffinityCandidate, rank_by_prefix_affinity
from fuserve.router.replica_view import PeerEstimate, admitted_by, covered_until, view_from_report
from fuserve.router.routing_policy import (
    Candidate,
    PrefixPopularity,
    RecentPrefixes,
    RoutingHint,
    TieBreak,
    rank_replicas,
)
from fuserve.router.routing_timing import RoutingTimer
from fuserve.router.routing_trace import RoutingTrace
from fuserve.router.send_board import BoardSend, SendBoard, board_folder, replica_key
from fuserve.router.ttft_model import QueuedSeq, RequestShape, TtftTie, rank_by_ttft, share_step_costs
from fuserve.router.unadmitted_sends import UnadmittedSends, still_unreported

logger = logging.getLogger(__name__)

UNCONFIRMED_TTL_S = 30.0  # a choice never dispatched (the caller gave up) stops counting after this
BLIND_TOKENS = 256  # the assumed cost of a request whose body the router cannot see (a chat turn)


def request_shape(arg: EngineRequest | RoutingHint) -> RequestShape:
    if isinstance(arg, EngineRequest):
        n = len(arg.prompt_token_ids)
        return RequestShape(n, int(arg.params.max_tokens or 0), arg.prefix_keys, arg.block_size)
    prompt = arg.prompt_tokens or arg.work_tokens
    return RequestShape(prompt, arg.max_tokens, arg.prefix_keys, arg.block_size)


def _first_arg(pending_request: PendingRequest | None) -> object:
    """The routing input, whatever it is: the proxy's pickled ASGI bytes, a hint, nothing."""
    if pending_request is None or not pending_request.args:
        return None
    return pending_request.args[0]


def serving_replicas(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """The replicas whose engine runs, by their last report (a dead engine core's replica says so
    within a report period, long before Serve's health checks replace it); all of them if none does."""
    alive = [r for r in replicas if (r.routing_stats or {}).get("healthy", True)]
    return alive or replicas


@dataclass
class _Assignment:
    request: PendingRequest  # held so that its id(), the key, cannot be reused while this lives
    internal_id: str
    replica_id: str
    work: int
    routed_at: float
    confirmed: bool = False
    prefill: int = 0  # prompt tokens it will compute there (cache hits taken off)
    output: int = 0  # tokens it may generate


@dataclass
class _PeerSend:
    """A request another router of this node sent (send_board.py), counted as if this one had."""

    replica_id: str
    routed_at: float
    work: int
    prefill: int
    output: int


def open_send_board(where: str | None, deployment_id: object) -> SendBoard | None:
    """`where`: "auto" (the node's board of this deployment in this Ray cluster, when in Ray), a
    folder, or None (no board: this router sees only its own sends between reports)."""
    if where is None:
        return None
    try:
        if where != "auto":
            return SendBoard(Path(where))
        import ray

        if not ray.is_initialized():
            return None
        cluster = ray.get_runtime_context().gcs_address
        app, name = getattr(deployment_id, "app_name", ""), getattr(deployment_id, "name", "")
        return SendBoard(board_folder(cluster, app, name))
    except OSError as e:  # no shared memory here: route on this router's own sends, as before
        logger.warning("no send board (%s): this router counts only its own sends between reports", e)
        return None


class _KnownPrefixes:
    """The union of what this router sent a replica and what the replica last reported holding."""

    def __init__(self, mine: RecentPrefixes, reported: frozenset[int]) -> None:
        self.mine, self.reported = mine, reported

    def __contains__(self, key: object) -> bool:
        return key in self.mine or key in self.reported


class LengthAwareRouter(RequestRouter):
    def initialize_state(
        self,
        tie_tokens: int = TieBreak.tokens,
        tie_fraction: float = TieBreak.fraction,
        prefix_capacity: int = 4096,
        blind_tokens: int = BLIND_TOKENS,
        policy: str = "ttft",
        send_board: str | None = "auto",
        imbalanced_threshold: float = float("inf"),
    ) -> None:
        """Serve calls this once, right after construction, with `request_router_kwargs`.
        `imbalanced_threshold`: the prefix-affinity policy's (serve.prefix_affinity_imbalance)."""
        if policy not in ("ttft", "prefix_affinity"):
            raise ValueError(f"unknown routing policy {policy!r}: use 'ttft' or 'prefix_affinity'")
        self.policy = policy
        self.imbalanced_threshold = imbalanced_threshold
        self.ttft_tie = TtftTie()
        self.peers = PeerEstimate()
        self.unadmitted = UnadmittedSends()
        self.timer = RoutingTimer()
        self.trace = RoutingTrace.from_env()
        if self.trace is not None:
            weakref.finalize(self, self.trace.close)
        self._rng = random.Random()
        self._tenant_tokens: dict[str, int] = {}
        self.tie = TieBreak(tie_tokens, tie_fraction)
        self.prefix_capacity = prefix_capacity
        self.blind_tokens = blind_tokens
        self._assignments: dict[int, _Assignment] = {}  # keyed by id(PendingRequest)
        self._mine: dict[str, RecentPrefixes] = {}
        self.popularity = PrefixPopularity()
        self._reported: dict[str, tuple[float, frozenset[int]]] = {}
        self._peer_sends: list[_PeerSend] = []
        self._replica_keys: dict[str, int] = {}
        self.board = open_send_board(send_board, getattr(self, "_deployment_id", None))
        if self.board is not None:
            weakref.finalize(self, self.board.close)

    # ---- load and prefixes per replica ------------------------------------------------------------
    def _load(self, replica: RunningReplica) -> int:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        reported_at = float(stats.get("timestamp", 0.0))  # when the replica's load last changed
        since = sum(a.work for a in self._sends_to(rid) if a.routed_at > reported_at)
        return int(stats.get("outstanding_tokens", 0)) + since

    def _known(self, replica: RunningReplica) -> _KnownPrefixes:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        stamp = float(stats.get("timestamp", 0.0))
        cached = self._reported.get(rid)
        if cached is None or cached[0] != stamp:
            cached = (stamp, frozenset(stats.get("prefix_keys", ())))
            self._reported[rid] = cached
        return _KnownPrefixes(self._prefixes_sent(rid), cached[1])

    def _prefixes_sent(self, replica_id: str) -> RecentPrefixes:
        if replica_id not in self._mine:
            self._mine[replica_id] = RecentPrefixes(self.prefix_capacity)
        return self._mine[replica_id]

    @staticmethod
    def _queue(replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        return int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))

    def _expire_unconfirmed(self, now: float, replicas: list[RunningReplica]) -> None:
        """Drops unconfirmed choices that a newer report of their replica covers (by time and by its
        admitted count), or that are old.

        `_load` already ignores a choice older than its replica's report; dropping it matters for
        picks (`choose_replica(..., _reserve=False)`, never confirmed): without it every pick of the
        last 30 s would stay here and `_load` would sum over all of them on every request. Should
        Serve confirm a choice dropped this way, `on_request_routed` records it again."""
        # covered_until: when the engine took the figures (a choice routed after it is not in them yet)
        reported = {r.replica_id.unique_id: covered_until(r.routing_stats or {}) for r in replicas}
        in_transit = {id(a) for rid in reported for a in self._unreported(rid, reported[rid], now)}

        def done(a: _Assignment | _PeerSend) -> bool:
            covered = a.replica_id in reported and id(a) not in in_transit
            return covered or now - a.routed_at > UNCONFIRMED_TTL_S

        for key in [k for k, a in self._assignments.items() if not a.confirmed and done(a)]:
            del self._assignments[key]
        self._peer_sends = [p for p in self._peer_sends if not done(p)]

    def _sends_to(self, rid: str) -> list[_Assignment | _PeerSend]:
        """The sends to the replica that this router counts: its own and the board's, oldest first."""
        sends: list[_Assignment | _PeerSend] = [a for a in self._assignments.values() if a.replica_id == rid]
        peers = [p for p in self._peer_sends if p.replica_id == rid]
        return sorted(sends + peers, key=lambda a: a.routed_at) if peers else sends

    def _unreported(self, rid: str, covered: float, now: float) -> list[_Assignment | _PeerSend]:
        """The sends to the replica (this router's and, through the board, the node's other routers')
        that its last report does not include, oldest first."""
        sends = self._sends_to(rid)
        return still_unreported(sends, lambda a: a.routed_at, covered, self.unadmitted.count(rid, now))

    def _key(self, rid: str) -> int:
        key = self._replica_keys.get(rid)
        if key is None:
            key = self._replica_keys[rid] = replica_key(rid)
        return key

    def _pull_board(self, replicas: list[RunningReplica]) -> None:
        """Takes in the node's other routers' sends since the last call, before any report is read:
        a send is on the board before its replica can admit it, so the admitted counts never run
        ahead of the sends counted (unadmitted_sends.py)."""
        if self.board is None:
            return
        sends = self.board.read_new()
        if not sends:
            return
        by_key = {self._key(r.replica_id.unique_id): r.replica_id.unique_id for r in replicas}
        for s in sends:
            rid = by_key.get(s.replica)
            if rid is None:
                continue
            self._peer_sends.append(_PeerSend(rid, s.routed_at, s.work, s.prefill, s.output))
            if not s.late:  # a late one may be in admitted counts already seen: it counts by time only
                self.peers.on_sent(rid, s.routed_at)
                self.unadmitted.on_sent(rid, s.routed_at)
            if s.prefix_keys:
                self._prefixes_sent(rid).add(s.prefix_keys)

    def _publish(self, rid: str, a: _Assignment, keys: tuple[int, ...] = ()) -> None:
        if self.board is not None:
            self.board.publish(BoardSend(self._key(rid), a.routed_at, a.work, a.prefill, a.output, keys))

    def _on_reports(self, replicas: list[RunningReplica]) -> None:
        """Feeds the replicas' reports, as this router first sees them, to the counts kept over them."""
        for r in replicas:
            stats = r.routing_stats or {}
            if stats.get("timestamp"):
                rid, at = r.replica_id.unique_id, float(stats["timestamp"])
                self.peers.on_report(rid, at, int(stats.get("num_admitted", 0)))
                self.unadmitted.on_report(rid, at, admitted_by(stats))

    def _rank_blind(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Least outstanding tokens, then the shortest queue; a random order among equals, so that
        several routers (one per proxy) do not all send their first request to the same replica."""
        shuffled = random.sample(replicas, len(replicas))
        return sorted(shuffled, key=lambda r: (self._load(r), self._queue(r)))

    def _sent_since(self, rid: str, stats: dict, now: float) -> list[QueuedSeq]:
        """This router's requests to the replica that its figures do not include yet, each counted
        for every router sending like it (the peer factor)."""
        k = self.peers.factor
        return [
            QueuedSeq(a.work, int(a.prefill * k), a.output, now - a.routed_at, reported=False)
            for a in self._unreported(rid, covered_until(stats), now)
        ]

    def _rank_hinted(
        self, by_id: dict[str, RunningReplica], shape: RequestShape, now: float
    ) -> tuple[list[str] | None, int]:
        """(replica ids best first, the prompt tokens the first will compute), or (None, 0) when a
        replica reports no step cost (then the token-count ranking decides)."""
        if self.policy == "prefix_affinity":
            cands = [
                AffinityCandidate(
                    rid,
                    self._queue(r) + self._sent_count(rid, r),
                    self._known(r),
                    self._tenant_tokens.get(rid, 0),
                )
                for rid, r in by_id.items()
            ]
            ranked = rank_by_prefix_affinity(
                cands,
                shape.prefix_keys,
                shape.prompt_tokens,
                shape.block_size,
                self._rng,
                self.imbalanced_threshold,
            )
            self._tenant_tokens[ranked[0]] = self._tenant_tokens.get(ranked[0], 0) + shape.prompt_tokens
            return ranked, shape.prompt_tokens
        views = []
        for rid, r in by_id.items():
            stats = r.routing_stats or {}
            view = view_from_report(rid, stats, now, self._known(r), self._sent_since(rid, stats, now))
            if view is None:
                return None, 0
            views.append(view)
        with self.timer.ranking():
            views = share_step_costs(views)
            ranked = rank_by_ttft(views, shape, self.ttft_tie, self.peers.factor)
        if self.trace is not None:
            self.trace.record(now, shape, views, ranked, self.peers.factor)
        return [rid for rid, _ in ranked], shape.prompt_tokens - ranked[0][1].cached_tokens

    def _sent_count(self, rid: str, replica: RunningReplica) -> int:
        return len(self._unreported(rid, covered_until(replica.routing_stats or {}), time.time()))

    # ---- the RequestRouter interface ----------------------------------------------------------------
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Timed (`routing_timing`): every request waits for it, and one router replica serves a node."""
        with self.timer.call():
            return self._choose(candidate_replicas, pending_request)

    def _choose(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        candidate_replicas = serving_replicas(candidate_replicas)
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Every candidate is in the ranking: if all are full, Serve must back off before asking
            # again (without this flag it retries at once, in a busy loop, while replicas are full).
            pending_request.routing_context.should_backoff = True
        arg = _first_arg(pending_request)
        now = time.time()
        self._pull_board(candidate_replicas)
        self._on_reports(candidate_replicas)
        self._expire_unconfirmed(now, candidate_replicas)
        if not isinstance(arg, (EngineRequest, RoutingHint)):
            ranked_blind = self._rank_blind(candidate_replicas)
            if pending_request is not None:
                rid = ranked_blind[0].replica_id.unique_id
                a = _Assignment(
                    pending_request, pending_request.metadata.internal_request_id, rid, self.blind_tokens, now
                )
                self._assignments[id(pending_request)] = a
                self._publish(rid, a)
            return [[r] for r in ranked_blind]
        assert pending_request is not None

        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        shape = request_shape(arg)
        shape.shared_tokens = self.popularity.shared_tokens(shape.prefix_keys, shape.block_size)
        self.popularity.add(shape.prefix_keys)
        ranked, prefill = self._rank_hinted(by_id, shape, now)
        if ranked is None:
            candidates = [Candidate(rid, self._load(r), self._known(r)) for rid, r in by_id.items()]
            ranked = rank_replicas(candidates, arg.prefix_keys, self.tie, arg.block_size)
        internal_id = pending_request.metadata.internal_request_id
        a = _Assignment(
            pending_request, internal_id, ranked[0], arg.work_tokens, now, False, prefill, shape.max_tokens
        )
        self._assignments[id(pending_request)] = a
        self._publish(ranked[0], a, tuple(arg.prefix_keys))
        self.peers.on_sent(ranked[0], now)
        self.unadmitted.on_sent(ranked[0], now)
        if isinstance(arg, RoutingHint):  # a final pick (HAProxy sends it there): remember its prefix now
            self._prefixes_sent(ranked[0]).add(arg.prefix_keys)
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: object
    ) -> None:
        arg = _first_arg(pending_request)
        hinted = isinstance(arg, (EngineRequest, RoutingHint))
        rid = replica_id.unique_id
        a = self._assignments.get(id(pending_request))
        if a is None:
            internal_id = pending_request.metadata.internal_request_id
            work = arg.work_tokens if hinted else self.blind_tokens  # type: ignore[union-attr]
            a = _Assignment(pending_request, internal_id, rid, work, time.time())
            self._assignments[id(pending_request)] = a
        # A full replica may have rejected the first choice: record where it really went.
        a.replica_id, a.confirmed = rid, True
        if hinted:
            self._prefixes_sent(rid).add(arg.prefix_keys)  # type: ignore[union-attr]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Ends one of the requests with this id on this replica (equal ids: see the module doc)."""
        rid = replica_id.unique_id
        match = [
            k
            for k, a in self._assignments.items()
            if a.internal_id == internal_request_id and a.replica_id == rid
        ]
        if match:
            confirmed = [k for k in match if self._assignments[k].confirmed]
            del self._assignments[(confirmed or match)[0]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: object = None) -> None:
        """Hands the replica to the very request it was chosen for.

        Serve's own version finds that request by `internal_request_id`, which concurrent calls
        from one HTTP request share, so one of them would never be matched and would spin in the
        routing loop. The metadata object itself is unique per call."""
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is request_metadata and not pr.future.done():
                self._cancel_routing_task_for_pending_request(pr)
                self._record_queue_wait_time(pr)
                pr.future.set_result(replica)
                self._remove_pending_request_from_indices(pr)
                return
        super()._fulfill_next_pending_request(replica, request_metadata)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id.unique_id for r in replicas}
        for table in (self._mine, self._reported, self._tenant_tokens, self._replica_keys):
            for rid in [k for k in table if k not in alive]:
                del table[rid]
        self._peer_sends = [p for p in self._peer_sends if p.replica_id in alive]
        self.peers.forget(alive)
        self.unadmitted.forget(alive)
