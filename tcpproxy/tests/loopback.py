"""
Test support for loopback integration tests: backends, clients and a proxy
on real 127.0.0.1 sockets, each with Deferreds to wait on instead of sleeps.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, parseTarget
from tcpproxy.demo import echoFactory
from tcpproxy.dialer import FailoverDialer
from tcpproxy.fastpath import FastPath, FastRelay, canRelay
from tcpproxy.listening import BACKLOG, SocketPort, bindTCP
from tcpproxy.relay import ProxyServerFactory
from tcpproxy.service import _PortFactory
from tcpproxy.tests.ports import freePorts
from tcpproxy.tls import isTLS, unflushed


def deadPort() -> int:
    """
    A loopback port where nothing listens (it was free a moment ago), so a
    connect to it is refused.
    """
    return freePorts(1)[0]


def blockPort(testCase) -> int:
    """
    Listen on a free loopback port until the test ends, so that the proxy
    cannot have it; return the port.
    """
    sock = socket.socket()
    testCase.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock.getsockname()[1]


def unansweredPort(testCase) -> int:
    """
    A loopback port whose accept queue is full until the test ends: a
    connect to it is never answered (the kernel drops the SYN), so a dial
    to it runs into its timeout.
    """
    server = socket.socket()
    testCase.addCleanup(server.close)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    for _ in range(3):
        filler = socket.socket()
        testCase.addCleanup(filler.close)
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
    return port


def listen(testCase, factory) -> int:
    """
    Listen on a free loopback port until the test ends; return the port.
    """
    port = reactor.listenTCP(0, factory, backlog=BACKLOG, interface="127.0.0.1")
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


def echoBackend(testCase) -> int:
    return listen(testCase, echoFactory())


def proxyFactory(targets: list[str], name: str = "app", connectTimeout: float = 5.0) -> ProxyServerFactory:
    app = AppConfig(name, (1,), tuple(parseTarget(t) for t in targets), connectTimeout)
    return ProxyServerFactory(app, RoundRobin(app.targets), FailoverDialer(reactor, connectTimeout), reactor)


def startProxy(testCase, targets: list[str], **kwargs) -> tuple[ProxyServerFactory, int]:
    """
    A proxy factory for C{targets}, listening on a free port (see
    L{listenProxy}).  The test does not end before every relay of it has
    ended (so none leaks into the next).
    """
    factory = proxyFactory(targets, **kwargs)
    port = listenProxy(testCase, factory)
    testCase.addCleanup(factory.whenIdle)
    return factory, port


def listenProxy(testCase, factory: ProxyServerFactory, interface: str = "127.0.0.1") -> int:
    """
    Listen for C{factory}'s app on a free port until the test ends; return
    the port.

    A test case whose C{fastPath} attribute is true listens as the service
    does, so that the app's clients are relayed on the fast path when it
    can relay them (L{tcpproxy.fastpath.canRelay}), by Twisted otherwise;
    other test cases listen with Twisted's own port and relay.
    """
    if not getattr(testCase, "fastPath", False):
        port = reactor.listenTCP(0, factory, backlog=BACKLOG, interface=interface)
        testCase.addCleanup(port.stopListening)
        return port.getHost().port
    fastPath = FastPath(reactor)
    fastPath.start()
    testCase.addCleanup(fastPath.stop)
    factory.fastPath = fastPath if canRelay(factory.app) else None
    sock = bindTCP(interface, 0)
    number = sock.getsockname()[1]
    port = SocketPort(reactor, sock, _PortFactory(factory, number, reactor))
    testCase.addCleanup(port.stopListening)
    return number


@implementer(IHalfCloseableProtocol)
class Collector(Protocol):
    """
    Collects what arrives; C{readDone} fires on EOF (with the bytes so far),
    C{lost} fires on C{connectionLost} (the reason is kept in C{reason}).

    Like a well-behaved peer it closes its socket once both directions are
    shut: Twisted reports no C{connectionLost} by itself in that case.

    @ivar whenConnected: fires when the connection is made.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.whenConnected: Deferred[Collector] = Deferred()
        self.readDone: Deferred[bytes] = Deferred()
        self.lost: Deferred = Deferred()
        self.eof = False
        self.writeShut = False

    def connectionMade(self) -> None:
        self.whenConnected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True
        self.readDone.callback(bytes(self.data))
        if self.writeShut:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.writeShut = True
        if self.eof:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.readDone.called:
            self.readDone.callback(bytes(self.data))
        self.reason = reason
        self.lost.callback(None)


class CollectorFactory(Factory):
    """
    A backend of L{Collector}s; C{accepted.get()} fires with the next one
    that is connected.
    """

    noisy = False

    def __init__(self) -> None:
        self.protocols: list[Collector] = []
        self.accepted: DeferredQueue[Collector] = DeferredQueue()

    def buildProtocol(self, addr) -> Collector:
        protocol = Collector()
        self.protocols.append(protocol)
        protocol.whenConnected.addCallback(self.accepted.put)
        return protocol


def connectClient(port: int, protocol: Protocol | None = None) -> Deferred:
    """
    Connect a client (a L{Collector} by default) to C{127.0.0.1:port}.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    return connectProtocol(endpoint, protocol if protocol is not None else Collector())


def eventually(predicate, seconds: float = 10.0) -> Deferred:
    """
    Fires once C{predicate()} is true, checked every few milliseconds, for
    a state of the proxy's own that no event announces; fails after
    C{seconds}, quoting the predicate's docstring.
    """
    d: Deferred = Deferred()
    deadline = reactor.seconds() + seconds

    def check() -> None:
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"still false after {seconds}s: {predicate.__doc__}"))
        else:
            reactor.callLater(0.005, check)

    check()
    return d


def captureEvents(testCase, namespace: str = "tcpproxy.relay") -> list[dict]:
    """
    Collect, until the test ends, the log events whose namespace starts
    with C{namespace}.
    """
    events: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_namespace", "").startswith(namespace):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def bufferedBytes(factory: ProxyServerFactory) -> int:
    """
    Bytes the proxy holds for all of C{factory}'s relays: both sides'
    transport write buffers and what waits for a dial (Twisted's relay), or
    what each direction holds for its receiver (the fast path's).
    """
    total = 0
    for relay in factory.relays:
        if isinstance(relay, FastRelay):
            # What a side has not taken yet: in user space, or in a pipe.
            for flow in (relay.up, relay.down):
                if flow is not None:
                    total += (0 if flow.data is None else len(flow.data)) + flow.inPipe
            continue
        total += relay._pendingSize if relay._pending is not None else 0
        for side in (relay, relay.client):
            if side is not None and side.transport is not None:
                t = side.transport
                total += unflushed(t)
                if isTLS(t):
                    # Not yet encrypted: held before the handshake, or
                    # gathered for one write per reactor turn.
                    total += sum(map(len, t._appSendBuffer or ()))
                    total += sum(map(len, getattr(t._aggregator, "_buffer", ())))
    return total
