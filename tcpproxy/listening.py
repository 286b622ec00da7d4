"""
Listening sockets, bound early and handed to the reactor later.

Binding is split from listening so that a port that cannot be bound is
found while C{twistd} is still reading its options -- before it writes a
pidfile, forks into the background or starts the reactor -- and can be
reported as one clear line instead of a traceback.  The bound socket is then
adopted by the reactor when the service starts.
"""

from __future__ import annotations

import socket

from twisted.internet.abstract import isIPv6Address
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorSocket

from tcpproxy.config import hostPort

BACKLOG = 1024
"""
Pending connections the kernel may queue per port (capped by the system's
C{somaxconn}); Twisted's default of 50 drops clients under a connect burst.
"""


class ListenError(Exception):
    """
    A port could not be bound; the text names what and why.
    """


def bindTCP(address: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """
    Create a listening TCP socket on C{address}:C{port}.

    @raise OSError: as the kernel refuses it (address in use, permission).
    """
    family = socket.AF_INET6 if isIPv6Address(address) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As Twisted's own Port does: restart at once over old TIME_WAITs.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bindAll(wanted: list[tuple[str, str, int]]) -> list[socket.socket]:
    """
    Bind every C{(owner, address, port)} of C{wanted}, or none of them.

    @param wanted: C{owner} says, for the error message, whose port it is.
    @return: the sockets, in the order of C{wanted}.
    @raise ListenError: naming the owner, address and port that failed, and why.
    """
    bound: list[socket.socket] = []
    for owner, address, port in wanted:
        try:
            bound.append(bindTCP(address, port))
        except OSError as e:
            for sock in bound:
                sock.close()
            where = hostPort(address, port)
            raise ListenError(f"{owner}: cannot listen on {where}: {e.strerror or e}") from None
    return bound


def adoptTCP(reactor: IReactorSocket, sock: socket.socket, factory: IProtocolFactory) -> IListeningPort:
    """
    Start accepting on a socket from L{bindTCP}; the socket passes to the
    reactor (which holds its own duplicate) and is closed here.
    """
    try:
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        sock.close()
