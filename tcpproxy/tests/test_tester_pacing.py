"""
Tests for L{tcpproxy.tester.pacing}, on a L{Clock}: when messages are sent,
and the send times they are measured from.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.tester.pacing import ClosedLoop, OpenLoop
from tcpproxy.tester.shapes import Constant, Step


class FakeConnection:
    """
    Stands in for a L{LoadProtocol}: records what the pacer asks it to send.
    """

    def __init__(self, budget: int | None = None) -> None:
        self.remaining = budget
        self.open = True
        self.sent: list[tuple[int, float]] = []
        self.outstanding: list = []

    @property
    def canSend(self) -> bool:
        return self.open and self.remaining != 0

    def send(self, count: int, intended: float) -> int:
        if self.remaining is not None:
            count = min(count, self.remaining)
            self.remaining -= count
        self.sent.append((count, intended))
        return count

    def messages(self) -> int:
        return sum(count for count, _ in self.sent)


def advance(clock: Clock, seconds: float, step: float = 0.001) -> None:
    """
    Move C{clock} on by C{seconds} (and a hair, against rounding), waking
    the reactor every C{step} seconds like a busy one.
    """
    end = clock.seconds() + seconds + 1e-6
    while clock.seconds() + step < end:
        clock.advance(step)
    clock.advance(end - clock.seconds())


class OpenLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.t0 = self.clock.seconds()

    def start(self, pacer, connections) -> None:
        for connection in connections:
            pacer.connectionReady(connection)
        pacer.start(self.t0)
        self.addCleanup(pacer.stop)

    def test_constantRate(self) -> None:
        """
        At 100 messages per second one connection sends one message each
        hundredth of a second, each meant for its slot.
        """
        connection = FakeConnection()
        self.start(OpenLoop(self.clock, Constant(100), perConnection=True), [connection])
        advance(self.clock, 1.0)
        self.assertEqual(connection.messages(), 100)
        for number, (count, intended) in enumerate(connection.sent):
            self.assertEqual(count, 1)
            self.assertAlmostEqual(intended - self.t0, (number + 1) * 0.01, places=6)

    def test_lateTick(self) -> None:
        """
        When the reactor wakes the pacer late, every message that fell due
        meanwhile is sent at once, each still meant for its own slot, so the
        delay shows in the latency (no coordinated omission).
        """
        connection = FakeConnection()
        self.start(OpenLoop(self.clock, Constant(100), perConnection=True), [connection])
        self.clock.advance(0.5 + 1e-6)
        self.assertEqual(connection.messages(), 50)
        intended = [t - self.t0 for _, t in connection.sent]
        for number, t in enumerate(intended):
            self.assertAlmostEqual(t, (number + 1) * 0.01, places=6)

    def test_burst(self) -> None:
        """
        With a burst of 5 at 100 messages per second, 5 messages go back to
        back every twentieth of a second.
        """
        connection = FakeConnection()
        self.start(OpenLoop(self.clock, Constant(100), perConnection=True, burst=5), [connection])
        advance(self.clock, 1.0)
        self.assertEqual([count for count, _ in connection.sent], [5] * 20)
        for number, (_, intended) in enumerate(connection.sent):
            self.assertAlmostEqual(intended - self.t0, (number + 1) * 0.05, places=6)

    def test_perConnection(self) -> None:
        """
        C{--rate} is per connection: two connections at 50/s send 100/s.
        """
        connections = [FakeConnection(), FakeConnection()]
        pacer = OpenLoop(self.clock, Constant(50), perConnection=True)
        self.start(pacer, connections)
        advance(self.clock, 1.0)
        self.assertEqual([c.messages() for c in connections], [50, 50])
        self.assertEqual(pacer.targetRate(0.0, 0.5), 100)

    def test_totalRateIsShared(self) -> None:
        """
        A shape's rate is the total, shared out between the connections in
        turn.
        """
        connections = [FakeConnection() for _ in range(4)]
        pacer = OpenLoop(self.clock, Constant(100), perConnection=False)
        self.start(pacer, connections)
        advance(self.clock, 1.0)
        self.assertEqual([c.messages() for c in connections], [25, 25, 25, 25])
        self.assertEqual(pacer.targetRate(0.0, 0.5), 100)

    def test_shapeIsFollowed(self) -> None:
        """
        The number of messages sent follows the shape's integral.
        """
        connection = FakeConnection()
        shape = Step(minRate=100, maxRate=300, step=100, every=1.0)
        pacer = OpenLoop(self.clock, shape)
        self.start(pacer, [connection])
        # The target reported for an interval is its average rate.
        self.assertEqual(pacer.targetRate(0.0, 2.0), 150)
        advance(self.clock, 1.0)
        self.assertEqual(connection.messages(), 100)
        advance(self.clock, 1.0)
        self.assertEqual(connection.messages(), 300)
        advance(self.clock, 2.0)
        self.assertEqual(connection.messages(), 900)

    def test_budget(self) -> None:
        """
        A connection sends no more than its budget, and the rest of the rate
        goes to connections that still may send.
        """
        spent, other = FakeConnection(budget=3), FakeConnection()
        self.start(OpenLoop(self.clock, Constant(100)), [spent, other])
        advance(self.clock, 0.5)
        self.assertEqual(spent.messages(), 3)
        self.assertEqual(other.messages(), 47)

    def test_noConnectionNoDebt(self) -> None:
        """
        While no connection can send, no messages fall due: a connection that
        opens later does not get a backlog thrown at it.
        """
        pacer = OpenLoop(self.clock, Constant(100))
        pacer.start(self.t0)
        self.addCleanup(pacer.stop)
        advance(self.clock, 0.5)
        connection = FakeConnection()
        pacer.connectionReady(connection)
        advance(self.clock, 0.1)
        self.assertIn(connection.messages(), (9, 10, 11))

    def test_closedConnectionIsSkipped(self) -> None:
        connections = [FakeConnection(), FakeConnection()]
        pacer = OpenLoop(self.clock, Constant(100))
        self.start(pacer, connections)
        advance(self.clock, 0.1)
        connections[0].open = False
        pacer.connectionClosed(connections[0])
        before = connections[0].messages()
        advance(self.clock, 0.1)
        self.assertEqual(connections[0].messages(), before)
        self.assertIn(connections[1].messages(), (14, 15, 16))

    def test_stop(self) -> None:
        """
        Once stopped, nothing more is sent and no call is left pending.
        """
        connection = FakeConnection()
        pacer = OpenLoop(self.clock, Constant(100))
        self.start(pacer, [connection])
        advance(self.clock, 0.1)
        pacer.stop()
        sent = connection.messages()
        advance(self.clock, 0.1)
        self.assertEqual(connection.messages(), sent)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClosedLoopTests(SynchronousTestCase):
    def test_nextOnReply(self) -> None:
        """
        A connection sends one message when the run starts, and the next
        only when the reply to the last is in.
        """
        clock = Clock()
        pacer = ClosedLoop(clock)
        connection = FakeConnection()
        pacer.connectionReady(connection)
        self.assertEqual(connection.sent, [])
        pacer.start(clock.seconds())
        self.assertEqual(connection.messages(), 1)
        clock.advance(0.25)
        pacer.replied(connection)
        self.assertEqual(connection.sent, [(1, 0.0), (1, 0.25)])
        pacer.stop()
        pacer.replied(connection)
        self.assertEqual(connection.messages(), 2)
        self.assertIsNone(pacer.targetRate(0.0, 1.0))
