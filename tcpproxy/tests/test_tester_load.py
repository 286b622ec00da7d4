"""
Tests for L{tcpproxy.tester.load}: whole runs against a real proxy and echo
backends in this process, on loopback.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tcpproxy.tester.load import CUT, DRAIN, LoadRun, LoadSettings, Unreachable
from tcpproxy.tester.pacing import ClosedLoop, OpenLoop
from tcpproxy.tester.payloads import fromSize, fromText
from tcpproxy.tester.shapes import Constant
from tcpproxy.tester.targets import ProxyPort, targetFor
from tcpproxy.tester.testing import DelayedEchoFactory, InProcessProxy, freePorts


def startProxy(testCase: TestCase, apps, downApps=()) -> InProcessProxy:
    proxy = InProcessProxy(reactor, apps, downApps)
    proxy.start()
    testCase.addCleanup(proxy.stop)
    return proxy


def loopbackPort(app: str, port: int) -> ProxyPort:
    return ProxyPort(app, port, targetFor("127.0.0.1", port))


class ThroughTheProxyTests(TestCase):
    timeout = 20

    async def test_countsExactly(self) -> None:
        """
        A closed-loop run of N messages on each connection sends and gets
        back exactly N per connection, counted per app and in total, each
        reply's latency in the histogram.
        """
        proxy = startProxy(self, [("alpha", 2, 2), ("beta", 2, 1)])
        settings = LoadSettings(connections=3, messages=25)
        run = LoadRun(reactor, proxy.ports(), settings, ClosedLoop(reactor), fromSize(100))
        result = await run.run()
        total = result.total
        self.assertEqual((total.sent, total.answered, total.errors, total.dropped), (300, 300, 0, 0))
        self.assertEqual(total.bytes, 300 * 100)
        self.assertEqual({name: f.answered for name, f in result.apps.items()}, {"alpha": 150, "beta": 150})
        self.assertEqual(result.connections, {"alpha": 6, "beta": 6})
        self.assertEqual(result.errorKinds, [])
        self.assertIsNotNone(total.latency["p999"])
        self.assertTrue(total.latency["min"] <= total.latency["p50"] <= total.latency["max"])
        # The time series adds up to the totals.
        self.assertEqual(sum(s.total.answered for s in result.samples), 300)
        self.assertGreater(total.reqPerSec, 0)

    async def test_openLoopForADuration(self) -> None:
        """
        An open loop for a duration sends on schedule, and every message
        comes back.
        """
        proxy = startProxy(self, [("alpha", 2, 2)])
        settings = LoadSettings(connections=2, duration=0.3)
        pacer = OpenLoop(reactor, Constant(100), perConnection=True)
        result = await LoadRun(reactor, proxy.ports(), settings, pacer, fromText("ping\n")).run()
        total = result.total
        # 4 connections at 100/s for 0.3s: about 120, give or take the ends.
        self.assertTrue(100 <= total.sent <= 124, total.sent)
        self.assertEqual((total.answered, total.errors, total.dropped), (total.sent, 0, 0))
        self.assertTrue(0.3 <= result.seconds < 1.0, result.seconds)

    async def test_deadTargets(self) -> None:
        """
        When the proxy can reach no target it closes each connection; the run
        counts an error per connection, naming the app and port, and drops
        what was in flight.
        """
        proxy = startProxy(self, [("alpha", 1, 1), ("dead", 1, 1)], downApps=["dead"])
        settings = LoadSettings(connections=2, messages=5)
        result = await LoadRun(reactor, proxy.ports(), settings, ClosedLoop(reactor), fromSize(10)).run()
        self.assertEqual(result.apps["alpha"].answered, 10)
        self.assertEqual((result.apps["dead"].errors, result.apps["dead"].dropped), (2, 2))
        deadPort = proxy.ports(["dead"])[0].port
        self.assertEqual(result.errorKinds, [("dead", deadPort, "connection closed by the proxy", 2)])

    async def test_connectRate(self) -> None:
        """
        With a connect rate the connections open one after the other, and
        all of them take part.
        """
        proxy = startProxy(self, [("alpha", 2, 1)])
        settings = LoadSettings(connections=2, messages=5, connectRate=100)
        result = await LoadRun(reactor, proxy.ports(), settings, ClosedLoop(reactor), fromSize(10)).run()
        self.assertEqual(result.connections, {"alpha": 4})
        self.assertEqual(result.total.answered, 20)
        # Four connections at 100/s: the last opens 30ms after the first.
        self.assertGreaterEqual(result.seconds, 0.03)

    async def test_connectRateLastConnectionSpendsTheBudget(self) -> None:
        """
        With a connect rate and one message per connection, the last
        connection to open sends the last message the run allows, which
        ends the run while its connect attempt is settling: that attempt is
        an open connection, not one to cancel.  Every connection is counted
        and sends its message, and nothing is reported that did not happen
        (trial fails the test on an unhandled error in the log).
        """
        proxy = startProxy(self, [("alpha", 1, 1)])
        settings = LoadSettings(connections=8, messages=1, connectRate=200)
        result = await LoadRun(reactor, proxy.ports(), settings, ClosedLoop(reactor), fromSize(10)).run()
        total = result.total
        self.assertEqual((total.sent, total.answered, total.errors, total.dropped), (8, 8, 0, 0))
        self.assertEqual(result.connections, {"alpha": 8})
        self.assertEqual(result.errorKinds, [])


class ReachTests(TestCase):
    async def test_unreachable(self) -> None:
        """
        When no port answers, the run fails with L{Unreachable}, naming each
        port and why.
        """
        dead = freePorts(2)
        ports = [loopbackPort("alpha", dead[0]), loopbackPort("beta", dead[1])]
        run = LoadRun(reactor, ports, LoadSettings(messages=1), ClosedLoop(reactor), fromSize(10))
        error = await self.assertFailure(run.run(), Unreachable)
        text = str(error)
        self.assertIn(f'app "alpha" port {dead[0]} (127.0.0.1:{dead[0]}): connection refused', text)
        self.assertIn(f'app "beta" port {dead[1]} (127.0.0.1:{dead[1]}): connection refused', text)

    async def test_unreachableWhileRamping(self) -> None:
        """
        With a connect rate and an open loop, a run where no port answers
        fails too, and stops its pacer (trial would find its timer left over).
        """
        dead = freePorts(1)[0]
        settings = LoadSettings(connections=3, connectRate=200, duration=5)
        pacer = OpenLoop(reactor, Constant(100), perConnection=True)
        run = LoadRun(reactor, [loopbackPort("alpha", dead)], settings, pacer, fromSize(10))
        error = await self.assertFailure(run.run(), Unreachable)
        self.assertIn(f'app "alpha" port {dead} (127.0.0.1:{dead}): connection refused', str(error))

    async def test_someUnreachable(self) -> None:
        """
        A port that does not answer among others that do is counted as
        errors, one per connection, naming it.
        """
        proxy = startProxy(self, [("alpha", 1, 1)])
        dead = freePorts(1)[0]
        ports = proxy.ports() + [loopbackPort("gone", dead)]
        settings = LoadSettings(connections=2, messages=3)
        result = await LoadRun(reactor, ports, settings, ClosedLoop(reactor), fromSize(10)).run()
        self.assertEqual(result.total.answered, 6)
        self.assertEqual(result.errorKinds, [("gone", dead, "cannot connect: connection refused", 2)])


class EndingTests(TestCase):
    """
    C{drain} and C{cut}, against a slow echo reached directly.
    """

    def slowBackend(self, delay: float | None) -> ProxyPort:
        factory = DelayedEchoFactory(reactor, delay)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(factory.whenIdle)
        return loopbackPort("slow", listening.getHost().port)

    def endRun(self, where: ProxyPort, end: str, drainTimeout: float = 5.0):
        # Four messages back to back, then the end: all are in flight.
        settings = LoadSettings(connections=1, messages=4, end=end, drainTimeout=drainTimeout)
        pacer = OpenLoop(reactor, Constant(1000), perConnection=True, burst=4)
        return LoadRun(reactor, [where], settings, pacer, fromText("hello\n")).run()

    async def test_drain(self) -> None:
        """
        C{drain} waits for the replies in flight.
        """
        result = await self.endRun(self.slowBackend(0.05), DRAIN)
        self.assertEqual((result.total.sent, result.total.answered, result.total.dropped), (4, 4, 0))
        self.assertGreaterEqual(result.total.latency["min"], 50_000 * 0.9)

    async def test_cut(self) -> None:
        """
        C{cut} stops at once: what was in flight is dropped.
        """
        result = await self.endRun(self.slowBackend(0.05), CUT)
        self.assertEqual((result.total.sent, result.total.answered, result.total.dropped), (4, 0, 4))
        self.assertEqual(result.total.errors, 0)

    async def test_drainTimeout(self) -> None:
        """
        A drain waits no longer than its timeout; what is still unanswered is
        dropped, and the wait does not count in the run's duration.
        """
        result = await self.endRun(self.slowBackend(None), DRAIN, drainTimeout=0.1)
        self.assertEqual((result.total.sent, result.total.answered, result.total.dropped), (4, 0, 4))
        self.assertLess(result.seconds, 0.1)

    async def test_interrupt(self) -> None:
        """
        L{LoadRun.interrupt} ends a run early (as Ctrl-C does), with its figures.
        """
        where = self.slowBackend(0.001)
        settings = LoadSettings(connections=1, duration=60)
        run = LoadRun(reactor, [where], settings, ClosedLoop(reactor), fromText("x"))
        finished = run.run()
        reactor.callLater(0.1, run.interrupt)
        result = await finished
        self.assertLess(result.seconds, 5)
        self.assertGreater(result.total.answered, 0)
        self.assertEqual(result.total.dropped, 0)
