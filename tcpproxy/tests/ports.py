"""
Free loopback ports for tests and benchmarks that must name a port before
something listens on it (a config file, a child process).

No reactor here: the benchmark imports this before it picks its reactor.
"""

from __future__ import annotations

import itertools
import random
import socket

__all__ = ["freePorts"]


def _ephemeralRange() -> tuple[int, int]:
    """
    The ports the kernel hands out to outgoing connections and to C{bind}
    on port 0, inclusive.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def _portCandidates():
    """
    Every unprivileged port outside the ephemeral range, once each in a
    random order per process, for ever: two test processes running side by
    side rarely try the same port at the same time.
    """
    low, high = _ephemeralRange()
    ports = [p for p in range(10000, 65536) if not low <= p <= high]
    random.shuffle(ports)
    return itertools.cycle(ports)


_candidates = _portCandidates()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def freePorts(count: int) -> list[int]:
    """
    C{count} different loopback ports where nothing listens now.

    They are taken outside the kernel's ephemeral range on purpose: a port
    the kernel picked for C{bind} on port 0 is also one it may give to the
    next outgoing connection (a client, a target dial, a health check)
    before the test gets to listen on it, and the listen then fails with
    "Address already in use".
    """
    ports: list[int] = []
    while len(ports) < count:
        port = next(_candidates)
        if port not in ports and _bindable(port):
            ports.append(port)
    return ports
