"""FrameSocket: whole frames out of a byte stream however the kernel splits or joins them, a wait
that times out, spins or sleeps, and a closed peer reported as ConnectionError."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from fuserve.speculative.frame_socket import HEADER, FrameSocket


def pair() -> tuple[FrameSocket, FrameSocket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FrameSocket(a), FrameSocket(b)


def test_frames_split_and_joined_by_the_stream_come_out_whole() -> None:
    a, b = pair()
    frames = [b"", b"x", bytes(range(256)) * 9, b"last"]
    wire = b"".join(HEADER.pack(len(f)) + f for f in frames)
    got = []
    for cut in (1, 3, 5, 700, len(wire)):  # a header cut in two, a frame cut in many, all at once
        for i in range(0, len(wire), cut):
            a.sock.sendall(wire[i : i + cut])
            while (frame := b.poll_frame()) is not None:
                got.append(frame)
        assert got == frames
        got.clear()
    assert b.poll_frame() is None
    a.close()
    b.close()


def test_a_large_frame_crosses_a_full_socket_buffer() -> None:
    a, b = pair()
    big = bytes(range(251)) * 40_000  # ~10 MB: sendall blocks until the reader drains it
    sender = threading.Thread(target=a.send, args=(big, 10.0))
    sender.start()
    assert b.recv(timeout_s=10.0) == big
    sender.join(5)
    a.close()
    b.close()


@pytest.mark.parametrize("spin_s", [0.0, 0.02, 1.0], ids=["sleep", "spin-then-sleep", "spin"])
def test_recv_waits_for_a_late_frame_and_times_out_without_one(spin_s: float) -> None:
    a, b = pair()
    threading.Timer(0.05, a.send, args=(b"late", 1.0)).start()
    t0 = time.perf_counter()
    assert b.recv(timeout_s=2.0, spin_s=spin_s) == b"late"
    assert 0.04 < time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    assert b.recv(timeout_s=0.1, spin_s=spin_s) is None
    assert 0.09 < time.perf_counter() - t0 < 0.5
    a.close()
    b.close()


def test_a_closed_peer_is_a_connection_error_after_what_it_sent() -> None:
    a, b = pair()
    a.send(b"one", 1.0)
    a.close()
    assert b.recv(timeout_s=1.0) == b"one"
    with pytest.raises(ConnectionError):
        b.recv(timeout_s=1.0)
    with pytest.raises(OSError):
        b.send(b"to nobody", 1.0)
    b.close()


def test_a_send_to_a_peer_that_stopped_reading_times_out() -> None:
    a, b = pair()
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        a.send(bytes(8 << 20), timeout_s=0.2)  # far past the socket's buffers: b never reads
    assert time.perf_counter() - t0 < 2.0
    a.close()
    b.close()
