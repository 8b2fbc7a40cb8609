"""A free TCP port for servers the tests start (importable by name, unlike conftest).

Outside the kernel's ephemeral range (32768-60999 here): a port the kernel hands out for `bind(0)` is
also what it gives the next outgoing connection, and Ray opens many, so such a port could be taken
between this check and the server's own bind (seen: Serve's gRPC proxy "Failed to bind to address
[::]:60279"). Below 20000 are Ray's worker ports (10002-19999 by default); Serve's direct ingress takes
30000-31000 (HTTP) and 40000-41000 (gRPC) behind HAProxy."""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 30000
_rng = random.Random()  # seeded from the OS: test processes started together do not collide


def _bindable(port: int) -> bool:
    """Free on every interface, IPv4 and (where there is one) IPv6, as a server binds it."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as err:
            if family == socket.AF_INET6 and err.errno in (97, 99):  # no IPv6 on this machine
                continue
            return False
    return True


def free_port() -> int:
    for _ in range(200):
        port = _rng.randrange(_LOW, _HIGH)
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {_LOW}-{_HIGH} after 200 tries")
