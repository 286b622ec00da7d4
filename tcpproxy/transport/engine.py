"""
Engines: what serves an accepted socket, and the reactor that client
endpoints dial through.

The relay, TLS and the dialer speak only Twisted's interfaces; an engine
decides which transports they run on:

  - L{FastEngine} (Linux): the project's own L{SocketTransport} on an epoll
    set of its own (L{Poller}), both for clients (L{FastEngine.adopt}) and
    for targets: it provides the L{IReactorTCP} that
    L{twisted.internet.endpoints.TCP4ClientEndpoint} and its kin call, so a
    dial through an endpoint gets a fast transport too.
  - L{TwistedEngine}: Twisted's own TCP transports, through the reactor
    (other platforms, or C{--engine twisted}); the same protocols run on it.

Both resolve host names with L{NameResolver} (no thread per lookup).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sys
from typing import NamedTuple

from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConnector,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from tcpproxy.connid import newConnectionId
from tcpproxy.deadlines import Deadlines
from tcpproxy.describe import hostPort
from tcpproxy.resolve import NameResolver
from tcpproxy.transport.poller import AVAILABLE, GONE, WRITE, Poller
from tcpproxy.transport.tcp import IClosedListener, SocketTransport, peerAddress


class IEngine(Interface):
    """
    Where connections run.
    """

    name = Attribute('C{"fast"} or C{"twisted"}: which engine, for the log.')
    description = Attribute("Which engine, in a few words for the log.")
    reactor = Attribute(
        "What client endpoints are given: an L{IReactorTCP}, L{IReactorTime} and "
        "L{IReactorPluggableNameResolver}."
    )

    def start() -> None:
        """
        Start serving (before the first L{adopt}).
        """

    def stop() -> None:
        """
        Stop, once no connection is left.
        """

    def adopt(sock: socket.socket, address: tuple, factory: IProtocolFactory, host=None) -> None:
        """
        Serve an accepted, non-blocking socket with a protocol of
        C{factory}'s; the socket is the engine's from now on.

        @param address: the peer address as C{accept} gave it.
        @param host: the listening port's address, if known (a system call
            saved when the protocol asks for it).
        """


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class _EngineReactor:
    """
    The reactor's time and TCP, and a resolver of our own.
    """

    def __init__(self, reactor, nameResolver=None) -> None:
        self._reactor = reactor
        self.nameResolver = nameResolver if nameResolver is not None else NameResolver(reactor=reactor)
        # The reactor's own clock, not a method that calls it: asked a few
        # times per connection (dial times, deadlines).
        self.seconds = reactor.seconds

    def installNameResolver(self, resolver):
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def callLater(self, delay, callable, *args, **kw):
        return self._reactor.callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self):
        return self._reactor.getDelayedCalls()

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._reactor.listenTCP(port, factory, backlog, interface)

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        return self._reactor.connectTCP(host, port, factory, timeout, bindAddress)


@implementer(IEngine)
class TwistedEngine(_EngineReactor):
    """
    Twisted's own TCP transports, from the reactor.
    """

    name = "twisted"
    description = "Twisted's own TCP transports (TCPPROXY_ENGINE=twisted, or no epoll here)"

    @property
    def reactor(self):
        return self

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    log = Logger()

    def adopt(self, sock: socket.socket, address: tuple, factory: IProtocolFactory, host=None) -> None:
        try:
            self._reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
        except OSError as e:
            # Adopting duplicates the socket: out of descriptors, that fails
            # where accept did not.  Any other error: the client is gone.
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.log.warn(
                    "[{connectionId}] cannot serve client {client}: {code} ({reason}); closed it",
                    connectionId=newConnectionId(),
                    client=hostPort(str(address[0]), address[1]),
                    code=errno.errorcode.get(e.errno, e.errno),
                    reason=e.strerror,
                )
        finally:
            sock.close()


@implementer(IEngine)
class FastEngine(_EngineReactor):
    """
    The project's own transports, on an epoll set of its own.

    @ivar poller: the L{Poller} while started, else C{None}.
    @ivar deadlines: the connect deadlines of the dials under way.
    """

    name = "fast"
    description = "the fast engine (the project's own transports on epoll, splice for bulk)"

    def __init__(self, reactor, nameResolver=None) -> None:
        _EngineReactor.__init__(self, reactor, nameResolver)
        self.poller: Poller | None = None
        self.deadlines = Deadlines(reactor)

    @property
    def reactor(self):
        return self

    def start(self) -> None:
        if self.poller is None:
            self.poller = Poller(self._reactor)

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.close()
            self.poller = None

    def adopt(self, sock: socket.socket, address: tuple, factory: IProtocolFactory, host=None) -> None:
        # The client's IP address as one string for all its connections
        # (interned; freed with the last of them): the transport and the
        # relay keep it for the life of each, 58 bytes more per idle
        # connection where the same clients come again and again.
        address = (sys.intern(address[0]), address[1])
        protocol = factory.buildProtocol(peerAddress(address))
        if protocol is None:
            sock.close()
            return
        # TCP_NODELAY is the listening socket's, inherited (see bindTCP).
        SocketTransport(self.poller, sock, protocol, address, host, noDelay=True).startReading()

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None) -> IConnector:
        """
        Dial C{host} (an IP address: endpoints resolve names before they
        get here) on the engine's epoll set.
        """
        connector = Connector(self, host, port, factory, timeout, bindAddress)
        connector.connect()
        return connector


@functools.lru_cache(maxsize=4096)
def _family(host: str) -> int | None:
    """
    The address family of an IP address (C{None} for anything else),
    remembered: the same few targets are dialled again and again.
    """
    if isIPv6Address(host):
        return socket.AF_INET6
    if isIPAddress(host):
        return socket.AF_INET
    return None


class _Dial(NamedTuple):
    """
    What a dial is asked for: its target's address (as Twisted writes it),
    the connect timeout (seconds; 0 or C{None} for none) and the local
    address to bind, if any.
    """

    destination: IPv4Address | IPv6Address
    timeout: float | None
    bindAddress: tuple | None


@functools.lru_cache(maxsize=4096)
def _dial(host: str, port: int, timeout: float | None, bindAddress: tuple | None) -> _Dial:
    """
    A dial's L{_Dial}, made once: the same few targets are dialled again and
    again with the same settings, and a connector keeps it for the life of
    the connection it makes (an address object less to make for every
    connection, and one slot of the connector's, not four).
    """
    kind = IPv6Address if _family(host) == socket.AF_INET6 else IPv4Address
    return _Dial(kind("TCP", host, port), timeout, bindAddress)


@implementer(IConnector, IClosedListener)
class Connector:
    """
    One non-blocking connect, as Twisted's client connectors report it to
    their factory: C{startedConnecting}, then C{buildProtocol} or
    C{clientConnectionFailed}, and C{clientConnectionLost} at the end.
    """

    # Kept for the life of the connection it makes (its transport tells it
    # of the end, and asks it for the peer's address): each slot is 8 bytes
    # per idle relayed connection.
    __slots__ = (
        "_engine",
        "_dial",
        "factory",
        "_connection",
        "state",
    )

    def __init__(self, engine: FastEngine, host: str, port: int, factory, timeout, bindAddress) -> None:
        self._engine = engine
        self._dial = _dial(host, port, timeout, bindAddress)
        self.factory = factory
        # The socket while connecting, then the transport while connected.
        self._connection: socket.socket | SocketTransport | None = None
        self.state = "disconnected"

    @property
    def transport(self) -> SocketTransport | None:
        """
        The connection made, while it is open.
        """
        return self._connection if self.state == "connected" else None

    def getDestination(self) -> IPv4Address | IPv6Address:
        return self._dial.destination

    def connect(self) -> None:
        self.state = "connecting"
        self.factory.doStart()
        self.factory.startedConnecting(self)
        if self.state != "connecting":
            return  # stopped at once
        dial = self._dial
        host = dial.destination.host
        family = _family(host)
        if family is None:
            self._failed(error.DNSLookupError(f"{host} is not an IP address"))
            return
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self._failed(error.ConnectBindError(e.errno, e.strerror))
            return
        try:
            if dial.bindAddress is not None:
                sock.bind(dial.bindAddress)
            code = sock.connect_ex((host, dial.destination.port))
        except OSError as e:
            sock.close()
            self._failed(error.ConnectBindError(e.errno, e.strerror))
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(error.getConnectError((code, os.strerror(code))))
            return
        self._connection = sock
        self._engine.poller.register(sock.fileno(), WRITE, self._ready)
        if dial.timeout:
            self._engine.deadlines.add(self, dial.timeout)

    def _ready(self, events: int) -> None:
        sock = self._connection
        # Writable alone is connected; with error or hang-up, ask which error.
        code = 0 if events == WRITE else sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not code and not events & (WRITE | GONE):
            return  # nothing happened yet
        if code or not events & WRITE:
            code = code or errno.ECONNREFUSED
            self._abandon()
            self._failed(error.getConnectError((code, os.strerror(code))))
            return
        self._stopTimer()
        self._connection = None
        self.state = "connected"
        protocol = self.factory.buildProtocol(self._dial.destination)
        if protocol is None:
            self._engine.poller.forget(sock.fileno())
            sock.close()
            self.state = "disconnected"
            self.factory.doStop()
            return
        transport = self._connection = SocketTransport(
            self._engine.poller, sock, protocol, None, connector=self, watched=WRITE
        )
        transport.startReading()

    def transportClosed(self, reason: Failure) -> None:
        """
        The connection made is gone (L{IClosedListener}): tell the factory.
        """
        self.state = "disconnected"
        self._connection = None
        self.factory.clientConnectionLost(self, reason)
        self.factory.doStop()

    def timedOut(self) -> None:
        """
        No answer within C{timeout} (called by the engine's L{Deadlines}).
        """
        self._abandon(timer=False)
        self._failed(error.TimeoutError())

    def _stopTimer(self) -> None:
        timeout = self._dial.timeout
        if timeout:
            self._engine.deadlines.remove(self, timeout)

    def _abandon(self, timer: bool = True) -> None:
        if timer:
            self._stopTimer()
        sock, self._connection = self._connection, None
        if sock is not None:
            self._engine.poller.forget(sock.fileno())
            sock.close()

    def _failed(self, reason: Exception) -> None:
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, Failure(reason))
        self.factory.doStop()

    def stopConnecting(self) -> None:
        """
        Abandon the attempt (a cancelled endpoint connect).
        """
        if self.state != "connecting":
            raise error.NotConnectingError("not connecting")
        self._abandon()
        self._failed(error.UserError())

    def disconnect(self) -> None:
        if self.state == "connecting":
            self.stopConnecting()
        elif self.transport is not None:
            self.transport.loseConnection()


def defaultEngine(reactor, nameResolver=None) -> IEngine:
    """
    The fast engine where the platform has it (epoll and C{splice}), else
    Twisted's; C{TCPPROXY_ENGINE=twisted} chooses Twisted's anywhere.
    """
    if AVAILABLE and os.environ.get("TCPPROXY_ENGINE", "fast") != "twisted":
        return FastEngine(reactor, nameResolver)
    return TwistedEngine(reactor, nameResolver)
