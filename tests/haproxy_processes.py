"""The HAProxy processes that Serve's HAProxy ingress starts, as the tests see them.

Each app's HAProxy must end with `fuserve serve`; one left running holds the ports the next module's
app wants. Seen twice in full CI runs on 2026-11-27 (not in a module run alone), not yet explained:
conftest.py checks after every module and names the one that left it.
"""

from __future__ import annotations

import time
import warnings

import psutil


def is_haproxy(cmdline: list[str] | None) -> bool:
    return bool(cmdline) and cmdline[0].endswith("/haproxy")


def haproxy_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if is_haproxy(p.info["cmdline"])]


def haproxy_left_after(timeout_s: float) -> list[int]:
    """The HAProxy processes still running after waiting up to `timeout_s` for them to go."""
    deadline, left = time.monotonic() + timeout_s, [p.pid for p in haproxy_processes()]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [p.pid for p in haproxy_processes()]
    return left


def describe(p: psutil.Process) -> str:
    """Enough to tell whose it was: its parent (alive or not) and when it started."""
    try:
        parent = p.parent()
        owner = f"parent {parent.pid} {parent.name()}" if parent else "no parent"
        started = time.strftime("%H:%M:%S", time.localtime(p.create_time()))
        return f"pid {p.pid} ({owner}, started {started}, {' '.join(p.cmdline()[:6])})"
    except psutil.Error:
        return f"pid {p.pid} (gone while described)"


def end_haproxy(why: str) -> None:
    """Ends every HAProxy still running, with a warning that says `why` and which processes."""
    for p in haproxy_processes():
        warnings.warn(f"{why}: {describe(p)}; ended", stacklevel=2)
        try:
            p.kill()
            p.wait(10)
        except psutil.Error:
            pass
