"""
Tests for L{tcpproxy.transport.poller}: the fast engine's own epoll set,
one reader of the reactor's.
"""

from __future__ import annotations

import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.transport.poller import AVAILABLE, READ, Poller

if not AVAILABLE:
    skip = "no epoll here: the fast engine cannot run"


class _WithPoller(SynchronousTestCase):
    """
    A poller on a memory reactor, and a connected socket pair.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.poller = Poller(self.reactor)
        self.addCleanup(lambda: self.poller.fileno() == -1 or self.poller.close())
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)


class PollerTests(_WithPoller):

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
        A handler that raises is logged, and its owner (a transport: the
        object the handler is a method of) is aborted; the other handlers
        of the turn still run.
        """

        class Owner:
            aborted = False

            def handle(self, events: int) -> None:
                raise ZeroDivisionError("a bug")

            def abortConnection(self) -> None:
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

    def test_failingHandlerThatIsItsOwner(self) -> None:
        """
        A handler that is itself the transport (the fast engine's transports
        are their own handler, not a bound method of theirs) is aborted when
        it raises.
        """

        class Transport:
            aborted = False

            def __call__(self, events: int) -> None:
                raise ZeroDivisionError("a bug")

            def abortConnection(self) -> None:
                self.aborted = True

        transport = Transport()
        self.poller.register(self.a.fileno(), READ, transport)
        self.b.send(b"x")
        self.poller.doRead()
        self.assertTrue(transport.aborted)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_failingHandlerWithoutOwner(self) -> None:
        """
        A handler that raises and belongs to nothing that can be aborted (a
        plain function) is logged, and the turn goes on.
        """
        other: list[int] = []
        c, d = socket.socketpair()
        self.addCleanup(c.close)
        self.addCleanup(d.close)

        def broken(events: int) -> None:
            raise ZeroDivisionError("a bug")

        self.poller.register(self.a.fileno(), READ, broken)
        self.poller.register(c.fileno(), READ, other.append)
        self.b.send(b"x")
        d.send(b"y")
        self.poller.doRead()
        self.assertEqual(other, [READ])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_handOver(self) -> None:
        """
        A descriptor handed over keeps its interest; its events go to the
        new handler only.
        """
        old: list[int] = []
        new: list[int] = []
        self.poller.register(self.a.fileno(), READ, old.append)
        self.poller.handOver(self.a.fileno(), new.append)
        self.b.send(b"x")
        self.poller.doRead()
        self.assertEqual((old, new), ([], [READ]))

    def test_unregister(self) -> None:
        """
        An unregistered descriptor's events are not handed to anyone, and it
        is no longer counted.
        """
        seen: list[int] = []
        self.poller.register(self.a.fileno(), READ, seen.append)
        self.assertEqual(len(self.poller), 1)
        self.poller.unregister(self.a.fileno())
        self.assertEqual(len(self.poller), 0)
        self.b.send(b"x")
        self.poller.doRead()
        self.assertEqual(seen, [])


class SoonTests(_WithPoller):
    """
    L{Poller.soon}: what a transport must not do from inside a call its
    protocol made (such as C{connectionLost} from C{loseConnection}).
    """

    def test_notAtOnce(self) -> None:
        """
        Outside a batch, calls wait for the reactor's next turn: one timer
        for all of them, run in the order asked, with their arguments.
        """
        calls: list[tuple] = []
        self.poller.soon(calls.append, ("first",))
        self.poller.soon(calls.append, ("second",))
        self.assertEqual(calls, [])
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(0)
        self.assertEqual(calls, [("first",), ("second",)])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_afterTheBatch(self) -> None:
        """
        Asked from a handler, a call runs once every handler of the batch
        has run (before the reactor's next turn: no timer is made).
        """
        c, d = socket.socketpair()
        self.addCleanup(c.close)
        self.addCleanup(d.close)
        order: list[str] = []

        def first(events: int) -> None:
            order.append("handler")
            self.poller.soon(order.append, "soon")

        self.poller.register(self.a.fileno(), READ, first)
        self.poller.register(c.fileno(), READ, lambda events: order.append("handler"))
        self.b.send(b"x")
        d.send(b"y")
        self.poller.doRead()
        self.assertEqual(order, ["handler", "handler", "soon"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_askedFromASoonCall(self) -> None:
        """
        A call asked by a call being run runs in the same turn, after it.
        """
        order: list[str] = []

        def outer() -> None:
            order.append("outer")
            self.poller.soon(order.append, "inner")

        self.poller.soon(outer)
        self.reactor.advance(0)
        self.assertEqual(order, ["outer", "inner"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_failingCall(self) -> None:
        """
        A call that raises is logged; the others still run.
        """
        order: list[str] = []

        def broken() -> None:
            raise ZeroDivisionError("a bug")

        self.poller.soon(broken)
        self.poller.soon(order.append, "after")
        self.reactor.advance(0)
        self.assertEqual(order, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_closeRunsThem(self) -> None:
        """
        Closing the poller runs the calls still asked for (closes already
        decided), those they ask for too, and leaves no timer behind.
        """
        order: list[str] = []

        def close() -> None:
            order.append("close")
            self.poller.soon(order.append, "then")

        self.poller.soon(close)
        self.poller.close()
        self.assertEqual(order, ["close", "then"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
