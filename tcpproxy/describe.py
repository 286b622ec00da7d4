"""
How the proxy writes addresses and names in its messages and logs, in one
place, so a target, a listen error and a client's address read alike.
"""

from __future__ import annotations

import json


def hostPort(host: str, port: int) -> str:
    """
    C{host:port} as a user writes it: an IPv6 address in brackets.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describeAddress(address) -> str:
    """
    A peer's address (an L{twisted.internet.interfaces.IAddress}) for the
    log, as targets are written (IPv6 in brackets).
    """
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return hostPort(host, address.port)


def quoted(name: str) -> str:
    """
    An app's name as messages show it: as JSON, like configuration errors.
    """
    return json.dumps(name)
