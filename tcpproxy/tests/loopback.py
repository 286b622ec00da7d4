"""
Test support for loopback integration tests: backends, clients and a proxy
on real 127.0.0.1 sockets, each with Deferreds to wait on instead of sleeps.
"""

from __future__ import annotations

import gc
import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

from tcpproxy.app import ProxyServerFactory
from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, parseTarget
from tcpproxy.demo import echoFactory
from tcpproxy.dialer import FailoverDialer
from tcpproxy.listening import BACKLOG, SocketPort, bindTCP
from tcpproxy.service import _PortFactory
from tcpproxy.tests.ports import freePorts
from tcpproxy.transport.engine import FastEngine, IEngine, TwistedEngine
from tcpproxy.transport.poller import AVAILABLE
from tcpproxy.transport.tcp import IWriteBuffer

ENGINES = ("fast", "twisted")
"""
The values of a test case's C{engine} attribute (C{"fast"} when it has none).
"""


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


def engineFor(testCase) -> IEngine:
    """
    The engine C{testCase} runs its proxies on, started now and stopped
    when the test ends (after its relays have ended: cleanups run last
    first), one per test: L{FastEngine} unless the test case's C{engine}
    attribute is C{"twisted"} (L{TwistedEngine}).
    """
    engine = getattr(testCase, "_loopbackEngine", None)
    if engine is not None:
        return engine
    kind = getattr(testCase, "engine", "fast")
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}")
    # A test case may give the engine its name resolver (its nameResolver
    # attribute): no test may ask a name server off this machine.
    resolver = getattr(testCase, "nameResolver", None)
    if kind == "fast":
        if not AVAILABLE:
            raise SkipTest("no epoll here: the fast engine cannot run")
        engine = FastEngine(reactor, resolver)
    else:
        engine = TwistedEngine(reactor, resolver)
    engine.start()
    testCase.addCleanup(engine.stop)
    testCase._loopbackEngine = engine
    return engine


def proxyFactory(
    testCase, targets: list[str], name: str = "app", connectTimeout: float = 5.0, **settings
) -> ProxyServerFactory:
    """
    An app's factory for C{targets}, dialling on the test case's engine
    (L{engineFor}).

    @param settings: more of the app's settings (L{AppConfig}'s fields).
    """
    engine = engineFor(testCase)
    app = AppConfig(name, (1,), tuple(parseTarget(t) for t in targets), connectTimeout, **settings)
    dialer = FailoverDialer(engine.reactor, connectTimeout)
    return ProxyServerFactory(app, RoundRobin(app.targets), dialer, reactor)


def startProxy(testCase, targets: list[str], **kwargs) -> tuple[ProxyServerFactory, int]:
    """
    A proxy factory for C{targets}, listening on a free port (see
    L{listenProxy}).  The test does not end before every relay of it has
    ended (so none leaks into the next).
    """
    factory = proxyFactory(testCase, targets, **kwargs)
    port = listenProxy(testCase, factory)
    testCase.addCleanup(factory.whenIdle)
    return factory, port


def listenProxy(testCase, factory: ProxyServerFactory, interface: str = "127.0.0.1") -> int:
    """
    Listen for C{factory}'s app on a free port until the test ends; return
    the port.

    It listens as the service does (L{bindTCP}, L{SocketPort} and the
    service's L{_PortFactory}), handing clients to the test case's engine
    (L{engineFor}): the project's own transports, or Twisted's.
    """
    engine = engineFor(testCase)
    sock = bindTCP(interface, 0)
    number = sock.getsockname()[1]
    portFactory = _PortFactory(factory, number, engine)
    port = SocketPort(reactor, sock, portFactory)
    portFactory.listeningOn(port.getHost())
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


def captureEvents(testCase, namespace: str = "tcpproxy.access") -> list[dict]:
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


def unsent(transport) -> int:
    """
    Bytes a TCP transport still has to send (not yet taken by the kernel).

    The project's own transports say so (L{IWriteBuffer}).  Twisted's TCP
    transports (in the runs on L{TwistedEngine}) have no public way to tell:
    here, in test code only, their private buffer is read.
    """
    if transport is None:
        return 0
    if IWriteBuffer.providedBy(transport):
        return transport.bufferedBytes
    # Twisted's private state (twisted.internet.abstract.FileDescriptor):
    # acceptable in a test's measurement, never in production code.
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def unsentUnder(transport) -> int:
    """
    L{unsent} of a TCP transport, or of the TCP transport under a TLS one.
    """
    if transport is not None and ISSLTransport.providedBy(transport):
        transport = transport.transport
    return unsent(transport)


def bufferedBytes(factory: ProxyServerFactory) -> int:
    """
    Bytes the proxy holds for all of C{factory}'s relays: what waits for a
    dial, both sides' transport write buffers (a spliced direction's pipe
    included), and for TLS what is not yet encrypted.
    """
    total = 0
    for relay in factory.relays:
        total += len(relay._pending) if relay._pending is not None else 0
        for side in (relay, relay.client):
            if side is None or side.transport is None:
                continue
            t = side.transport
            if ISSLTransport.providedBy(t):
                total += t.heldBytes  # not yet encrypted
            total += unsentUnder(t)
    return total

def openSockets() -> int:
    """
    How many sockets this process holds.  (Only sockets: the reactor opens
    a pipe or two of its own when it first runs, and trial runs it lazily.)
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
        except OSError:
            pass  # the descriptor of the listing itself, already closed
    return count


def collectCyclesOnly(testCase) -> None:
    """
    From now until the test ends, objects are freed by reference counting
    alone: the cyclic garbage collector runs only when
    L{leftForTheCollector} asks it to.
    """
    gc.collect()
    gc.disable()
    testCase.addCleanup(gc.enable)


@inlineCallbacks
def leftForTheCollector(*kinds: type):
    """
    Fires with the names of the instances of C{kinds} that only the cyclic
    garbage collector could free (sorted): what a connection that ended
    left in reference cycles.  After L{collectCyclesOnly}, and one reactor
    turn for the closes under way.
    """
    yield deferLater(reactor, 0, lambda: None)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        left = sorted(type(o).__name__ for o in gc.garbage if isinstance(o, kinds))
    finally:
        gc.set_debug(0)
        del gc.garbage[:]
    return left
