"""The routers' shared send board (fuserve/router/send_board.py): rings in shared memory, one per router,
read across processes; and two LengthAwareRouters on one board placing as one router would."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_router import FakeReplica, long_hint, make_router, ttft_stats

from fuserve.router import send_board
from fuserve.router.send_board import BoardSend, SendBoard, replica_key


def send(i: int, keys: tuple[int, ...] = ()) -> BoardSend:
    return BoardSend(replica_key(f"r{i % 2}"), 1000.0 + i, 10 * i, 5 * i, 2 * i, keys)


def test_a_router_reads_the_others_sends_not_its_own(tmp_path: Path) -> None:
    a, b = SendBoard(tmp_path / "board"), SendBoard(tmp_path / "board")
    assert b.read_new() == [] and a.read_new() == []
    sent = [send(1, (7, -8, 2**63 - 1)), send(2), send(3, tuple(range(100)))]
    for s in sent:
        a.publish(s)
    got = b.read_new()
    assert got[:2] == sent[:2]
    assert got[2].prefix_keys == tuple(range(send_board.MAX_KEYS))  # the shallowest keys are kept
    assert a.read_new() == [] and b.read_new() == []  # nothing twice, nothing of one's own
    a.close()
    b.close()
    assert not (tmp_path / "board").exists()  # the last one out takes the folder


def test_a_second_close_leaves_a_reused_fd_number_alone(tmp_path: Path) -> None:
    """The router closes its board at shutdown and its finalizer closes it again: the second close must
    not close whatever file took the board's fd number in between."""
    board = SendBoard(tmp_path / "board")
    board.close()
    r, w = os.pipe()  # the lowest free numbers: one of them is likely the board's old fd
    try:
        board.close()
        os.write(w, b"x")  # both ends still open
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_a_router_that_starts_late_reads_the_last_seconds_of_sends_marked_late(tmp_path: Path) -> None:
    a = SendBoard(tmp_path / "board")
    old = BoardSend(1, time.time() - 10 * send_board.BACKLOG_S, 1, 1, 1, ())
    recent = BoardSend(2, time.time(), 2, 2, 2, (5,))
    a.publish(old)
    a.publish(recent)
    b = SendBoard(tmp_path / "board")
    assert b.read_new() == [BoardSend(2, recent.routed_at, 2, 2, 2, (5,), late=True)]
    a.publish(send(3))
    assert b.read_new() == [send(3)]  # found now: not late


def test_sends_the_ring_no_longer_holds_are_skipped(tmp_path: Path) -> None:
    a, b = SendBoard(tmp_path / "b", capacity=4), SendBoard(tmp_path / "b", capacity=4)
    for i in range(10):
        a.publish(send(i))
    assert [s.work for s in b.read_new()] == [60, 70, 80, 90]
    a.publish(send(10))
    assert [s.work for s in b.read_new()] == [100]


def test_another_process_s_sends_are_read_and_its_ring_unlinked_once_it_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(send_board, "RESCAN_S", 0.0)
    folder = tmp_path / "board"
    reader = SendBoard(folder)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, sys
                from pathlib import Path
                from fuserve.router.send_board import BoardSend, SendBoard
                board = SendBoard(Path({str(folder)!r}))
                print("ready", flush=True)
                sys.stdin.readline()
                for i in range(3):
                    board.publish(BoardSend(i, 1.5 * i, 100 + i, 50, 4, (i, i + 1)))
                print("published", flush=True)
                sys.stdin.readline()
                os._exit(0)  # killed: no close, its ring stays behind
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    reader.read_new()
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "published"
    assert [(s.replica, s.work, s.prefix_keys) for s in reader.read_new()] == [
        (0, 100, (0, 1)),
        (1, 101, (1, 2)),
        (2, 102, (2, 3)),
    ]
    child.stdin.write("exit\n")
    child.stdin.flush()
    child.wait(10)
    assert len(list(folder.glob("*.ring"))) == 2  # its memory went with it; its marker file is empty
    reader.read_new()
    assert list(folder.glob("*.ring")) == [reader.marker]


def test_two_routers_on_one_board_place_as_one_router_would(tmp_path: Path) -> None:
    """Router A places a 3,000-token prompt; router B then places short requests. On one board B counts
    A's prefill in that replica's queue and sends every short one to the other; without it (the state of
    several router replicas per node before the board), B splits them between both."""
    now = time.time()

    async def shorts_beside_the_long(board_b: str | None) -> int:
        a_router = make_router(send_board=str(tmp_path / "board"))
        b_router = make_router(send_board=board_b)
        replicas = [FakeReplica("x", ttft_stats(now - 0.01)), FakeReplica("y", ttft_stats(now - 0.01))]
        await b_router.choose_replicas(replicas, long_hint("warm", prompt=4))  # B finds A's ring
        b_router._assignments.clear()
        long_to = (await a_router.choose_replicas(replicas, long_hint("long")))[0][0].name
        shorts = [
            (await b_router.choose_replicas(replicas, long_hint(f"s{i}", prompt=20)))[0][0].name
            for i in range(6)
        ]
        for r in (a_router, b_router):
            if r.board is not None:
                r.board.close()
        return sum(name == long_to for name in shorts)

    assert asyncio.run(shorts_beside_the_long(str(tmp_path / "board"))) == 0
    assert asyncio.run(shorts_beside_the_long(None)) >= 2
