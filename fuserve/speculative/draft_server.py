"""The draft side of the channel: a process that answers one round per engine step over ZMQ.

    DraftDeployment replica (Serve) --spawns--> draft server process: its draft runner + ROUTER socket
        bound on tcp://NODE_IP:PORT and ipc://TMP/draft; it reports its DraftAddress back through a pipe
    engine core(s) --DraftRound--> [loop: decode, runner.propose, encode] --DraftReply--> the same peer

Why its own process, not a thread of the replica: the round trip is on the engine's step path (the
budget is well under a millisecond), and in the replica's process the loop would share one GIL with
Serve's event loop, health checks and metrics pushes. The process is spawned (a forked CUDA context
is unusable) and ends when the replica's process goes away (Serve replaced it, or ray.kill), so a
restarted replica never leaves a stale server behind.
"""

from __future__ import annotations

import cProfile
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Protocol

import msgspec
import zmq

from fuserve.configs import FuserveConfig
from fuserve.speculative.draft_messages import (
    DraftAddress,
    DraftRelease,
    DraftReply,
    DraftSeq,
    input_decoder,
)
from fuserve.speculative.frame_socket import FrameSocket
from fuserve.speculative.proposer import ProposeRequest

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fuserve")
POLL_MS = 200  # an idle server checks this often that its replica is still there
# the longest a reply may wait for its engine to read: a send blocks every engine the server serves,
# and an engine that stopped reading (past its channel_timeout_s) has dropped the connection anyway
SEND_TIMEOUT_S = 1.0
# rounds without drafting ahead after it failed, or after a backend that cannot stop for a round (no
# `stoppable_ahead`) was still drafting ahead when a round came
AHEAD_PAUSE_ROUNDS = 16


class DraftBackend(Protocol):
    """What the server drafts with: DraftRunner, FeatureDraftRunner, or anything that answers the same
    way. A backend that offers second-best tokens (FeatureDraftRunner) also has `last_alternatives`:
    per request of its last propose, one beside each draft; the reply carries them."""

    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]: ...

    def release(self, seq_ids: list[str]) -> None: ...


class DraftServer:
    def __init__(
        self,
        backend: DraftBackend,
        host: str = "127.0.0.1",
        ipc_dir: str | None = None,
        spin_s: float = 0.0,
        ahead: bool = False,
    ) -> None:
        """`spin_s`: after each round, how long the server spins for the next before it sleeps
        (speculative.channel_spin_ms; a client on its machine may spin as long for a reply:
        DraftProposer(spin=True), which an engine core does not ask for).
        `ahead`: after each round, draft the next one while the target verifies, where the backend can
        (DraftRunner.draft_ahead, each sequence as deep as its last round; speculative.draft_ahead)."""
        self.backend = backend
        self.ahead = ahead
        self.num_ahead_late = 0  # rounds that came while the server was still drafting ahead
        self._ahead_pause = 0
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port(f"tcp://{host}")
        ipc = unix = None
        self.listener: socket.socket | None = None
        if ipc_dir is not None:
            ipc = f"ipc://{ipc_dir}/draft"
            self.socket.bind(ipc)
            unix = f"{ipc_dir}/draft.sock"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(unix)
            self.listener.listen()
            self.listener.setblocking(False)
        self.spin_s = spin_s
        self.address = DraftAddress(
            f"tcp://{host}:{port}",
            ipc,
            socket.gethostname(),
            uuid.uuid4().hex,
            unix=unix,
            spin_s=spin_s,
            ahead=ahead and hasattr(backend, "draft_ahead"),
        )
        self.connections: dict[int, FrameSocket] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        if self.listener is not None:
            self.poller.register(self.listener.fileno(), zmq.POLLIN)
        self._decoder = input_decoder()
        self._encoder = msgspec.msgpack.Encoder()

    def serve(self, keep_going: Callable[[], bool]) -> None:
        """Answer messages until `keep_going()` turns false (checked at least every POLL_MS)."""
        last_round = 0.0
        while keep_going():
            spinning = time.perf_counter() - last_round < self.spin_s
            if self.serve_ready(self.poller.poll(0 if spinning else POLL_MS)):
                self.draft_ahead()
                last_round = time.perf_counter()

    def draft_ahead(self) -> None:
        """The next round drafted before it is asked for. A round that arrives meanwhile (any message:
        an engine's release comes just before its round) waits for it: a backend that can stop
        (`stoppable_ahead`, as DraftRunner) is told (`stop`) and stops within about two forwards, which
        an engine that overlaps its rounds with plain steps (speculative.draft_overlap) makes routine.
        One that cannot drafts on, making the round wait the whole depth: after that the server skips
        drafting ahead for AHEAD_PAUSE_ROUNDS rounds. Nothing is drafted ahead while a message already
        waits, and a failure costs the ahead work, not the server."""
        draft = getattr(self.backend, "draft_ahead", None)
        if not self.ahead or draft is None:
            return
        if self._ahead_pause > 0:
            self._ahead_pause -= 1
            return
        if self._message_waiting():
            return
        try:
            drafted = draft(stop=self._message_waiting)
        except Exception:
            log.exception("draft server: drafting ahead failed; off for %d rounds", AHEAD_PAUSE_ROUNDS)
            self._ahead_pause = AHEAD_PAUSE_ROUNDS
            return
        if drafted and self._message_waiting():
            self.num_ahead_late += 1
            if not getattr(self.backend, "stoppable_ahead", False):
                self._ahead_pause = AHEAD_PAUSE_ROUNDS

    def _message_waiting(self) -> bool:
        """Whether a message (or a connection) waits: a served connection holds no whole frame after
        `_serve_connection`, so its socket's readiness says it all."""
        return bool(self.poller.poll(0))

    def serve_ready(self, events: list[tuple[object, int]]) -> bool:
        """Answer what `poll` found ready; True if any round was answered."""
        answered = False
        for source, _ in events:
            if source is self.socket:
                frames = self.socket.recv_multipart(copy=False)
                try:
                    reply = self.answer(frames[-1].buffer)
                except Exception:  # a message it cannot read: that message alone is lost
                    log.exception("draft server: a message over ZMQ could not be read")
                    continue
                if reply is not None:
                    self.socket.send_multipart([frames[0], reply], copy=False)
                    answered = True
            elif self.listener is not None and source == self.listener.fileno():
                self._accept()
            else:
                answered |= self._serve_connection(self.connections[source])  # type: ignore[index]
        return answered

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError:  # out of descriptors, or the engine gave up connecting: it will try again
            log.exception("draft server: accepting a connection failed")
            return
        conn = FrameSocket(sock)
        self.connections[conn.fileno()] = conn
        self.poller.register(conn.fileno(), zmq.POLLIN)

    def _serve_connection(self, conn: FrameSocket) -> bool:
        """Answer every whole frame the connection holds. A connection that closed, stopped reading or
        sent what cannot be read is dropped (its engine connects again and resends from start 0); the
        sequences it drafted stay until released or evicted."""
        answered = False
        try:
            while (payload := conn.poll_frame()) is not None:
                reply = self.answer(payload)
                if reply is not None:
                    conn.send(reply, SEND_TIMEOUT_S)
                    answered = True
        except Exception as err:
            if not isinstance(err, ConnectionError):
                log.exception("draft server: dropping an engine's connection")
            self.poller.unregister(conn.fileno())
            del self.connections[conn.fileno()]
            conn.close()
        return answered

    def answer(self, payload: bytes | memoryview) -> bytes | None:
        """A round's reply, encoded; None for a release (which has none)."""
        start = time.perf_counter()
        msg = self._decoder.decode(payload)
        prefix = msg.client_id + "/"
        if isinstance(msg, DraftRelease):
            self.backend.release([prefix + s for s in msg.seq_ids])
            return None
        reqs = [ProposeRequest(prefix + s.seq_id, s.start, s.token_ids, s.k, _features(s)) for s in msg.seqs]
        try:
            drafts = self.backend.propose(reqs)
            reply = DraftReply(
                msg.round_id,
                self.address.instance_id,
                [d if d is not None else [] for d in drafts],
                [i for i, d in enumerate(drafts) if d is None],
                alternatives=_alternatives(self.backend, drafts),
                ahead_hits=getattr(self.backend, "last_ahead_hits", 0),
                ahead_late=self.num_ahead_late,
            )
        except Exception as err:  # the round fails alone; its sequences start over from 0
            log.exception("draft round failed")
            self.backend.release([r.seq_id for r in reqs])
            reply = DraftReply(
                msg.round_id, self.address.instance_id, [[] for _ in reqs], list(range(len(reqs))), repr(err)
            )
        reply.server_s = time.perf_counter() - start
        return self._encoder.encode(reply)

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()
        if self.listener is not None:
            self.listener.close()
        self.socket.close(linger=0)
        self.ctx.term()


def _alternatives(backend: DraftBackend, drafts: list[list[int] | None]) -> list[list[int]]:
    """The backend's second-best tokens of the round just drafted, aligned with `drafts` ([] for a
    sequence it did not hold); [] when it offers none."""
    alternatives = getattr(backend, "last_alternatives", None)
    if alternatives is None or len(alternatives) != len(drafts):
        return []
    return [a if d is not None else [] for a, d in zip(alternatives, drafts, strict=True)]


def _features(seq: DraftSeq) -> torch.Tensor | None:
    """A round's feature rows off the wire ([rows, feature_dim] bf16), None for a draft that reads none."""
    import torch  # the replica's process imports this module too, and needs no torch

    if seq.feature_dim == 0:
        return None
    if not seq.features:
        return torch.empty(0, seq.feature_dim, dtype=torch.bfloat16)
    return torch.frombuffer(bytearray(seq.features), dtype=torch.bfloat16).view(-1, seq.feature_dim)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM's default action ends the process without running `finally` blocks, which left one
    ipc folder in the temp directory per draft server ever stopped."""
    raise SystemExit(0)


def run_draft_server(config_json: str, host: str, parent_pid: int, conn: Connection) -> None:
    """The spawned process's entry point: build the draft, report the address (or the failure)
    through `conn`, serve until the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the replica decides when this ends
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stop() terminates: clean up the ipc folder first
    import torch

    from fuserve.speculative.draft_factory import build_draft_runner

    try:
        config = FuserveConfig.model_validate_json(config_json)
        # on CPU the draft gets the cores its replica reserved, not all of them: spinning OpenMP
        # threads of two processes on the same cores slow both (the target runs beside it)
        torch.set_num_threads(max(1, int(config.speculative.placement.num_cpus)))
        runner = build_draft_runner(config)
    except BaseException as err:
        traceback.print_exc()
        conn.send(f"the draft model failed to load: {type(err).__name__}: {err}")
        return
    ipc_dir = tempfile.mkdtemp(prefix="fuserve-draft-")
    spec = config.speculative
    device = runner.device.type
    server = DraftServer(runner, host, ipc_dir, spec.channel_spin_s(device), spec.draft_ahead_on(device))
    conn.send(msgspec.to_builtins(server.address))
    conn.close()
    # FUSERVE_DRAFT_PROFILE=DIR: the server's Python profile, written to DIR/draft-server-<pid>.prof
    # when it stops (a round's host time beside its GPU time: pstats reads it)
    profile_dir = os.environ.get("FUSERVE_DRAFT_PROFILE")
    profiler = cProfile.Profile() if profile_dir else None
    try:
        if profiler is not None:
            profiler.enable()
        server.serve(lambda: os.getppid() == parent_pid)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"draft-server-{os.getpid()}.prof"))
        server.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


@dataclass
class DraftServerProcess:
    process: multiprocessing.process.BaseProcess
    address: DraftAddress

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout_s)


def start_draft_server(config: FuserveConfig, host: str, timeout_s: float) -> DraftServerProcess:
    """Spawn the draft server and wait until its model is loaded and it listens."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=run_draft_server,
        args=(config.model_dump_json(), host, os.getpid(), theirs),
        name="fuserve-draft",
        daemon=True,
    )
    process.start()
    theirs.close()
    if not ours.poll(timeout_s):
        process.kill()
        raise RuntimeError(f"the draft server did not start within {timeout_s:g} s")
    try:
        answer = ours.recv()
    except EOFError:
        process.join(1)
        answer = f"the draft server process exited with code {process.exitcode}"
    if isinstance(answer, str):
        process.join(5)
        raise RuntimeError(answer + " (the draft replica's log has the traceback)")
    return DraftServerProcess(process, msgspec.convert(answer, DraftAddress))
