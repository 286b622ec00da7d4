"""
Listening sockets, bound early and handed to the reactor later.

Binding is split from listening so that a port that cannot be bound is
found while C{twistd} is still reading its options -- before it writes a
pidfile, forks into the background or starts the reactor -- and can be
reported as one clear line instead of a traceback.  The bound socket is then
watched by the reactor when the service starts (L{SocketPort}).
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFDSet,
    IReactorSocket,
    IReadDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from tcpproxy.connid import newConnectionId
from tcpproxy.describe import hostPort

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
        # The relay writes whole chunks as they come and must not hold a
        # small reply back waiting for an ACK.  Linux gives this option to
        # every accepted socket: a system call saved per client.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


class ISocketAcceptor(Interface):
    """
    What a L{SocketPort} hands each accepted client to.
    """

    def socketAccepted(sock: socket.socket, address: tuple) -> None:
        """
        A client connected: C{sock} (non-blocking, owned by the callee from
        now) came from C{address}, the peer address as C{accept} gives it.
        """


@implementer(IListeningPort, IReadDescriptor)
class SocketPort:
    """
    Accept clients on a socket from L{bindTCP}, and hand each one, as a bare
    socket, to an L{ISocketAcceptor}.

    Unlike Twisted's own port, no transport or protocol is made here: the
    acceptor hands the socket to the engine (L{tcpproxy.transport.engine}),
    which makes the transport -- the project's own, or Twisted's by
    L{adopting <twisted.internet.interfaces.IReactorSocket.adoptStreamConnection>}
    the socket.

    When C{accept} fails for lack of file descriptors the client would wait
    in the backlog, and the port would be ready again at once, for ever: a
    descriptor kept in reserve is let go to accept that client and close
    it, and the failure is logged -- the recovery Twisted's own port makes.

    @ivar listening: whether the socket is still open.
    """

    log = Logger()
    ACCEPTS = 64
    """
    Clients accepted per turn of the reactor at most, so that a burst of
    them does not starve the connections already open.
    """

    SHED_SUMMARY = 1.0
    """
    Seconds over which clients closed for lack of descriptors are counted
    into one log line.
    """

    def __init__(self, reactor: IReactorFDSet, sock: socket.socket, acceptor: ISocketAcceptor) -> None:
        self._shedCall = None
        self._shedSince = 0
        self._reactor = reactor
        self.socket = sock
        self.acceptor = acceptor
        self.listening = True
        self.reading = False
        self.startReading()

    def startReading(self) -> None:
        if self.listening and not self.reading:
            self.reading = True
            self._reactor.addReader(self)

    def stopReading(self) -> None:
        if self.reading:
            self.reading = False
            self._reactor.removeReader(self)

    # IListeningPort

    def startListening(self) -> None:
        self.startReading()

    def stopListening(self) -> Deferred[None]:
        if self._shedCall is not None and self._shedCall.active():
            self._shedCall.cancel()
        self._shedCall = None
        if self.listening:
            self.stopReading()
            self.listening = False
            self.socket.close()
        return succeed(None)

    def getHost(self) -> IPv4Address | IPv6Address:
        host, port = self.socket.getsockname()[:2]
        if self.socket.family == socket.AF_INET6:
            return IPv6Address("TCP", host, port)
        return IPv4Address("TCP", host, port)

    # IReadDescriptor

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> None:
        # What socket.accept() does, without its two enum conversions per
        # client (a few per cent of a short connection's cost).
        accept = self.socket._accept
        family = int(self.socket.family)
        wrap = socket.socket
        acceptor = self.acceptor
        for _ in range(self.ACCEPTS):
            if not self.reading:
                return  # the proxy is full (AcceptGate): the rest wait in the backlog
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # accept fails so before it looks for a client: shed the
                    # one waiting (if any), and leave the next to the next turn.
                    self._shed(e)
                    return
                # ECONNABORTED and the like: that client is gone, the next may be there.
                continue
            sock = wrap(family, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            try:
                acceptor.socketAccepted(sock, address)
            except Exception:
                self._clientFailed(sock, address)

    def _clientFailed(self, sock: socket.socket, address: tuple) -> None:
        """
        Serving one client raised: log it with the client's address, close
        that client, and go on accepting.

        An exception out of L{doRead} would make the reactor drop this port
        from its readers for good (its socket still in LISTEN: every later
        client would connect and hang), so one client's trouble, whatever
        it is, must end here.  Called from an C{except} block: the failure
        logged is the one being handled.
        """
        self.log.failure(
            "[{connectionId}] port {port}: serving client {client} failed; closed it",
            connectionId=newConnectionId(),
            port=self.getHost().port,
            client=hostPort(str(address[0]), address[1]) if isinstance(address, tuple) else str(address),
        )
        try:
            sock.close()
        except OSError:
            pass

    def _shed(self, error: OSError) -> None:
        """
        Out of descriptors: close the waiting client with the reserved one.

        The first client shed is logged; those shed within the next
        L{SHED_SUMMARY} seconds are counted and logged in one line, so a
        flood of clients does not become a flood of log lines.
        """
        address = _reserve.shed(self.socket)
        if address is None:
            return  # nobody was waiting
        if self._shedCall is not None:
            self._shedSince += 1
            return
        self.log.warn(
            "[{connectionId}] cannot accept a client on port {port}: {code} ({reason}); closed {client}",
            connectionId=newConnectionId(),
            port=self.getHost().port,
            code=errno.errorcode.get(error.errno, error.errno),
            reason=error.strerror,
            client=hostPort(address[0], address[1]),
        )
        self._shedSince = 0
        self._shedCall = self._reactor.callLater(self.SHED_SUMMARY, self._summariseShed)

    def _summariseShed(self) -> None:
        self._shedCall = None
        if self._shedSince:
            self.log.warn(
                "port {port}: {count} more client(s) closed in {seconds:g}s for lack of descriptors",
                port=self.getHost().port if self.listening else None,
                count=self._shedSince,
                seconds=self.SHED_SUMMARY,
            )
            self._shedSince = 0
            self._shedCall = self._reactor.callLater(self.SHED_SUMMARY, self._summariseShed)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped its readers (it is stopping); the service stops us.
        self.reading = False

    def logPrefix(self) -> str:
        return "tcpproxy"


class _Reserve:
    """
    One file descriptor held back, to be let go when C{accept} fails for lack
    of them, so that the waiting client can be accepted and closed.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    def hold(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass

    def shed(self, listener: socket.socket) -> tuple | None:
        """
        Accept and close the client waiting on C{listener}, if any; return
        its address.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            sock, address = listener.accept()
            sock.close()
        except OSError:
            address = None
        self.hold()
        return address


_reserve = _Reserve()
_reserve.hold()


def adoptTCP(reactor: IReactorSocket, sock: socket.socket, factory: IProtocolFactory) -> IListeningPort:
    """
    Start accepting on a socket from L{bindTCP} with Twisted's own port, for
    a protocol factory (the demo backends); the socket passes to the reactor
    (which holds its own duplicate) and is closed here.
    """
    try:
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        sock.close()
