"""The draft channel without Ray: a real draft server process, a DraftProposer, real ZMQ (ipc and tcp).

- Rounds through the channel (rollback included) draft exactly what the draft runner drafts in-process.
- The server process killed: the next round raises ProposerUnavailable within the channel timeout;
  while no draft is found rounds fail at once (no timeout per step); a new server comes up, the
  lookup finds it, and the proposer resends every sequence from 0, so drafts resume and are right.
- Second-best tokens (speculative.second_best): a reply carries them as its last field, readable by a
  client a version behind and from a server a version behind; the client's `last_alternatives` are
  aligned with its requests, [] where a sequence was missing, the round failed, or the draft offers none.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import torch
from checkpoints import make_checkpoint

from fuserve.configs import FuserveConfig, config_from_dict
from fuserve.speculative.draft_client import DraftProposer, Transport, ZmqLink, endpoint, unix_path
from fuserve.speculative.draft_messages import DraftAddress, DraftReply, reply_decoder
from fuserve.speculative.draft_runner import DraftRunner
from fuserve.speculative.draft_server import DraftServer, start_draft_server
from fuserve.speculative.frame_socket import FrameSocket
from fuserve.speculative.proposer import ProposeRequest, ProposerUnavailable
from fuserve.speculative.speculation import Speculation

VOCAB = 300
TIMEOUT_S = 2.0  # generous: a loaded 2-core box; the fallback's timing is checked against it


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> FuserveConfig:
    folder = tmp_path_factory.mktemp("spec")
    target = make_checkpoint(folder / "target", "llama3", vocab_size=VOCAB, seed=1)
    draft = make_checkpoint(folder / "draft", "llama3", vocab_size=VOCAB, seed=2, num_hidden_layers=1)
    return config_from_dict(
        {
            "model": {"path": str(target), "device": "cpu", "dtype": "float32"},
            "cache": {"block_size": 4, "num_blocks": 128},
            "speculative": {
                "method": "draft",
                "draft": {"path": str(draft), "device": "cpu", "dtype": "float32"},
                "channel_timeout_s": TIMEOUT_S,
            },
        }
    )


@contextlib.contextmanager
def serving(server: DraftServer) -> Iterator[threading.Thread]:
    """The server answering on a thread of this process until the block ends; then it is closed."""
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(lambda: not stop.is_set(),), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(5)
        server.close()


def play(proposer, oracle: DraftRunner, rounds: int, seed: int) -> None:
    """Rounds as an engine would send them: each accepts some drafts, adds a token, sometimes ends a
    sequence; every answer must equal the oracle's (a runner fed the same rounds in-process)."""
    rng = random.Random(seed)
    seqs = {f"q{seed}-{i}": [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 20))] for i in range(4)}
    sent = {s: 0 for s in seqs}
    new = {s: list(t) for s, t in seqs.items()}
    for _ in range(rounds):
        reqs = [ProposeRequest(s, sent[s], new[s], rng.randrange(0, 5)) for s in seqs]
        got = proposer.propose(reqs)
        assert got == oracle.propose(reqs)
        assert proposer.last_alternatives == [[] for _ in reqs]  # an independent draft offers none
        for r, d in zip(reqs, got, strict=True):
            step = d[: rng.randrange(0, len(d) + 1)] + [rng.randrange(VOCAB)]
            sent[r.seq_id], new[r.seq_id] = len(seqs[r.seq_id]), step
            seqs[r.seq_id] = seqs[r.seq_id] + step
    proposer.release(list(seqs))
    oracle.release(list(seqs))


@pytest.mark.parametrize("transport", ["auto", "ipc", "tcp"])
def test_rounds_through_the_channel_equal_the_runner(config: FuserveConfig, transport: Transport) -> None:
    server = start_draft_server(config, "127.0.0.1", timeout_s=120)
    proposer = DraftProposer(lambda: server.address, TIMEOUT_S, transport=transport)
    try:
        assert proposer.wait_connected(10)
        assert endpoint(server.address) == server.address.ipc  # same machine: ipc is offered
        assert unix_path(server.address) == server.address.unix is not None  # and the Unix socket
        assert server.address.spin_s == 0.0  # a CPU draft does not spin
        play(proposer, DraftRunner.from_config(config), rounds=6, seed=0)
        assert isinstance(proposer._link, FrameSocket if transport == "auto" else ZmqLink)
        start = time.perf_counter()
        for _ in range(20):  # empty rounds: the channel alone
            assert proposer.propose([ProposeRequest("idle", 0, [1], 0)]) == [[]]
        assert (time.perf_counter() - start) / 20 < 0.05
        assert proposer.num_reconnects == 1
        # a round's channel time is its round trip less what the server spent drafting (here 0.2-0.4 ms
        # of 7-9 ms rounds: 4 prompts of 19 tokens through a model)
        t0 = time.perf_counter()
        reqs = [ProposeRequest(f"c{i}", 0, list(range(1, 20)), 4) for i in range(4)]
        assert all(len(d) == 4 for d in proposer.propose(reqs))
        round_s = time.perf_counter() - t0
        assert 0.0 < proposer.last_channel_s < round_s / 2
        proposer.release([r.seq_id for r in reqs])
    finally:
        proposer.close()
        server.stop()
    if transport != "tcp":  # stop() terminates the server: its ipc folder goes with it
        ipc_path = server.address.ipc.removeprefix("ipc://")
        assert not os.path.exists(os.path.dirname(ipc_path)), ipc_path


def test_killed_server_falls_back_then_resumes(config: FuserveConfig) -> None:
    current: dict[str, DraftAddress | None] = {"address": None}

    def locate() -> DraftAddress:
        if current["address"] is None:
            raise LookupError("no draft replica")
        return current["address"]

    first = start_draft_server(config, "127.0.0.1", timeout_s=120)
    current["address"] = first.address
    proposer = DraftProposer(locate, TIMEOUT_S, retry_s=0.1)
    oracle = DraftRunner.from_config(config)
    second = None
    try:
        assert proposer.wait_connected(10)
        reqs = [ProposeRequest("a", 0, [5, 6, 7, 8, 9], 3), ProposeRequest("b", 0, [1, 2], 2)]
        assert proposer.propose(reqs) == oracle.propose(reqs)

        current["address"] = None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.join(10)
        t0 = time.monotonic()
        with pytest.raises(ProposerUnavailable):
            proposer.propose([ProposeRequest("a", 5, [4], 3), ProposeRequest("b", 2, [3], 2)])
        assert time.monotonic() - t0 < TIMEOUT_S + 0.5
        assert proposer.last_alternatives == [[], []]
        t0 = time.monotonic()
        with pytest.raises(ProposerUnavailable):  # still looking: no wait this time
            proposer.propose([ProposeRequest("a", 6, [4], 3), ProposeRequest("b", 3, [3], 2)])
        assert time.monotonic() - t0 < 0.05

        second = start_draft_server(config, "127.0.0.1", timeout_s=120)
        current["address"] = second.address
        assert proposer.wait_connected(10)
        # the engine knows nothing of the restart: it sends what follows its last rounds
        reqs = [ProposeRequest("a", 7, [11], 3), ProposeRequest("b", 4, [12], 2)]
        got = proposer.propose(reqs)
        full = [[5, 6, 7, 8, 9, 4, 4, 11], [1, 2, 3, 3, 12]]  # each sequence as the rounds told it
        oracle.release(["a", "b"])
        assert got == oracle.propose([ProposeRequest("a", 0, full[0], 3), ProposeRequest("b", 0, full[1], 2)])
        assert all(len(d) == r.k for d, r in zip(got, reqs, strict=True))
        assert proposer.num_reconnects == 2
    finally:
        proposer.close()
        first.stop()
        if second is not None:
            second.stop()


def test_a_reply_with_alternatives_round_trips_and_keeps_the_old_layout() -> None:
    reply = DraftReply(7, "srv", [[1, 2], [], [3]], [1], "", 0.25, [[11, 12], [], [13]])
    wire = msgspec.msgpack.encode(reply)
    assert reply_decoder().decode(wire) == reply
    # the fields before it keep their places: an older peer's reply is this one less the last element
    fields = [7, "srv", [[1, 2], [], [3]], [1], "", 0.25, [[11, 12], [], [13]], 0, 0]
    assert msgspec.msgpack.decode(wire) == fields
    older = msgspec.msgpack.encode([7, "srv", [[1, 2], [], [3]], [1], "", 0.25])
    assert reply_decoder().decode(older).alternatives == []

    class OlderReply(msgspec.Struct, array_like=True):  # a client a version behind
        round_id: int
        instance_id: str
        drafts: list[list[int]]
        missing: list[int]
        error: str = ""
        server_s: float = 0.0

    assert msgspec.msgpack.decode(wire, type=OlderReply).drafts == [[1, 2], [], [3]]


class Offering:
    """A backend offering second-best tokens, as FeatureDraftRunner does: one more draft than asked
    (the client cuts to k), each draft's alternative 1000 + it; sequences named `gone*` are not held."""

    def __init__(self) -> None:
        self.last_alternatives: list[list[int]] = []
        self.fail = False

    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]:
        self.last_alternatives = []
        if self.fail:
            raise RuntimeError("out of blocks")
        drafts: list[list[int] | None] = []
        for r in requests:
            held = "/gone" not in r.seq_id
            drafts.append([r.token_ids[-1] + j for j in range(r.k + 1)] if held else None)
        self.last_alternatives = [[1000 + t for t in d] if d is not None else [] for d in drafts]
        return drafts

    def release(self, seq_ids: list[str]) -> None:
        pass


def test_client_alternatives_align_with_its_requests() -> None:
    backend = Offering()
    server = DraftServer(backend)
    with serving(server):
        proposer = DraftProposer(lambda: server.address, TIMEOUT_S, transport="tcp")
        try:
            assert proposer.wait_connected(10)
            reqs = [
                ProposeRequest("a", 0, [5, 6], 3),
                ProposeRequest("gone1", 0, [9], 2),
                ProposeRequest("b", 0, [40], 0),
                ProposeRequest("c", 0, [70], 2),
            ]
            got = proposer.propose(reqs)
            assert got == [[6, 7, 8], [], [], [70, 71]]
            assert proposer.last_alternatives == [[1006, 1007, 1008], [], [], [1070, 1071]]
            assert proposer.resend == {"gone1"}
            assert proposer.propose([]) == [] and proposer.last_alternatives == []

            backend.fail = True  # the round fails on the server: no drafts, no alternatives
            assert proposer.propose(reqs[:2]) == [[], []]
            assert proposer.last_alternatives == [[], []]
            backend.fail = False
            got = proposer.propose([ProposeRequest("c", 1, [71], 1)])
            assert got == [[71]] and proposer.last_alternatives == [[1071]]
        finally:
            proposer.close()


def test_engines_on_the_unix_socket_are_served_apart_and_one_leaving_leaves_the_other(tmp_path) -> None:
    server = DraftServer(Offering(), ipc_dir=str(tmp_path), spin_s=0.01)
    with serving(server):
        one = DraftProposer(lambda: server.address, TIMEOUT_S, spin=True)
        two = DraftProposer(lambda: server.address, TIMEOUT_S)
        try:
            assert one.wait_connected(10) and two.wait_connected(10)
            for i in range(3):  # interleaved: each engine's rounds answer its own requests
                assert one.propose([ProposeRequest("a", i, [10 + i], 2)]) == [[10 + i, 11 + i]]
                assert two.propose([ProposeRequest("a", i, [50 + i], 1)]) == [[50 + i]]
            assert isinstance(one._link, FrameSocket) and isinstance(two._link, FrameSocket)
            assert one._spin_s == 0.01  # asked to, on the draft's machine it spins as long as the server
            assert two._spin_s == 0.0  # an engine core's does not: it would hold the GIL from its IO threads
            assert len(server.connections) == 2
            one.close()
            assert two.propose([ProposeRequest("b", 0, [7], 3)]) == [[7, 8, 9]]
            deadline = time.monotonic() + 5
            while len(server.connections) != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(server.connections) == 1  # the closed one was noticed and dropped

            garbage = FrameSocket.connect(server.address.unix, 2.0)  # a frame no version of fuserve sends
            garbage.send(b"\xc1 not msgpack", 1.0)
            with pytest.raises(ConnectionError):  # that connection alone is dropped ...
                garbage.recv(timeout_s=5.0)
            garbage.close()
            assert two.propose([ProposeRequest("b", 1, [8], 2)]) == [[8, 9]]  # ... the server still serves
        finally:
            two.close()


def test_the_channel_spins_by_default_only_beside_a_gpu_draft(config: FuserveConfig) -> None:
    spec = config.speculative
    assert spec.channel_spin_s("cuda") == 0.05 and spec.channel_spin_s("cpu") == 0.0
    set_ms = spec.model_copy(update={"channel_spin_ms": 3.0})
    assert set_ms.channel_spin_s("cuda") == set_ms.channel_spin_s("cpu") == 0.003


def test_a_draft_drafts_ahead_by_default_only_on_a_gpu_of_its_own(config: FuserveConfig) -> None:
    spec = config.speculative
    assert spec.placement.num_gpus == 1.0 and spec.draft_ahead_on("cuda") and not spec.draft_ahead_on("cpu")
    shared = spec.model_copy(update={"placement": spec.placement.model_copy(update={"num_gpus": 0.5})})
    assert not shared.draft_ahead_on("cuda")
    assert shared.model_copy(update={"draft_ahead": True}).draft_ahead_on("cuda")
    assert not spec.model_copy(update={"draft_ahead": False}).draft_ahead_on("cuda")


def test_a_draft_that_stops_reading_or_cannot_be_reached_costs_a_round_at_most(tmp_path) -> None:
    import socket

    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts, never reads
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket file nobody listens on
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    here = socket.gethostname()
    where = {"unix": str(tmp_path / "mute.sock")}

    def locate() -> DraftAddress:
        return DraftAddress("tcp://127.0.0.1:9", None, here, "x", unix=where["unix"])

    proposer = DraftProposer(locate, 0.3, retry_s=0.05)
    try:
        assert proposer.wait_connected(10)
        big = [ProposeRequest("a", 0, [1000] * 1_000_000, 2)]  # ~3 MB: more than the socket buffers
        # the first round connects to the mute draft (found at start); the lookup after it finds one gone
        where["unix"] = str(tmp_path / "stale.sock")
        t0 = time.monotonic()
        with pytest.raises(ProposerUnavailable, match="send failed"):
            proposer.propose(big)
        assert time.monotonic() - t0 < 0.3 + 0.5
        assert proposer.wait_connected(10)
        t0 = time.monotonic()
        with pytest.raises(ProposerUnavailable, match="not connected"):
            proposer.propose([ProposeRequest("a", 0, [1], 2)])
        assert time.monotonic() - t0 < 0.3
        assert proposer._link is None and proposer.address is None
    finally:
        proposer.close()
        mute.close()


class Ahead:
    """A backend that drafts ahead (as DraftRunner.draft_ahead), counting calls, taking `delay_s`;
    with `stops`, it ends early once its `stop` says a round came (as DraftRunner does)."""

    def __init__(self, delay_s: float, stops: bool = False) -> None:
        self.delay_s = delay_s
        self.stops = stops
        self.depths: list[int] = []
        self.last_ahead_hits = 0
        self.stoppable_ahead = stops

    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]:
        self.last_ahead_hits = len(requests)  # say every sequence was answered from ahead
        return [[r.token_ids[-1]] * r.k for r in requests]

    def draft_ahead(self, depth: int | None = None, stop: Callable[[], bool] | None = None) -> int:
        self.depths.append(depth)
        end = time.monotonic() + self.delay_s
        while time.monotonic() < end:
            if self.stops and stop is not None and stop():
                break
            time.sleep(0.001)
        return 1

    def release(self, seq_ids: list[str]) -> None:
        pass


@pytest.mark.parametrize("delay_s", [0.0, 0.3], ids=["in-time", "late"])
def test_the_server_drafts_ahead_after_each_round_and_pauses_when_a_round_waited(delay_s: float) -> None:
    from fuserve.speculative.draft_server import AHEAD_PAUSE_ROUNDS

    backend = Ahead(delay_s)
    server = DraftServer(backend, ahead=True)
    with serving(server):
        proposer = DraftProposer(lambda: server.address, TIMEOUT_S, transport="tcp")
        try:
            assert proposer.wait_connected(10)
            rounds = AHEAD_PAUSE_ROUNDS + 3
            for i in range(
                rounds
            ):  # late: each round sent as soon as the last is answered, into the ahead work
                if delay_s == 0:
                    time.sleep(0.02)  # in time: a verify's worth of time between rounds
                assert proposer.propose([ProposeRequest("a", i, [i], 2), ProposeRequest("b", i, [i], 1)]) == [
                    [i, i],
                    [i],
                ]
            assert proposer.num_ahead_hits == 2 * rounds  # the replies say how many were answered from ahead
            deadline = time.monotonic() + 5
            while len(backend.depths) < (rounds if delay_s == 0 else 2) and time.monotonic() < deadline:
                time.sleep(0.01)
            if delay_s == 0:
                assert backend.depths == [None] * rounds and server.num_ahead_late == proposer.ahead_late == 0
            else:  # the first ahead made round 2 wait: the next AHEAD_PAUSE_ROUNDS rounds went without
                assert backend.depths == [None, None] and server.num_ahead_late == 2
                assert proposer.ahead_late >= 1  # as of the last reply
        finally:
            proposer.close()


def test_a_failure_while_drafting_ahead_costs_the_ahead_work_not_the_server() -> None:
    class Failing(Ahead):
        def draft_ahead(self, depth: int | None = None, stop: Callable[[], bool] | None = None) -> int:
            super().draft_ahead(depth, stop)
            raise RuntimeError("CUDA error: an illegal memory access")

    backend = Failing(0.0)
    server = DraftServer(backend, ahead=True)
    with serving(server) as thread:
        proposer = DraftProposer(lambda: server.address, TIMEOUT_S, transport="tcp")
        try:
            assert proposer.wait_connected(10)
            for i in range(3):
                time.sleep(0.02)
                assert proposer.propose([ProposeRequest("a", i, [i], 2)]) == [[i, i]]
            assert thread.is_alive() and len(backend.depths) == 1  # failed once, then paused
        finally:
            proposer.close()


def test_a_round_that_comes_while_the_server_drafts_ahead_stops_it_without_a_pause() -> None:
    """A backend that stops when told: a round waits ~a forward, not the depth, and the next round is
    drafted ahead again (an overlapping engine sends rounds into the ahead work routinely)."""
    backend = Ahead(0.3, stops=True)
    server = DraftServer(backend, ahead=True)
    with serving(server):
        proposer = DraftProposer(lambda: server.address, TIMEOUT_S, transport="tcp")
        try:
            assert proposer.wait_connected(10)
            rounds = 6
            for i in range(rounds):  # each sent into the ahead work the last one started
                time.sleep(0.005)
                t0 = time.monotonic()
                assert proposer.propose([ProposeRequest("a", i, [i], 2)]) == [[i, i]]
                if i > 0:
                    assert time.monotonic() - t0 < 0.2  # not the 0.3 s the ahead work would take
            deadline = time.monotonic() + 5
            while len(backend.depths) < rounds and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(backend.depths) == rounds  # no pause
            assert server.num_ahead_late == rounds - 1
        finally:
            proposer.close()


class SlowReplies:
    """A real DraftRunner behind the overlap's submit / collect, whose reply never comes within the short
    wait after its round is sent, and has come by the next look: every round is read after a plain step,
    while it runs (the case the timing of a real channel decides; here every time)."""

    def __init__(self, runner: DraftRunner) -> None:
        self.runner = runner
        self.drafts_ahead = True
        self._requests: list[ProposeRequest] | None = None
        self._waited = False
        self.short_waits: list[float] = []  # each round's wait for an answer drafted ahead

    @property
    def pending(self) -> bool:
        return self._requests is not None

    def submit(self, requests: list[ProposeRequest]) -> None:
        self._requests, self._waited = requests, False

    def collect(self, wait_s: float, spin: bool = False) -> list[list[int] | None] | None:
        if wait_s != float("inf") and not self._waited:
            self._waited = True
            self.short_waits.append(wait_s)
            return None
        requests, self._requests = self._requests, None
        return self.runner.propose(requests)

    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]:
        raise AssertionError("an overlapping engine submits and collects")

    def release(self, seq_ids: list[str]) -> None:
        self.runner.release(seq_ids)


def spy_on_propose_behind(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each step planned behind a plain step in flight, from now on: whether it set drafts."""
    behind: list[bool] = []
    propose_behind = Speculation.propose_behind

    def spy(self: Speculation, running: list, step_done: Callable[[], bool]) -> bool:
        behind.append(propose_behind(self, running, step_done))
        return behind[-1]

    monkeypatch.setattr(Speculation, "propose_behind", spy)
    return behind


def _overlap_draft(config: FuserveConfig, draft: str, device: str) -> DraftRunner:
    """The overlap tests' draft on `device`: the target's own copy (its guesses hold) or `other`."""
    from fuserve.configs import CacheConfig, DraftPlacementConfig, KernelConfig

    model = config.speculative.draft
    if draft == "target-copy":
        model = model.model_copy(update={"path": config.model.path})
    return DraftRunner(
        model, DraftPlacementConfig(device=device), CacheConfig(block_size=4, num_blocks=128), KernelConfig()
    )


def _overlap_run(
    config: FuserveConfig, proposer: object, async_scheduling: str = "auto", **spec: object
) -> tuple[list[list[int]], object]:
    from fuserve import LLM, SamplingParams
    from fuserve.speculative.speculation import Speculation

    llm = LLM(
        config_from_dict(
            {
                "model": config.model.model_dump(),
                "cache": config.cache.model_dump(),
                "scheduler": {"async_scheduling": async_scheduling},
            }
        )
    )
    if proposer is not None:
        update = {"num_speculative_tokens": 3, "adaptive": False, **spec}
        llm.engine.speculation = Speculation(config.speculative.model_copy(update=update), proposer)
    prompts = [[5, 17, 42, 9], [100, 3, 3, 3, 3, 3, 3], [250, 1], list(range(30, 52))]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # one at a time (batch 1: where the engine steps plain rather than wait), then all four at once
    outs = [out for p in prompts for out in llm.generate([p], params)] + llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], llm.engine.speculation


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
@pytest.mark.parametrize("draft", ["target-copy", "other"])
def test_an_overlapping_engine_steps_plain_while_the_draft_works_and_writes_the_target_s_tokens(
    config: FuserveConfig, draft: str, async_scheduling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """speculative.draft_overlap with every reply late: at batch 1 each round's drafts come after a
    plain step, and serve the next step when that step wrote their first (the target's own copy as
    draft: nearly always); otherwise they are dropped and a new round goes out. With async scheduling
    the next step is planned while the plain step runs, its drafts following the draft's guess for the
    plain step's token (rejected where that guess was wrong: `other`). A batch of four waits for its
    drafts. Greedy output is the plain run's."""
    want, _ = _overlap_run(config, None)
    slow = SlowReplies(_overlap_draft(config, draft, "cpu"))
    behind = spy_on_propose_behind(monkeypatch)
    redrafted: list[bool] = []  # each plain step read back after those: whether a new round went out
    redraft_missed = Speculation.redraft_missed

    def spy_redraft(self: Speculation, running: list) -> None:
        redraft_missed(self, running)
        redrafted.append(any(self.has_round_pending(s.seq_id) for s in running))

    monkeypatch.setattr(Speculation, "redraft_missed", spy_redraft)
    got, spec = _overlap_run(config, slow, async_scheduling)
    assert got == want
    assert sum(behind) >= 10 if async_scheduling == "on" else not behind
    if async_scheduling == "on" and draft == "other":  # its guesses miss: the verify behind is stale
        assert sum(redrafted) >= 5
    # a round waits for an answer drafted ahead only after a verify that kept every draft (the round the
    # draft guessed); a new sequence's first round, or one after a plain step, cannot be one
    waited = [w for w in slow.short_waits if w > 0]
    assert 0 < len(waited) < len(slow.short_waits) if draft == "target-copy" else not waited
    counters = spec.snapshot()
    assert counters.num_rounds_overlapped >= 20  # a round, a plain step, then (target-copy) the rest verified
    if draft == "target-copy":
        assert counters.num_drafted_across >= 16 and counters.num_accepted >= 32


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_an_overlapping_engine_through_a_draft_server_that_drafts_ahead(
    config: FuserveConfig, async_scheduling: str
) -> None:
    """The real channel and a server drafting ahead (the target's own copy as draft, so its guesses
    hold): draft_overlap unset follows the server's word (it drafts ahead), and the output is the
    plain run's, with the steps after plain steps planned before those are read back or not."""
    want, _ = _overlap_run(config, None)
    runner = _overlap_draft(config, "target-copy", "cpu")
    server = DraftServer(runner, ahead=True)
    with serving(server):
        proposer = DraftProposer(lambda: server.address, TIMEOUT_S)
        try:
            assert proposer.wait_connected(10)
            got, spec = _overlap_run(config, proposer, async_scheduling)
            assert proposer.drafts_ahead and spec._overlapping()
            assert got == want
            counters = spec.stats.snapshot()
            assert counters.num_accepted > 0
            assert counters.num_rounds_overlapped + counters.num_ahead_hits > 0
        finally:
            proposer.close()


class Slow:
    """A backend whose rounds take the next of `delays_s` (a draft drafting a miss)."""

    def __init__(self, delays_s: list[float]) -> None:
        self.delays_s = delays_s

    def propose(self, requests: list[ProposeRequest]) -> list[list[int] | None]:
        time.sleep(self.delays_s.pop(0))
        return [[r.token_ids[-1] + 1] * r.k for r in requests]

    def release(self, seq_ids: list[str]) -> None:
        pass


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_submit_then_collect_reads_a_round_once_it_has_come(transport: Transport, tmp_path) -> None:
    """The overlap's two halves: collect answers None while the reply is on its way (the round stays
    pending), the drafts once it came, even with a wait of 0; a round past its timeout is
    ProposerUnavailable and leaves nothing pending."""
    server = DraftServer(Slow([0.2, 1.0]), ipc_dir=str(tmp_path))
    with serving(server):
        proposer = DraftProposer(lambda: server.address, 0.5, transport=transport)
        try:
            assert proposer.wait_connected(10)
            proposer.submit([ProposeRequest("a", 0, [7], 2)])
            assert proposer.pending and proposer.collect(0.01, spin=True) is None and proposer.pending
            time.sleep(0.4)
            assert proposer.collect(0.0) == [[8, 8]] and not proposer.pending
            proposer.submit([ProposeRequest("a", 1, [9], 1)])
            assert proposer.collect(0.1) is None
            with pytest.raises(ProposerUnavailable):
                proposer.collect(5.0)  # the round's 0.5 s timeout comes first
            assert not proposer.pending
        finally:
            proposer.close()


def test_a_release_that_fails_with_a_round_pending_leaves_the_round_unavailable(tmp_path) -> None:
    """The connection dropped by a release that could not be sent while a round was pending: collecting
    that round says the draft is unavailable (the engine drafts nothing), nothing stays pending."""
    server = DraftServer(Slow([0.2]), ipc_dir=str(tmp_path))
    with serving(server):
        proposer = DraftProposer(lambda: server.address, 2.0)
        try:
            assert proposer.wait_connected(10)
            proposer.submit([ProposeRequest("a", 0, [7], 2)])
            link = proposer._link

            def broken(payload: bytes, timeout_s: float) -> None:
                raise BrokenPipeError("the draft went away")

            link.send = broken  # type: ignore[method-assign]
            proposer.release(["b"])
            assert proposer._link is None and not proposer.pending
            proposer._pending = (1, [ProposeRequest("a", 0, [7], 2)], 0.0, time.monotonic() + 2)  # as if kept
            with pytest.raises(ProposerUnavailable):
                proposer.collect(1.0)
            assert not proposer.pending
        finally:
            proposer.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("draft", ["target-copy", "other"])
def test_gpu_steps_behind_plain_steps_write_the_target_s_tokens(
    config: FuserveConfig, draft: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU (CUDA graphs, async scheduling, the plain step's end seen by its event), an overlapping
    engine plans the verify after each plain step before reading that step back, its drafts following the
    token on the device: greedy output is the plain run's, whether the draft's guesses hold or not."""
    gpu = config.model_copy(update={"model": config.model.model_copy(update={"device": "cuda"})})
    want, _ = _overlap_run(gpu, None, "on")
    runner = _overlap_draft(config, draft, "cuda")
    behind = spy_on_propose_behind(monkeypatch)
    got, spec = _overlap_run(gpu, SlowReplies(runner), "on")
    assert got == want
    assert sum(behind) >= 10  # the reply is in at the first look: every plain step has a verify behind it
    counters = spec.snapshot()
    assert counters.num_drafted_across >= 10 and counters.num_rounds_overlapped >= 20
