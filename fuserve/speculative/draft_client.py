"""The engine core's side of the draft channel: `DraftProposer`, a Proposer over one socket (the
draft's Unix socket on its own machine, ZMQ tcp elsewhere).

    propose(requests)   one DraftRound out, wait for its DraftReply at most `timeout_s`
                        no reply in time / no connection: ProposerUnavailable (the engine drafts
                        nothing this step), and a background thread looks the draft up again
    submit / collect    the same round in two halves, for an engine that runs a plain step rather
                        than wait for drafts (speculative.draft_overlap): collect(wait_s) answers
                        None while the reply has not come
    release(ids)        one DraftRelease out, no reply

Reconnecting: `locate()` answers where a draft replica listens (a Serve handle call: control path,
run on a thread of its own so no engine step waits on it). Once it answers, the next round connects
and sends every sequence from start 0, since a new replica holds nothing (a live one that merely timed
out keeps the KV of the tokens it already had: the runner compares before it recomputes). For that
the proposer keeps a copy of each sequence's tokens, as the rounds have told them, and for a
feature-reading draft (`reads_features`) of its features too (bf16 rows, sent as raw bytes).

Second-best tokens (speculative.second_best): `last_alternatives` holds, after each propose, the
draft's second-best token beside each draft it returned, request for request, so that the engine reads
them as it reads an in-process FeatureDraftRunner's. A round that failed, a sequence the draft did not
hold, or a draft that offers none leaves [] there: the step then verifies the drafts alone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Literal

import msgspec
import torch
import zmq

from fuserve.speculative.draft_messages import (
    DraftAddress,
    DraftRelease,
    DraftReply,
    DraftRound,
    DraftSeq,
    reply_decoder,
)
from fuserve.speculative.feature_store import FeatureRows
from fuserve.speculative.frame_socket import FrameSocket, wait_for_frame
from fuserve.speculative.proposer import ProposeRequest, ProposerUnavailable, feature_rows_begin

log = logging.getLogger("fuserve")


Transport = Literal["auto", "ipc", "tcp"]


def endpoint(address: DraftAddress) -> str:
    """ZMQ's ipc on the draft's own machine (a third of tcp's round trip), tcp elsewhere."""
    if address.ipc and address.hostname == socket.gethostname():
        if os.path.exists(address.ipc.removeprefix("ipc://")):
            return address.ipc
    return address.tcp


def unix_path(address: DraftAddress) -> str | None:
    """The draft's Unix socket where this process can reach it (the same machine), else None."""
    if address.unix and address.hostname == socket.gethostname() and os.path.exists(address.unix):
        return address.unix
    return None


class ZmqLink:
    """A DEALER socket behind FrameSocket's send / recv: tcp across machines, or ZMQ's ipc."""

    def __init__(self, ctx: zmq.Context, url: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def send(self, payload: bytes, timeout_s: float) -> None:
        """Queued for ZMQ's I/O thread at once (`timeout_s` is FrameSocket's), or OSError."""
        try:
            self.sock.send(payload, zmq.NOBLOCK)
        except zmq.Again as err:
            raise OSError("its send queue is full") from err

    def recv(self, timeout_s: float, spin_s: float = 0.0) -> bytes | None:
        """As FrameSocket.recv."""
        return wait_for_frame(self._take, self.sock.poll, timeout_s, spin_s)

    def _take(self) -> bytes | None:
        return self.sock.recv() if self.sock.poll(0) else None

    def close(self) -> None:
        self.sock.close(linger=0)


def connect(
    ctx: zmq.Context, address: DraftAddress, transport: Transport, timeout_s: float
) -> FrameSocket | ZmqLink:
    """`auto`: the draft's Unix socket on its own machine (frame_socket says why), else tcp; `ipc` and
    `tcp`: ZMQ's, for comparison (ipc falls back to tcp on another machine)."""
    path = unix_path(address) if transport == "auto" else None
    if path is not None:
        return FrameSocket.connect(path, timeout_s)
    return ZmqLink(ctx, address.tcp if transport == "tcp" else endpoint(address))


def _wire(features: torch.Tensor | None) -> tuple[bytes, int]:
    """A round's feature rows as DraftSeq carries them: raw bf16 bytes and the row width."""
    if features is None:
        return b"", 0
    rows = features.to(torch.bfloat16).contiguous()
    return rows.view(torch.int16).numpy().tobytes(), rows.shape[1]


class DraftProposer:
    def __init__(
        self,
        locate: Callable[[], DraftAddress],
        timeout_s: float,
        retry_s: float = 1.0,
        transport: Transport = "auto",
        reads_features: bool = False,
        spin: bool = False,
    ) -> None:
        """`locate`: where a draft replica listens now (may block, may raise: retried every
        `retry_s`). `timeout_s`: the longest a round may take (speculative.channel_timeout_s).
        `transport`: see `connect`. `reads_features`: the draft is a feature-reading one (its rounds
        carry the target's features). `spin`: wait for replies spinning as long as the draft's server
        does (its DraftAddress.spin_s) before sleeping. Off in an engine core: a spinning wait holds the
        GIL from the core's IO threads (on a 2-core box another thread's p99 lateness went from 0.15 to
        2.9 ms, for ~0.1 ms a round saved; benchmarks/NOTES.md). The one spin an engine core asks for
        is `collect(spin=True)`'s short wait for a round drafted ahead (0.2-1 ms; draft_overlap)."""
        self.locate = locate
        self.reads_features = reads_features
        self.features: dict[str, FeatureRows] = {}  # a feature draft's rows, as the rounds told them
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.transport = transport
        self.spin = spin
        self.client_id = uuid.uuid4().hex[:12]
        self.tokens: dict[str, list[int]] = {}  # each sequence as the rounds told it
        self.resend: set[str] = set()  # sequences the draft must get from start 0
        self.address: DraftAddress | None = None
        self.num_reconnects = 0
        self.num_ahead_hits = 0  # sequences the draft answered from drafts it made ahead (draft_ahead)
        self.last_ahead_hits = 0  # of the last round (speculation.ReportsAheadHits)
        self.ahead_late = 0  # rounds its server got while still drafting ahead (the server's count)
        # of the last round's seconds, the channel's: the round trip less the server's own time
        # (speculation.ReportsChannelTime; /metrics' fuserve_spec_channel_seconds, adaptive k's costs)
        self.last_channel_s = 0.0
        # per request of the last propose, the second-best token beside each draft it returned
        self.last_alternatives: list[list[int]] = []
        self._ctx = zmq.Context()
        self._link: FrameSocket | ZmqLink | None = None
        self._round = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = reply_decoder()
        self._found: DraftAddress | None = None  # set by the lookup thread
        self._looking = False  # a lookup thread runs and has not set _found yet
        self._spin_s = 0.0  # how long a wait for a reply spins: with `spin`, the draft's on its machine
        self._closed = threading.Event()
        # the submitted round whose reply is not collected: (round id, its requests, sent at, deadline)
        self._pending: tuple[int, list[ProposeRequest], float, float] | None = None
        self._look_up()

    # ---- the Proposer contract -------------------------------------------------------------------
    def propose(self, requests: list[ProposeRequest]) -> list[list[int]]:
        if not requests:
            self.last_alternatives, self.last_ahead_hits = [], 0
            return []
        self.submit(requests)
        drafts = self.collect(self.timeout_s)
        assert drafts is not None  # a whole timeout's wait answers or raises
        return drafts

    # ---- a round at a time, without waiting (speculative.draft_overlap) --------------------------
    def submit(self, requests: list[ProposeRequest]) -> None:
        """Send one round and return at once; `collect` reads its reply. One round is pending at a time:
        submitting another drops the last one's reply, if it comes."""
        self.last_alternatives = [[] for _ in requests]  # what a round that raises leaves
        self.last_ahead_hits = 0
        self._pending = None
        self._remember(requests)
        self._adopt_found()
        if self._link is None:
            raise ProposerUnavailable("the draft replica is not connected yet (looking it up)")
        self._round += 1
        seqs = []
        for r in requests:
            if r.seq_id in self.resend:
                self.resend.discard(r.seq_id)
                tokens = self.tokens[r.seq_id]
                features = None
                if r.features is not None:
                    features = self.features[r.seq_id].get(0, max(len(tokens) - 1, 0))
                seqs.append(DraftSeq(r.seq_id, 0, list(tokens), r.k, *_wire(features)))
            else:
                seqs.append(DraftSeq(r.seq_id, r.start, r.token_ids, r.k, *_wire(r.features)))
        sent = time.perf_counter()
        self._pending = (self._round, requests, sent, time.monotonic() + self.timeout_s)
        try:
            self._link.send(
                self._encoder.encode(DraftRound(self.client_id, self._round, seqs)), self.timeout_s
            )
        except OSError as err:
            self._pending = None
            self._drop(f"a send failed: {err!r}")

    @property
    def drafts_ahead(self) -> bool:
        """The connected draft drafts ahead (its server said so): speculative.draft_overlap's default."""
        return self.address is not None and self.address.ahead

    @property
    def pending(self) -> bool:
        """A round was submitted and its reply not collected yet."""
        return self._pending is not None

    def collect(self, wait_s: float, spin: bool = False) -> list[list[int]] | None:
        """The pending round's drafts, request for request, if its reply comes within `wait_s`; None if
        it has not (the round stays pending). Past the round's `timeout_s`: ProposerUnavailable. `spin`:
        busy-wait the whole `wait_s` (a wait far under the kernel's millisecond poll)."""
        assert self._pending is not None, "collect() without a submitted round"
        if self._link is None:  # dropped since the round went out (a release failed to send)
            self._pending = None
            raise ProposerUnavailable("the draft replica's connection closed with a round pending")
        round_id, requests, sent, deadline = self._pending
        until = min(deadline, time.monotonic() + wait_s)
        reply = self._receive(round_id, until, wait_s if spin else self._spin_s)
        if reply is None:
            if time.monotonic() < deadline:
                return None
            self._pending = None
            self._drop(f"no reply within {self.timeout_s:g} s")
        self._pending = None
        self.last_channel_s = max(0.0, time.perf_counter() - sent - reply.server_s)
        self.last_ahead_hits = reply.ahead_hits
        self.num_ahead_hits += reply.ahead_hits
        self.ahead_late = reply.ahead_late
        if reply.instance_id != self.address.instance_id:  # type: ignore[union-attr]
            self.resend.update(self.tokens)  # another server answered: it holds nothing of ours
            self.address = msgspec.structs.replace(self.address, instance_id=reply.instance_id)  # type: ignore[arg-type]
            return [[] for _ in requests]
        for i in reply.missing:
            self.resend.add(requests[i].seq_id)
        if reply.error:
            log.warning("the draft failed a round: %s", reply.error)
        drafts = [d[: r.k] for d, r in zip(reply.drafts, requests, strict=True)]
        if len(reply.alternatives) == len(requests):  # else the draft offers none
            missing = set(reply.missing)
            self.last_alternatives = [
                [] if i in missing else a[: len(d)]
                for i, (a, d) in enumerate(zip(reply.alternatives, drafts, strict=True))
            ]
        return drafts

    def _remember(self, requests: list[ProposeRequest]) -> None:
        """The copy of each sequence follows every round, connected or not."""
        for r in requests:
            held = self.tokens.setdefault(r.seq_id, [])
            del held[r.start :]
            held.extend(r.token_ids)
            if r.features is not None:
                self.features.setdefault(r.seq_id, FeatureRows()).put(feature_rows_begin(r.start), r.features)

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self.tokens.pop(s, None)
            self.features.pop(s, None)
            self.resend.discard(s)
        if self._link is not None and seq_ids:
            try:
                self._link.send(self._encoder.encode(DraftRelease(self.client_id, seq_ids)), self.timeout_s)
            except OSError as err:  # the stream may hold half a frame: connect again
                self._disconnect(f"a release failed to send: {err!r}")

    # ---- the connection --------------------------------------------------------------------------
    def _receive(self, round_id: int, until: float, spin_s: float) -> DraftReply | None:
        """The round's reply if it comes before `until` (time.monotonic), else None."""
        assert self._link is not None
        while True:
            left_s = until - time.monotonic()
            try:
                payload = self._link.recv(max(left_s, 0.0), spin_s)  # at 0: one look
            except OSError as err:
                self._pending = None
                self._drop(f"the connection closed ({err!r})")
            if payload is None:
                return None
            reply = self._decoder.decode(payload)
            if reply.round_id == round_id:
                return reply  # an older round's late reply is dropped

    def _drop(self, why: str) -> None:
        """Close the socket, look the draft up again, and tell the engine (ProposerUnavailable)."""
        self._disconnect(why)
        raise ProposerUnavailable(f"the draft replica did not answer: {why}")

    def _disconnect(self, why: str) -> None:
        log.warning("draft at %s dropped: %s; drafting resumes once it is found again", self.address, why)
        self._pending = None  # its reply cannot come now
        if self._link is not None:
            self._link.close()
        self._link = None
        self.address = None
        self._look_up()

    def _adopt_found(self) -> None:
        found = self._found
        if found is None:
            return
        self._found = None  # the lookup thread has ended: it sets this once
        if self._link is not None:
            self._link.close()
            self._link = None
        try:
            link = connect(self._ctx, found, self.transport, self.timeout_s)
        except OSError as err:  # it went away since the lookup: look again, not at once
            log.warning("draft at %s unreachable: %s; looking it up again", found, err)
            self._look_up(delay_s=self.retry_s)
            return
        self._link, self.address = link, found
        self._spin_s = found.spin_s if self.spin and found.hostname == socket.gethostname() else 0.0
        self.resend.update(self.tokens)
        self.num_reconnects += 1

    def _look_up(self, delay_s: float = 0.0) -> None:
        """Start a lookup thread unless one is still looking (one that has found, but not yet returned,
        counts as done: a flag, not `is_alive`, says which)."""
        if self._looking:
            return
        self._looking = True
        threading.Thread(target=self._look_up_loop, args=(delay_s,), name="draft-lookup", daemon=True).start()

    def _look_up_loop(self, delay_s: float) -> None:
        self._closed.wait(delay_s)
        while not self._closed.is_set():
            try:
                found = self.locate()
            except Exception as err:
                log.info("draft replica not found yet (%s); retrying in %g s", err, self.retry_s)
                self._closed.wait(self.retry_s)
                continue
            self._looking = False
            self._found = found
            return
        self._looking = False

    def wait_connected(self, timeout_s: float) -> bool:
        """For start-up and tests: until the lookup answered (the next round connects), or timeout."""
        deadline = time.monotonic() + timeout_s
        while self._found is None and self._link is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._found is not None or self._link is not None

    def close(self) -> None:
        self._closed.set()
        if self._link is not None:
            self._link.close()
            self._link = None
        self._ctx.term()
