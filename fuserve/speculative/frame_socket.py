"""Messages over a Unix stream socket, for the draft channel on one machine: each a 4-byte length and
its bytes, and a wait that can spin before it sleeps.

Why not ZMQ's ipc here: a ZMQ message crosses two threads a side (the caller's and ZMQ's I/O thread),
and each hand-over wakes a thread. Between rounds both ends sit idle for a target's verify step (a few
ms), long enough for their cores to sleep deeply, and a round trip then cost 0.36 ms on a 2-core box
where back to back it cost 0.13 (0.5-0.85 ms inside the engine on an H200 host against 0.07-0.15 ms back
to back on an H100's). A plain Unix socket has no I/O thread: the sender's `send` puts the bytes in the
receiver's buffer, so a receiver that spins on a non-blocking read sees them at once and one that
sleeps is the only thread woken.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable

HEADER = struct.Struct("<I")


class FrameSocket:
    """One end of a connected Unix stream socket, read a frame at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)  # sends wait (up to their timeout); reads choose per call (MSG_DONTWAIT)
        self.sock = sock
        self._buf = bytearray()
        self._poll = select.poll()  # not select.select: it refuses descriptors past 1023
        self._poll.register(sock, select.POLLIN)

    @classmethod
    def connect(cls, path: str, timeout_s: float) -> FrameSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: bytes, timeout_s: float) -> None:
        """Raises OSError: BrokenPipeError and the like when the other end is gone, TimeoutError when it
        has not taken the frame within `timeout_s` (it stopped reading). After a failed send the stream
        may hold part of a frame: close the socket."""
        self.sock.settimeout(timeout_s)
        try:
            self.sock.sendall(HEADER.pack(len(payload)) + payload)
        finally:
            self.sock.settimeout(None)

    def poll_frame(self) -> bytes | None:
        """The next whole frame if one has arrived, else None, without waiting. Raises
        ConnectionError once the other end has closed."""
        frame = self._take()
        if frame is not None:
            return frame
        while True:
            try:
                chunk = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            if not chunk:
                raise ConnectionError("the other end closed the socket")
            self._buf += chunk
            frame = self._take()
            if frame is not None:
                return frame

    def recv(self, timeout_s: float, spin_s: float = 0.0) -> bytes | None:
        """The next frame within `timeout_s` (None if none came; a timeout of 0 still takes one that has
        arrived), spinning for the first `spin_s` of the wait before sleeping in the kernel. Raises
        ConnectionError once the other end closed."""
        return wait_for_frame(self.poll_frame, self._poll.poll, timeout_s, spin_s)

    def close(self) -> None:
        self.sock.close()

    def _take(self) -> bytes | None:
        if len(self._buf) < HEADER.size:
            return None
        (n,) = HEADER.unpack_from(self._buf)
        end = HEADER.size + n
        if len(self._buf) < end:
            return None
        frame = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return frame


def wait_for_frame(
    take: Callable[[], bytes | None], sleep_ms: Callable[[int], object], timeout_s: float, spin_s: float
) -> bytes | None:
    """`take()` until it gives a frame or `timeout_s` has passed (it is asked at least once), asking again
    at once for the first `spin_s` and then after `sleep_ms(ms)`, a wait in the kernel for the socket to
    become readable (for at most the time left)."""
    start = time.perf_counter()
    while True:
        frame = take()
        if frame is not None:
            return frame
        waited = time.perf_counter() - start
        if waited >= timeout_s:
            return None
        if waited >= spin_s:
            sleep_ms(max(1, round((timeout_s - waited) * 1000)))
