"""
Unit tests of L{tcpproxy.health} on a L{Clock}, and of the balancer and
dialer reporting to it.
"""

from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import Clock, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.balancer import RoundRobin
from tcpproxy.config import HealthCheckConfig, parseTarget
from tcpproxy.dialer import FailoverDialer
from tcpproxy.health import HealthChecker, HealthTracker
from tcpproxy.tests.loopback import captureEvents

A, B, C = (parseTarget(f"127.0.0.1:{p}") for p in (7001, 7002, 7003))


def refuse(reactor, index):
    _, _, factory, _, _ = reactor.tcpClients[index]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(error.ConnectionRefusedError()))


def accept(reactor, index):
    _, _, factory, _, _ = reactor.tcpClients[index]
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    return protocol


def doubling(attempt):
    """
    Back-off without jitter: 1, 2, 4, ... seconds.
    """
    return 2.0**attempt


class TrackerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = captureEvents(self, "tcpproxy.health")
        self.health = HealthTracker("web", (A, B, C), self.clock, rise=2, fall=3, policy=doubling)

    def messages(self):
        return [e["log_format"].format(**e) for e in self.events]

    def test_fallAndRise(self):
        self.health.checkFailed(A, "connection refused")
        self.health.checkFailed(A, "connection refused")
        self.assertTrue(self.health.isUp(A))
        self.health.checkFailed(A, "connection refused")
        self.assertFalse(self.health.isUp(A))
        self.health.checkSucceeded(A)
        self.assertFalse(self.health.isUp(A))
        self.health.checkSucceeded(A)
        self.assertTrue(self.health.isUp(A))
        self.assertEqual(
            self.messages(),
            [
                "app web: target 127.0.0.1:7001 is down: 3 checks failed (connection refused)",
                "app web: target 127.0.0.1:7001 is up: 2 checks passed",
            ],
        )

    def test_successBreaksFailureRun(self):
        for _ in range(2):
            self.health.checkFailed(A, "x")
        self.health.checkSucceeded(A)
        for _ in range(2):
            self.health.checkFailed(A, "x")
        self.assertTrue(self.health.isUp(A))

    def test_activeDownIsNotOfferedToClients(self):
        for _ in range(3):
            self.health.checkFailed(A, "x")
        self.clock.advance(3600)
        self.assertEqual(self.health.usable([A, B, C]), [B, C])

    def test_passiveBackoffGrowsAndResets(self):
        """
        A failed connect takes the target out at once; it is offered to one
        client after 1 s, then (failing again) after 2 s, 4 s; a success
        resets the back-off.
        """
        self.health.connectFailed(A, "connection refused")
        self.assertFalse(self.health.isUp(A))
        self.assertEqual(self.health.usable([A, B]), [B])
        for delay in (1, 2, 4):
            self.clock.advance(delay - 0.01)
            self.assertEqual(self.health.usable([A, B]), [B])
            self.clock.advance(0.01)
            # Offered until one client dials it; then to no other.
            self.assertEqual(self.health.usable([A, B]), [A, B])
            self.assertEqual(self.health.usable([A, B]), [A, B])
            token = self.health.attemptStarted(A)
            self.assertEqual(self.health.usable([A, B]), [B])
            self.health.connectFailed(A, "connection refused", token)
        self.clock.advance(8)
        self.assertEqual(self.health.usable([A, B]), [A, B])
        self.health.attemptStarted(A)
        self.health.connectSucceeded(A)
        self.assertTrue(self.health.isUp(A))
        self.health.connectFailed(A, "connection refused", self.health.attemptStarted(A))
        self.clock.advance(1)
        self.assertEqual(self.health.usable([A, B]), [A, B])
        down = "app web: target 127.0.0.1:7001 is down: connect failed (connection refused); next try in 1.0s"
        still = (
            "app web: target 127.0.0.1:7001 is still down: "
            "connect failed (connection refused); next try in {}s"
        )
        up = "app web: target 127.0.0.1:7001 is up: a client connected to it"
        self.assertEqual(
            self.messages(), [down, still.format("2.0"), still.format("4.0"), still.format("8.0"), up, down]
        )

    def test_failOpen(self):
        for target in (A, B, C):
            self.health.connectFailed(target, "connection refused")
        self.assertEqual(self.health.usable([B, C, A]), [B, C, A])

    def test_updateKeepsState(self):
        self.health.connectFailed(A, "x")
        self.health.update("web", (A, C), 1, 1)
        self.assertFalse(self.health.isUp(A))
        self.assertEqual(list(self.health.states), [A, C])


class RecoveryTests(SynchronousTestCase):
    """
    How soon a target that failed is tried again, through the balancer and
    the dialer as clients use them (no active checks): the back-off counts
    one failure per thing learnt, and only a client that dials the target
    spends its retry.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.events = captureEvents(self, "tcpproxy.health")
        self.health = HealthTracker("web", (A, B), self.reactor, policy=doubling)
        self.balancer = RoundRobin((A, B), self.health)
        self.dialer = FailoverDialer(self.reactor, 5, health=self.health)
        self.factory = Factory.forProtocol(Protocol)

    def client(self):
        return self.dialer.dial(self.factory, self.balancer.order())

    def dialled(self) -> list:
        """
        The targets dialled so far, by port, in order.
        """
        return [port for _, port, _, _, _ in self.reactor.tcpClients]

    def test_inFlightFailuresCountOnce(self):
        """
        20 clients are dialling A when it stops answering: their 20 failures
        are one failure, so A is tried again after the first back-off (1 s,
        as logged), not after 2**19 s.
        """
        for _ in range(20):
            self.client()
            self.balancer.order()  # the next client's first choice is B: keep A first
        self.assertEqual(self.dialled(), [7001] * 20)
        for index in range(20):
            refuse(self.reactor, index)
        for index in range(20, 40):
            accept(self.reactor, index)  # each failed over to B
        self.assertEqual(self.dialled()[20:], [7002] * 20)
        self.assertEqual(
            [e["why"] for e in self.events], ["connect failed (connection refused); next try in 1.0s"]
        )
        self.reactor.advance(1)
        self.client()
        self.assertEqual(self.dialled()[-1], 7001, "A is tried again once its logged back-off is over")

    def test_onlyARealDialSpendsTheRetry(self):
        """
        A down target whose back-off is over stays on offer while clients
        connect to their first choice without dialling it; the first client
        that dials it takes the retry.
        """
        self.client()  # order [A, B]: A refused (down for 1 s), B answers
        refuse(self.reactor, 0)
        accept(self.reactor, 1)
        self.reactor.advance(1)
        self.client()  # order [B, A]: B answers, A is never dialled
        accept(self.reactor, 2)
        self.assertEqual(self.dialled(), [7001, 7002, 7002])
        self.client()  # order [A, B]: A is dialled, its retry
        self.assertEqual(self.dialled()[-1], 7001, "the retry was spent by a client that never dialled A")
        self.assertEqual(
            self.health.usable([A, B]), [B], "offered to another client while the retry is under way"
        )
        accept(self.reactor, 3)
        self.assertTrue(self.health.isUp(A))


class BalancerTests(SynchronousTestCase):
    def test_skipsDownTargets(self):
        health = HealthTracker("web", (A, B, C), Clock(), policy=doubling)
        balancer = RoundRobin((A, B, C), health)
        health.connectFailed(B, "x")
        self.assertEqual([balancer.order() for _ in range(3)], [[A, C], [C, A], [C, A]])
        self.assertIs(balancer.withTargets((A, B)).health, health)


class DialerReportsTests(SynchronousTestCase):
    def test_reportsOutcomes(self):
        reactor = MemoryReactorClock()
        health = HealthTracker("web", (A, B), reactor, policy=doubling)
        dialer = FailoverDialer(reactor, 5, health=health)
        d = dialer.dial(Factory.forProtocol(Protocol), [A, B])
        refuse(reactor, 0)
        self.assertFalse(health.isUp(A))
        accept(reactor, 1)
        self.assertEqual(self.successResultOf(d).target, B)
        self.assertTrue(health.isUp(B))


class CheckerTests(SynchronousTestCase):
    def test_checksEveryInterval(self):
        reactor = MemoryReactorClock()
        health = HealthTracker("web", (A,), reactor, rise=1, fall=2, policy=doubling)
        checker = HealthChecker(health, reactor, HealthCheckConfig(interval=5, timeout=2, rise=1, fall=2))
        checker.start()
        self.assertEqual(len(reactor.tcpClients), 1)
        # No answer within the timeout: a failed check.
        reactor.advance(2)
        reactor.advance(3)
        self.assertEqual(len(reactor.tcpClients), 2)
        reactor.advance(2)
        self.assertFalse(health.isUp(A))
        reactor.advance(3)
        self.assertEqual(len(reactor.tcpClients), 3)
        accept(reactor, 2)
        self.assertTrue(health.isUp(A))
        checker.stop()
        self.assertEqual(reactor.getDelayedCalls(), [])


class DrainTests(SynchronousTestCase):
    """
    Drain as a state of L{HealthTracker}, alone.
    """

    def setUp(self):
        self.a, self.b = parseTarget("127.0.0.1:1"), parseTarget("127.0.0.1:2")
        self.tracker = HealthTracker("app", [self.a, self.b], Clock())

    def test_drainedNeverUsable(self):
        """
        A drained target is left out, even when every other target is down
        (failing open never reaches it).
        """
        self.assertTrue(self.tracker.drain(self.a, "test"))
        self.assertFalse(self.tracker.drain(self.a, "test"))
        self.assertEqual(self.tracker.usable([self.a, self.b]), [self.b])
        self.tracker.connectFailed(self.b, "refused")
        self.assertEqual(self.tracker.usable([self.a, self.b]), [self.b])
        self.assertEqual(self.tracker.stateOf(self.a), "draining")
        self.assertEqual(self.tracker.stateOf(self.b), "down")
        self.assertFalse(self.tracker.allDrained)
        self.tracker.drain(self.b, "test")
        self.assertTrue(self.tracker.allDrained)
        self.assertEqual(self.tracker.usable([self.a, self.b]), [])

    def test_logged(self):
        """
        Each change is logged with its reason; one that changes nothing is not.
        """
        events = captureEvents(self, "tcpproxy.health")
        self.tracker.drain(self.a, "by hand")
        self.tracker.drain(self.a, "by hand")
        self.tracker.ready(self.a, "by hand")
        self.assertEqual(
            [(e["state"], e["why"]) for e in events], [("draining", "by hand"), ("ready", "by hand")]
        )

    def test_ready(self):
        self.tracker.drain(self.a, "test")
        self.assertTrue(self.tracker.ready(self.a, "test"))
        self.assertEqual(self.tracker.usable([self.a, self.b]), [self.a, self.b])
        self.assertEqual(self.tracker.stateOf(self.a), "up")

    def test_unknownTarget(self):
        self.assertRaises(KeyError, self.tracker.drain, parseTarget("127.0.0.1:3"), "test")
