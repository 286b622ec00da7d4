"""
Tests for L{tcpproxy.dispatch}: per-target C{MaxConnections}, the app's
queue and its C{QueueTimeout}, failover under every policy, on the real
L{FailoverDialer} over a L{MemoryReactorClock}.
"""

import dataclasses

from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.balancer import POLICIES, balancerFor
from tcpproxy.config import parseConfig
from tcpproxy.dialer import FailoverDialer, NoTargetAvailable
from tcpproxy.dispatch import Dispatcher
from tcpproxy.health import HealthTracker
from tcpproxy.tests.loopback import captureEvents
from tcpproxy.tests.test_health import accept, refuse


class FakeFactory:
    """
    What a L{Dispatcher} reads of its app's factory.
    """

    def __init__(self, app, reactor, health=None):
        self.app = app
        self.clock = reactor
        self.health = health
        self.balancer = balancerFor(app, health, reactor)
        self.dialer = FailoverDialer(reactor, 5, health=health)
        self.scaler = None


def appWith(targets, **settings):
    document = {"Apps": [{"Name": "web", "Ports": [1], "Targets": targets, **settings}]}
    return parseConfig(document).apps[0]


class DispatchTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.protocols = Factory.forProtocol(Protocol)
        self.events = captureEvents(self, "tcpproxy.dispatch")

    def start(self, targets, **settings):
        self.factory = FakeFactory(appWith(targets, **settings), self.reactor)
        self.dispatcher = Dispatcher(self.factory)
        return self.dispatcher

    def dialled(self):
        return [port for _, port, _, _, _ in self.reactor.tcpClients]

    def client(self, source="10.0.0.1"):
        results = []
        d = self.dispatcher.dispatch(self.protocols, source)
        d.addBoth(results.append)
        return d, results

    def counts(self):
        return {t.port: n for t, n in self.factory.balancer.load.counts.items()}

    def test_fullTargetSkipped(self):
        """
        A target at its C{MaxConnections} is skipped for the next.
        """
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}, "127.0.0.1:7002"])
        self.client()
        accept(self.reactor, 0)
        self.client()  # round-robin's turn: B
        self.client()  # A's turn, but A is full
        self.assertEqual(self.dialled(), [7001, 7002, 7002])
        self.assertEqual(self.counts(), {7001: 1, 7002: 2})

    def test_failedDialCountsOut(self):
        """
        A target that fails to connect is counted out, and the next one in
        the order is dialled and counted in.
        """
        self.start(["127.0.0.1:7001", "127.0.0.1:7002"])
        _, results = self.client()
        self.assertEqual(self.counts(), {7001: 1})
        refuse(self.reactor, 0)
        self.assertEqual(self.counts(), {7002: 1})
        accept(self.reactor, 1)
        self.assertEqual(results[0].target.port, 7002)
        self.dispatcher.ended(results[0].target)
        self.assertEqual(self.counts(), {})

    def test_cancelledDialCountsOut(self):
        self.start(["127.0.0.1:7001"])
        d, results = self.client()
        d.cancel()
        self.assertEqual(self.counts(), {})
        self.assertTrue(results[0].check(CancelledError))

    def test_refusedAtOnce(self):
        """
        With every target full and no C{QueueTimeout}, the client is turned
        away at once, each target's reason saying it is full.
        """
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}])
        self.client()
        _, results = self.client()
        failure = results[0]
        failure.trap(NoTargetAvailable)
        self.assertEqual(
            str(failure.value), "all 1 targets failed: 127.0.0.1:7001: at its MaxConnections (1)"
        )
        self.assertEqual(self.dialled(), [7001])

    def test_queueServedWhenSlotFrees(self):
        """
        A client that finds every target full waits, first come first
        served, and is dialled as soon as a connection ends.
        """
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}], QueueTimeout=10)
        _, first = self.client()
        accept(self.reactor, 0)
        _, second = self.client("10.0.0.2")
        _, third = self.client("10.0.0.3")
        self.assertEqual((second, third, self.dialled()), ([], [], [7001]))
        self.assertEqual(len(self.dispatcher.queue), 2)
        self.reactor.advance(5)
        self.dispatcher.ended(first[0].target)
        self.assertEqual(self.dialled(), [7001, 7001])
        self.assertEqual(len(self.dispatcher.queue), 1)
        accept(self.reactor, 1)
        self.assertEqual(second[0].target.port, 7001)
        self.assertEqual(third, [])
        self.assertEqual(
            [e["log_format"].format(**e) for e in self.events],
            [
                "app web: every target is at its MaxConnections: a client waits, 1 in the queue",
                "app web: every target is at its MaxConnections: a client waits, 2 in the queue",
            ],
        )

    def test_queueTimeout(self):
        """
        A client that waited C{QueueTimeout} seconds is turned away.
        """
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}], QueueTimeout=2)
        self.client()
        accept(self.reactor, 0)
        _, waiting = self.client()
        self.reactor.advance(1.9)
        self.assertEqual(waiting, [])
        self.reactor.advance(0.1)
        waiting[0].trap(NoTargetAvailable)
        self.assertIn(
            "at its MaxConnections (1) for the 2s the client waited in the queue", str(waiting[0].value)
        )
        self.assertEqual(self.dispatcher.queue, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_leaveWhileQueued(self):
        """
        A client that leaves while queued is taken out of the queue: the
        slot goes to the next.
        """
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}], QueueTimeout=10)
        _, first = self.client()
        accept(self.reactor, 0)
        leaving, _ = self.client()
        _, staying = self.client()
        leaving.cancel()
        self.assertEqual(len(self.dispatcher.queue), 1)
        self.dispatcher.ended(first[0].target)
        accept(self.reactor, 1)
        self.assertEqual(staying[0].target.port, 7001)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_leaveWhileDialledFromQueue(self):
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}], QueueTimeout=10)
        _, first = self.client()
        accept(self.reactor, 0)
        queued, results = self.client()
        self.dispatcher.ended(first[0].target)
        self.assertEqual(self.counts(), {7001: 1})
        queued.cancel()
        self.assertTrue(results[0].check(CancelledError))
        self.assertEqual(self.counts(), {})

    def test_failedDialServesQueue(self):
        """
        A dial that fails frees its slot for whoever waits.
        """
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}], QueueTimeout=10)
        _, first = self.client()
        _, second = self.client()
        refuse(self.reactor, 0)
        first[0].trap(NoTargetAvailable)
        self.assertEqual(self.dialled(), [7001, 7001])
        accept(self.reactor, 1)
        self.assertEqual(second[0].target.port, 7001)

    def test_reloadRaisesLimit(self):
        """
        A reload that raises a limit serves those who wait.
        """
        self.start([{"Address": "127.0.0.1:7001", "MaxConnections": 1}], QueueTimeout=10)
        self.client()
        _, waiting = self.client()
        app = appWith([{"Address": "127.0.0.1:7001", "MaxConnections": 2}], QueueTimeout=10)
        self.factory.app = app
        self.factory.balancer = balancerFor(app, None, self.reactor, self.factory.balancer)
        self.dispatcher.changed()
        self.assertEqual(self.dialled(), [7001, 7001])

    def test_failoverEveryPolicy(self):
        """
        Under every policy a client whose target refuses goes on to the
        next, each target at most once, then gives up.
        """
        for policy in POLICIES:
            reactor = self.reactor = MemoryReactorClock()
            self.start(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"], Balance=policy)
            _, results = self.client()
            for index in range(3):
                refuse(reactor, index)
            results[0].trap(NoTargetAvailable)
            self.assertEqual(sorted(self.dialled()), [7001, 7002, 7003], policy)
            self.assertEqual(self.counts(), {}, policy)

    def test_healthAndLimits(self):
        """
        A target that is down is not dialled; the one left is full; the
        backup is not used for that (it is usable only when no other is).
        """
        app = appWith(
            [
                "127.0.0.1:7001",
                {"Address": "127.0.0.1:7002", "MaxConnections": 1},
                {"Address": "127.0.0.1:7003", "Backup": True},
            ]
        )
        health = HealthTracker("web", app.targets, self.reactor)
        self.factory = FakeFactory(app, self.reactor, health)
        self.dispatcher = Dispatcher(self.factory)
        health.checkFailed(app.targets[0], "x")
        health.checkFailed(app.targets[0], "x")
        health.checkFailed(app.targets[0], "x")
        self.client()
        accept(self.reactor, 0)
        _, results = self.client()
        self.assertEqual(self.dialled(), [7002, 7003])
        self.assertEqual(results, [])
        self.assertEqual(self.counts(), {7002: 1, 7003: 1})

    def test_unlimitedQueueIgnored(self):
        """
        Without any C{MaxConnections}, C{QueueTimeout} changes nothing.
        """
        self.start(["127.0.0.1:7001"], QueueTimeout=10)
        for _ in range(3):
            self.client()
        self.assertEqual(self.dialled(), [7001] * 3)


class WeightZeroTests(SynchronousTestCase):
    def test_allZero(self):
        """
        With every weight 0 there is no target to try.
        """
        reactor = MemoryReactorClock()
        app = appWith([{"Address": "127.0.0.1:7001", "Weight": 0}])
        dispatcher = Dispatcher(FakeFactory(dataclasses.replace(app), reactor))
        results = []
        dispatcher.dispatch(Factory.forProtocol(Protocol), "10.0.0.1").addBoth(results.append)
        results[0].trap(NoTargetAvailable)
        self.assertEqual(reactor.tcpClients, [])
