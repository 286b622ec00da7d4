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
            # One client gets the trial; the next does not.
            self.assertEqual(self.health.usable([A, B]), [A, B])
            self.assertEqual(self.health.usable([A, B]), [B])
            self.health.connectFailed(A, "connection refused")
        self.clock.advance(8)
        self.assertEqual(self.health.usable([A, B]), [A, B])
        self.health.connectSucceeded(A)
        self.assertTrue(self.health.isUp(A))
        self.health.connectFailed(A, "connection refused")
        self.clock.advance(1)
        self.assertEqual(self.health.usable([A, B]), [A, B])
        down = "app web: target 127.0.0.1:7001 is down: connect failed (connection refused); next try in 1.0s"
        up = "app web: target 127.0.0.1:7001 is up: a client connected to it"
        self.assertEqual(self.messages(), [down, up, down])

    def test_failOpen(self):
        for target in (A, B, C):
            self.health.connectFailed(target, "connection refused")
        self.assertEqual(self.health.usable([B, C, A]), [B, C, A])

    def test_updateKeepsState(self):
        self.health.connectFailed(A, "x")
        self.health.update("web", (A, C), 1, 1)
        self.assertFalse(self.health.isUp(A))
        self.assertEqual(list(self.health.states), [A, C])


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
