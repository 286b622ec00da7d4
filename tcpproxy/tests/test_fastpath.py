"""
Tests for what only the plain-TCP fast path has: its connect deadlines, its
poller, its listening port, its copy and splice modes, and how it closes a
pair that fails or is aborted.  What both relays share (byte-exact relay,
half-close, backpressure, failover, limits) is tested on both paths by the
loopback test cases with C{fastPath = True}.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcpproxy import fastpath
from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, parseTarget
from tcpproxy.dialer import FailoverDialer
from tcpproxy.fastpath import Deadlines, canRelay
from tcpproxy.listening import SocketPort, bindTCP
from tcpproxy.poller import READ, Poller
from tcpproxy.relay import END_ABORTED, END_IDLE, ProxyServerFactory
from tcpproxy.tests.loopback import (
    Collector,
    CollectorFactory,
    captureEvents,
    connectClient,
    eventually,
    listen,
    listenProxy,
    unansweredPort,
)
from tcpproxy.tests.test_relay_loopback import BackpressureTests, connectionEvents

if not fastpath.AVAILABLE:
    skip = "no epoll here: every app is relayed by Twisted"


class _Item:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def timedOut(self) -> None:
        self.log.append(self.name)


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock)
        self.expired: list[str] = []

    def item(self, name: str) -> _Item:
        return _Item(name, self.expired)

    def test_expireInTime(self) -> None:
        """
        Each item times out at its own deadline, not before, whatever the
        mix of timeouts.
        """
        a, b, c = self.item("a"), self.item("b"), self.item("c")
        self.deadlines.add(a, 5)
        self.clock.advance(1)
        self.deadlines.add(b, 2)
        self.deadlines.add(c, 5)
        self.clock.advance(1.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(1.9)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b", "a"])
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b", "a", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_removed(self) -> None:
        """
        A removed item never times out; with nothing left, no timer is left.
        """
        a, b = self.item("a"), self.item("b")
        self.deadlines.add(a, 1)
        self.deadlines.add(b, 1)
        self.deadlines.remove(a, 1)
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b"])
        self.deadlines.add(a, 1)
        self.deadlines.remove(a, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.deadlines), 0)

    def test_oldestRemoved(self) -> None:
        """
        When the item the timer was set for is removed, the next one still
        times out at its own deadline.
        """
        a, b = self.item("a"), self.item("b")
        self.deadlines.add(a, 1)
        self.clock.advance(0.5)
        self.deadlines.add(b, 1)
        self.deadlines.remove(a, 1)
        self.clock.advance(0.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b"])

    def test_addedWhileExpiring(self) -> None:
        """
        An item that, timing out, adds another (the next target's dial) gets
        a deadline of its own.
        """
        again = self.item("again")

        class Retry(_Item):
            def timedOut(self2) -> None:
                _Item.timedOut(self2)
                self.deadlines.add(again, 1)

        self.deadlines.add(Retry("first", self.expired), 1)
        self.clock.advance(1)
        self.clock.advance(0.9)
        self.assertEqual(self.expired, ["first"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["first", "again"])


class PollerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.poller = Poller(self.reactor)
        self.addCleanup(lambda: self.poller.fileno() == -1 or self.poller.close())
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)

    def test_oneReaderForTheReactor(self) -> None:
        """
        The reactor watches the poller, not the sockets; closing it stops that.
        """
        self.poller.register(self.a.fileno(), READ, lambda events: None)
        self.assertEqual(self.reactor.getReaders(), [self.poller])
        self.poller.close()
        self.assertEqual(self.reactor.getReaders(), [])

    def test_events(self) -> None:
        """
        A ready socket's handler is called with its events, level-triggered:
        again on the next turn while the data is not read.
        """
        seen: list[int] = []
        self.poller.register(self.a.fileno(), READ, seen.append)
        self.poller.doRead()
        self.assertEqual(seen, [])
        self.b.send(b"x")
        self.poller.doRead()
        self.poller.doRead()
        self.assertEqual(seen, [READ, READ])
        self.a.recv(1)
        self.poller.doRead()
        self.assertEqual(len(seen), 2)

    def test_staleEventOfAReusedNumber(self) -> None:
        """
        When a handler closes another socket of the same batch and a new
        socket gets its number, the old socket's event is not handed to the
        new socket's handler.
        """
        c, d = socket.socketpair()
        self.addCleanup(d.close)
        calls: list[str] = []
        fresh: list[socket.socket] = []

        def first(events: int) -> None:
            calls.append("first")
            # Whichever of the two comes first drops the other.
            for sock in (self.a, c):
                if sock.fileno() != self.current and sock.fileno() != -1:
                    number = sock.fileno()
                    self.poller.forget(number)
                    sock.close()
                    new, peer = socket.socketpair()
                    self.addCleanup(new.close)
                    self.addCleanup(peer.close)
                    self.assertIn(number, (new.fileno(), peer.fileno()))
                    reused = new if new.fileno() == number else peer
                    fresh.append(reused)
                    self.poller.register(number, READ, lambda events: calls.append("new"))

        def handler(number: int):
            def handle(events: int) -> None:
                self.current = number
                if not fresh:
                    first(events)
                else:
                    calls.append("old")

            return handle

        self.poller.register(self.a.fileno(), READ, handler(self.a.fileno()))
        self.poller.register(c.fileno(), READ, handler(c.fileno()))
        self.b.send(b"x")
        d.send(b"y")
        self.poller.doRead()
        self.assertEqual(calls, ["first"])

    def test_failingHandler(self) -> None:
        """
        A handler that raises is logged, and its owner (a relay) is aborted;
        the other handlers of the turn still run.
        """

        class Owner:
            aborted = False

            def handle(self, events: int) -> None:
                raise ZeroDivisionError("a bug")

            def abort(self) -> None:
                self.aborted = True

        owner = Owner()
        other: list[int] = []
        c, d = socket.socketpair()
        self.addCleanup(c.close)
        self.addCleanup(d.close)
        self.poller.register(self.a.fileno(), READ, owner.handle)
        self.poller.register(c.fileno(), READ, other.append)
        self.b.send(b"x")
        d.send(b"y")
        self.poller.doRead()
        self.assertTrue(owner.aborted)
        self.assertEqual(other, [READ])
        [failure] = self.flushLoggedErrors(ZeroDivisionError)
        self.assertEqual(str(failure.value), "a bug")


class _Acceptor:
    def __init__(self) -> None:
        self.accepted: list[tuple[socket.socket, tuple]] = []

    def socketAccepted(self, sock: socket.socket, address: tuple) -> None:
        self.accepted.append((sock, address))


class _ExhaustedListener:
    """
    A listening socket whose first accept fails as if the process were out
    of file descriptors.
    """

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failures = 1
        self.family = real.family

    def _accept(self):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.real._accept()

    def accept(self):
        return self.real.accept()

    def __getattr__(self, name: str):
        return getattr(self.real, name)


class SocketPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.listener = bindTCP("127.0.0.1", 0)
        self.addCleanup(self.listener.close)
        self.acceptor = _Acceptor()

    def connect(self) -> socket.socket:
        client = socket.create_connection(self.listener.getsockname(), timeout=5)
        self.addCleanup(client.close)
        return client

    def test_accepts(self) -> None:
        """
        Each client is handed over as a non-blocking socket, with its address.
        """
        port = SocketPort(self.reactor, self.listener, self.acceptor)
        self.assertIn(port, self.reactor.getReaders())
        client = self.connect()
        port.doRead()
        [(sock, address)] = self.acceptor.accepted
        self.addCleanup(sock.close)
        self.assertEqual(address, client.getsockname())
        self.assertEqual(sock.gettimeout(), 0.0)
        self.assertEqual(port.getHost().port, self.listener.getsockname()[1])

    def test_fullAfterOneClient(self) -> None:
        """
        A client that fills the proxy (the accept gate stops the port's
        reading) is the last one accepted: the others of the burst wait in
        the backlog until the port reads again.
        """
        port = SocketPort(self.reactor, self.listener, self.acceptor)
        self.acceptor.socketAccepted = lambda sock, address: (
            self.acceptor.accepted.append((sock, address)),
            port.stopReading(),
        )
        for _ in range(3):
            self.connect()
        port.doRead()
        self.assertEqual(len(self.acceptor.accepted), 1)
        port.startReading()
        port.doRead()
        self.assertEqual(len(self.acceptor.accepted), 2)
        for sock, _ in self.acceptor.accepted:
            sock.close()

    def test_stopAndStartReading(self) -> None:
        """
        The proxy-wide limit stops and starts the reading of a port; stopping
        to listen closes it.
        """
        port = SocketPort(self.reactor, self.listener, self.acceptor)
        port.stopReading()
        self.assertNotIn(port, self.reactor.getReaders())
        port.startReading()
        self.assertIn(port, self.reactor.getReaders())
        self.successResultOf(port.stopListening())
        self.assertNotIn(port, self.reactor.getReaders())
        self.assertFalse(port.listening)
        self.assertEqual(self.listener.fileno(), -1)

    def test_outOfDescriptors(self) -> None:
        """
        When accept fails for lack of descriptors, the waiting client is
        closed (instead of the port being ready for ever) and that is logged,
        once; with nobody waiting, nothing is logged; the next client is
        accepted as usual.
        """
        events = captureEvents(self, "tcpproxy.listening")
        exhausted = _ExhaustedListener(self.listener)
        # Out of descriptors, accept fails whether a client waits or not.
        exhausted.failures = 2
        port = SocketPort(self.reactor, exhausted, self.acceptor)
        refused = self.connect()
        port.doRead()
        port.doRead()
        self.assertEqual(self.acceptor.accepted, [])
        try:
            self.assertEqual(refused.recv(1), b"")
        except ConnectionResetError:
            pass
        [event] = events
        self.assertEqual(event["code"], "EMFILE")
        self.assertEqual(event["client"], f"127.0.0.1:{refused.getsockname()[1]}")
        self.assertEqual(event["log_level"].name, "warn")
        self.connect()
        port.doRead()
        self.assertEqual(len(self.acceptor.accepted), 1)
        self.acceptor.accepted[0][0].close()


class CanRelayTests(SynchronousTestCase):
    def app(self, targets=("127.0.0.1:1",), **settings) -> AppConfig:
        return AppConfig("app", (1,), tuple(parseTarget(t) for t in targets), **settings)

    def test_plain(self) -> None:
        self.assertTrue(canRelay(self.app(("127.0.0.1:1", "[::1]:2"))))

    def test_needsTwisted(self) -> None:
        """
        A hostname target (Twisted resolves it) or a bandwidth limit (the
        token bucket sees every chunk) keep the app on Twisted's relay.
        """
        self.assertFalse(canRelay(self.app(("backend.internal:1",))))
        self.assertFalse(canRelay(self.app(bandwidthLimit=1000.0)))


def _fastFactory(targets: list[str], **settings) -> ProxyServerFactory:
    app = AppConfig("app", (1,), tuple(parseTarget(t) for t in targets), **settings)
    dialer = FailoverDialer(reactor, app.connectTimeout)
    return ProxyServerFactory(app, RoundRobin(app.targets), dialer, reactor)


class FastRelayTests(TestCase):
    fastPath = True
    timeout = 30

    def start(self, targets: list[str], **settings) -> tuple[ProxyServerFactory, int]:
        factory = _fastFactory(targets, **settings)
        port = listenProxy(self, factory)
        self.assertIsNotNone(factory.fastPath)
        self.addCleanup(factory.whenIdle)
        return factory, port

    @inlineCallbacks
    def test_ipv6Target(self) -> None:
        if not socket.has_ipv6:
            raise self.skipTest("no IPv6 on this machine")
        from twisted.internet.protocol import Factory

        from tcpproxy.demo import echoFactory

        factory6: Factory = echoFactory()
        listening = reactor.listenTCP(0, factory6, interface="::1")
        self.addCleanup(listening.stopListening)
        factory, port = self.start([f"[::1]:{listening.getHost().port}"])
        client = yield connectClient(port)
        client.transport.write(b"over v6")
        client.transport.loseWriteConnection()
        self.assertEqual((yield client.readDone), b"over v6")

    @inlineCallbacks
    def test_abortWhileRelaying(self) -> None:
        """
        Aborting (the drain period is over) closes both sides at once and
        logs the connection as aborted.
        """
        events = captureEvents(self)
        backend = CollectorFactory()
        factory, port = self.start([f"127.0.0.1:{listen(self, backend)}"])
        client = yield connectClient(port)
        target = yield backend.accepted.get()
        factory.abortAll()
        yield client.lost
        yield target.lost
        self.assertEqual(factory.relays, set())
        [event] = connectionEvents(events)
        self.assertEqual(event["end"], END_ABORTED)

    @inlineCallbacks
    def test_abortWhileDialling(self) -> None:
        """
        Aborting a client whose target does not answer yet drops the dial:
        no socket and no deadline are left behind.
        """
        factory, port = self.start([f"127.0.0.1:{unansweredPort(self)}"], connectTimeout=5.0)
        client = yield connectClient(port)
        yield eventually(lambda: len(factory.relays) == 1)
        [relay] = factory.relays
        self.assertIsNotNone(relay.server)
        deadlines = factory.fastPath.deadlines
        self.assertEqual(len(deadlines), 1)
        factory.abortAll()
        yield client.lost
        self.assertEqual(factory.relays, set())
        self.assertEqual(len(deadlines), 0)
        self.assertEqual(len(factory.fastPath.poller), 0)

    @inlineCallbacks
    def test_idleWithUnsendableBytesIsAborted(self) -> None:
        """
        An idle pair that cannot flush to its client (which reads nothing)
        is aborted one idle check later, not left open.
        """
        events = captureEvents(self)
        backend = CollectorFactory()
        factory, port = self.start([f"127.0.0.1:{listen(self, backend)}"], idleTimeout=0.3)
        client = yield connectClient(port, Collector())
        client.transport.pauseProducing()
        target = yield backend.accepted.get()
        target.transport.write(os.urandom(8 * 1024 * 1024))
        yield factory.whenIdle()
        # A paused client notices nothing until it reads again.
        client.transport.resumeProducing()
        yield client.lost
        [event] = connectionEvents(events)
        self.assertEqual(event["end"], END_IDLE)


class FastCopyBackpressureTests(BackpressureTests):
    """
    Backpressure on the fast path in copy mode (no splice), which small
    messages and platforms without splice use.
    """

    fastPath = True

    def setUp(self) -> None:
        self.patch(fastpath, "SPLICE", False)
