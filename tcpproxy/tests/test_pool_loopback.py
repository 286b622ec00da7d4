"""
The warm pool on real loopback sockets, on both engines: a client paired
with a connection opened before it came, the target's greeting delivered
to it first and exactly, dead pooled connections never handed out, and
the time to first byte it saves with a target 5 ms away.
"""

from __future__ import annotations

import socket
import statistics

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tcpproxy.config import PoolConfig
from tcpproxy.dialer import FailoverDialer, endpointForTarget
from tcpproxy.pool import WarmPool
from tcpproxy.tests.delayline import DelayedConnect, DelayLine
from tcpproxy.tests.loopback import (
    connectClient,
    echoBackend,
    engineFor,
    eventually,
    listen,
    listenProxy,
    proxyFactory,
)
from tcpproxy.tests.test_tls import TLSServiceMixin, tlsBackend

GREETING = b"220 smtp.example ESMTP ready\r\n"


class Greeter(Protocol):
    """
    A server-first backend: greets, then echoes.
    """

    def connectionMade(self) -> None:
        self.factory.protocols.append(self)
        self.received = b""
        self.transport.write(GREETING)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(data)


class GreeterFactory(Factory):
    noisy = False
    protocol = Greeter

    def __init__(self) -> None:
        self.protocols: list[Greeter] = []


def pooled(testCase, factory, size: int = 2, maxIdle: float = 30.0) -> WarmPool:
    """
    Put a warm pool of C{size} in front of C{factory}'s dialer, stopped
    when the test ends.
    """
    pool = WarmPool(factory.dialer, PoolConfig(size, maxIdle), factory.app.targets, reactor)
    testCase.addCleanup(pool.stop)
    factory.dialer = pool
    return pool


class _FirstByte(Protocol):
    """
    Sends a request as soon as it is connected; C{answered} fires with
    the seconds from C{began} to the first byte of the answer.
    """

    def __init__(self) -> None:
        self.began = reactor.seconds()
        self.answered: Deferred[float] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(reactor.seconds() - self.began)
            self.transport.loseConnection()


class WarmPoolLoopbackTests(TestCase):
    @inlineCallbacks
    def test_greetingThenRelay(self):
        """
        A client gets a connection the pool opened before it came: the
        target's greeting, sent before the client was there, arrives
        first and exactly, then the relay goes on both ways.
        """
        backend = GreeterFactory()
        port = listen(self, backend)
        factory = proxyFactory(self, [f"127.0.0.1:{port}"])
        pool = pooled(self, factory)
        proxyPort = listenProxy(self, factory)
        self.addCleanup(factory.whenIdle)

        def full():
            """the pool holds its two connections, each greeted"""
            idle = pool.idle[factory.app.targets[0]]
            return len(idle) == 2 and all(p.earlySize == len(GREETING) for p in idle)

        yield eventually(full)
        self.assertEqual(len(backend.protocols), 2)
        client = yield connectClient(proxyPort)
        client.transport.write(b"EHLO client\r\n")
        expected = GREETING + b"EHLO client\r\n"
        yield eventually(lambda: bytes(client.data) == expected)
        self.assertEqual(pool.handedOut, 1)
        # It was the oldest pooled connection that served the client.
        self.assertEqual(backend.protocols[0].received, b"EHLO client\r\n")
        client.transport.loseConnection()
        yield client.lost
        # And the pool was refilled.
        yield eventually(lambda: pool.idleCount() == 2)

    @inlineCallbacks
    def test_closedByTargetNotHandedOut(self):
        """
        Pooled connections the target closed are not given to a client:
        it gets a live one, and its bytes come back exactly.
        """
        backend = GreeterFactory()
        port = listen(self, backend)
        factory = proxyFactory(self, [f"127.0.0.1:{port}"])
        pool = pooled(self, factory)
        proxyPort = listenProxy(self, factory)
        self.addCleanup(factory.whenIdle)
        yield eventually(lambda: pool.idleCount() == 2)
        for protocol in backend.protocols:
            protocol.transport.loseConnection()
        client = yield connectClient(proxyPort)
        client.transport.write(b"hello")
        yield eventually(lambda: bytes(client.data) == GREETING + b"hello")
        self.assertNotIn(b"hello", backend.protocols[0].received + backend.protocols[1].received)
        client.transport.loseConnection()
        yield client.lost

    @inlineCallbacks
    def test_savesARoundTrip(self):
        """
        With the target 5 ms away (a delay line of the test's own), the
        time to first byte of a client-first request is about one round
        trip (10 ms) shorter with the pool than without, in the same run.
        """
        oneWay = 0.005
        roundTrip = 2 * oneWay
        engine = engineFor(self)
        backendPort = echoBackend(self)
        line = DelayLine(reactor, backendPort, oneWay)
        linePort = listen(self, line)
        # Cleanups run last first: this one after the pool is stopped.
        self.addCleanup(eventually, line.closed)

        def delayed(reactor_, target):
            return DelayedConnect(endpointForTarget(reactor_, target), reactor, roundTrip)

        factories = []
        for _ in range(2):
            factory = proxyFactory(self, [f"127.0.0.1:{linePort}"])
            factory.dialer = FailoverDialer(engine.reactor, 5.0, endpointFactory=delayed)
            factories.append(factory)
        plain, withPool = factories
        pool = pooled(self, withPool)
        ports = {"plain": listenProxy(self, plain), "pool": listenProxy(self, withPool)}
        times: dict[str, list[float]] = {"plain": [], "pool": []}
        for _ in range(12):
            for kind in ("pool", "plain"):
                yield eventually(lambda: pool.idleCount() == 2)
                client = _FirstByte()
                yield connectClient(ports[kind], client)
                times[kind].append((yield client.answered))
        for factory in factories:
            yield factory.whenIdle()
        plainTime = statistics.median(times["plain"])
        poolTime = statistics.median(times["pool"])
        saving = plainTime - poolTime
        self.assertEqual(pool.handedOut, 12)
        self.assertTrue(
            0.6 * roundTrip < saving < 1.6 * roundTrip,
            f"time to first byte {plainTime * 1000:.1f} ms without the pool,"
            f" {poolTime * 1000:.1f} ms with: {saving * 1000:.1f} ms saved, not about {roundTrip * 1000:g}",
        )


def unreadUnder(protocol) -> bytes | None:
    """
    What waits unread in the socket under a pooled connection's TLS layer
    (a peek: nothing is taken): some bytes, C{b""} at EOF, C{None} if
    nothing.
    """
    try:
        return protocol.transport.transport.getHandle().recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


class PooledTLSTests(TLSServiceMixin, TestCase):
    """
    A warm pool of TLS connections (C{"TargetTLS"}): one the target has
    closed is never handed to a client, whether the proxy has read the
    close yet or not.
    """

    @inlineCallbacks
    def test_closedByTargetNotHandedOut(self):
        """
        The target closes both pooled TLS connections -- one with
        C{close_notify}, one with a bare TCP FIN -- while the proxy has
        not read either yet (their reading is paused here to hold that
        moment, which is otherwise a race with the reactor): a client that
        comes then is not given either, but a new connection, and its
        bytes come back exactly; once read, both closes drop them.
        """
        backend = GreeterFactory()
        app, port = self.originating([tlsBackend(self, factory=backend)])
        app["Pool"] = {"Size": 2}
        self.serve([app])
        factory = self.service.factories["origin"]
        pool = factory.dialer
        [target] = factory.app.targets

        def full():
            """the pool holds two TLS connections, each greeted"""
            idle = pool.idle[target]
            return len(idle) == 2 and all(p.earlySize == len(GREETING) for p in idle)

        yield eventually(full)
        pooled = list(pool.idle[target])
        for protocol in pooled:
            protocol.transport.pauseProducing()
        notified, bare = backend.protocols
        notified.transport.loseConnection()  # close_notify
        bare.transport.transport.loseConnection()  # FIN, under the TLS layer

        def arrived():
            """both closes wait unread under the pooled connections' TLS layers"""
            return all(unreadUnder(p) is not None for p in pooled)

        yield eventually(arrived)
        self.assertEqual(sorted(unreadUnder(p) != b"" for p in pooled), [False, True])
        client = yield connectClient(port)
        client.transport.write(b"hello")

        def echoed():
            """the client got a live connection: the greeting, then its bytes echoed"""
            return bytes(client.data) == GREETING + b"hello"

        yield eventually(echoed)
        self.assertEqual(pool.handedOut, 0)
        # The client's own connection, and the one dialled in place of the
        # connection found closed (EOF) as the client came.
        self.assertEqual(len(backend.protocols), 4)
        self.assertEqual(sorted(p.received for p in backend.protocols), [b"", b"", b"", b"hello"])
        self.assertEqual([p.received for p in backend.protocols[:2]], [b"", b""])
        stats = factory.stats.targets[target]
        self.assertEqual((stats.poolHits, stats.poolMisses, stats.poolDropped["closed"]), (0, 1, 1))
        for protocol in pooled:
            protocol.transport.resumeProducing()
        yield eventually(lambda: stats.poolDropped["closed"] == 2)
        self.assertTrue(all(p.closed or p.readDone for p in pooled))
        client.transport.loseConnection()
        yield client.lost
        yield self.idle()


class WarmPoolLoopbackTwistedTests(WarmPoolLoopbackTests):
    engine = "twisted"


class PooledTLSTwistedTests(PooledTLSTests):
    engine = "twisted"
