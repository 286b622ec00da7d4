"""
Loopback tests of the resilience features: connect timeout, idle timeout,
per-app, per-client and proxy-wide limits, bandwidth, allow/deny for IPv4
and IPv6, and active health checks.  Real sockets on 127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import ipaddress
import json
import socket

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tcpproxy.access import END_IDLE, END_NO_TARGET
from tcpproxy.app import ProxyServerFactory
from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, HealthCheckConfig, loadConfig, parseTarget
from tcpproxy.demo import echoFactory
from tcpproxy.dialer import FailoverDialer
from tcpproxy.health import HealthChecker, HealthTracker
from tcpproxy.service import ProxyService
from tcpproxy.tests.loopback import (
    Collector,
    CollectorFactory,
    captureEvents,
    deadPort,
    echoBackend,
    engineFor,
    listenProxy,
    unansweredPort,
)


class EchoClient(Collector):
    """
    A L{Collector} that can wait for a number of bytes.
    """

    def __init__(self) -> None:
        Collector.__init__(self)
        self._waiting: list[tuple[int, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        Collector.dataReceived(self, data)
        for entry in list(self._waiting):
            if len(self.data) >= entry[0]:
                self._waiting.remove(entry)
                entry[1].callback(reactor.seconds())

    def waitFor(self, size: int) -> Deferred:
        if len(self.data) >= size:
            return defer.succeed(reactor.seconds())
        d: Deferred = Deferred()
        self._waiting.append((size, d))
        return d


def connectFrom(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> Deferred:
    if ":" in host:
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=5, bindAddress=(source, 0))
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5, bindAddress=(source, 0))
    return connectProtocol(endpoint, EchoClient())


def withTimeout(d: Deferred, seconds: float = 10) -> Deferred:
    return d.addTimeout(seconds, reactor)


class RelayLimitTests(TestCase):
    def startProxy(self, targets, interface="127.0.0.1", **settings):
        app = AppConfig("app", (1,), tuple(parseTarget(t) for t in targets), **settings)
        health = HealthTracker(app.name, app.targets, reactor)
        factory = ProxyServerFactory(
            app,
            RoundRobin(app.targets, health),
            FailoverDialer(engineFor(self).reactor, app.connectTimeout, health=health),
            reactor,
        )
        port = listenProxy(self, factory, interface)
        self.addCleanup(factory.whenIdle)
        return factory, port

    @defer.inlineCallbacks
    def test_connectTimeout(self):
        """
        A target that never answers costs ConnectTimeout, then the client is
        closed and the log says why.
        """
        events = captureEvents(self)
        factory, port = self.startProxy([f"127.0.0.1:{unansweredPort(self)}"], connectTimeout=0.3)
        client = yield connectFrom(port)
        started = reactor.seconds()
        yield withTimeout(client.readDone)
        self.assertGreaterEqual(reactor.seconds() - started, 0.25)
        yield factory.whenIdle()
        self.assertEqual(events[-1]["end"], END_NO_TARGET)
        self.assertIn("no answer within 0.3s", events[-1]["failed"])

    @defer.inlineCallbacks
    def test_idleTimeout(self):
        """
        A pair with no byte either way for IdleTimeout is closed; traffic
        keeps it open.
        """
        events = captureEvents(self)
        factory, port = self.startProxy([f"127.0.0.1:{echoBackend(self)}"], idleTimeout=0.4)
        client = yield connectFrom(port)
        for i in range(1, 5):
            # Well inside the timeout each time: the pair stays open.
            client.transport.write(b"x")
            yield withTimeout(client.waitFor(i))
            yield withTimeout(sleep(0.2))
        self.assertFalse(client.readDone.called)
        yield withTimeout(client.readDone)
        yield factory.whenIdle()
        self.assertEqual(events[-1]["end"], END_IDLE)
        self.assertEqual(bytes(client.data), b"xxxx")
        self.assertEqual(factory.counter.total, 0)

    @defer.inlineCallbacks
    def test_appAndClientLimits(self):
        """
        Over MaxConnectionsPerClient or MaxConnections a new client is closed
        before any dial; the counts go back to zero and clients are taken
        again once connections end.
        """
        events = captureEvents(self)
        backend = CollectorFactory()
        backendPort = reactor.listenTCP(0, backend, interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        factory, port = self.startProxy(
            [f"127.0.0.1:{backendPort.getHost().port}"], maxConnections=2, maxConnectionsPerClient=1
        )
        first = yield connectFrom(port, "127.0.0.1")
        yield withTimeout(backend.accepted.get())
        sameClient = yield connectFrom(port, "127.0.0.1")
        yield withTimeout(sameClient.readDone)
        other = yield connectFrom(port, "127.0.0.2")
        yield withTimeout(backend.accepted.get())
        third = yield connectFrom(port, "127.0.0.3")
        yield withTimeout(third.readDone)
        self.assertEqual(len(backend.protocols), 2)
        self.assertEqual(
            [e["reason"] for e in events if "reason" in e], ["MaxConnectionsPerClient", "MaxConnections"]
        )
        self.assertEqual(dict(factory.counter.refusals), {"MaxConnectionsPerClient": 1, "MaxConnections": 1})
        for protocol in (first, other, *backend.protocols):
            protocol.transport.loseConnection()
        yield factory.whenIdle()
        self.assertEqual((factory.counter.total, dict(factory.counter.perClient)), (0, {}))
        again = yield connectFrom(port, "127.0.0.1")
        collector = yield withTimeout(backend.accepted.get())
        again.transport.write(b"hello")
        again.transport.loseConnection()
        self.assertEqual((yield withTimeout(collector.readDone)), b"hello")
        collector.transport.loseConnection()

    @defer.inlineCallbacks
    def test_countsAfterFailedConnects(self):
        factory, port = self.startProxy([f"127.0.0.1:{deadPort()}"], maxConnections=1)
        for _ in range(3):
            client = yield connectFrom(port)
            yield withTimeout(client.readDone)
            yield factory.whenIdle()
        self.assertEqual(factory.counter.total, 0)
        self.assertEqual(dict(factory.counter.refusals), {})

    @defer.inlineCallbacks
    def test_bandwidth(self):
        """
        With BandwidthLimit, an echo of 300 kB through the proxy (limited
        each way) runs at the limit, within 10%.
        """
        limit = 200_000
        size = 300_000
        factory, port = self.startProxy([f"127.0.0.1:{echoBackend(self)}"], bandwidthLimit=limit)
        client = yield connectFrom(port)
        started = reactor.seconds()
        client.transport.write(b"b" * size)
        finished = yield withTimeout(client.waitFor(size), 20)
        rate = size / (finished - started)
        self.assertTrue(limit * 0.9 <= rate <= limit * 1.1, f"{rate:.0f} B/s for a limit of {limit} B/s")
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_allowDenyIPv4(self):
        events = captureEvents(self)
        backend = CollectorFactory()
        backendPort = reactor.listenTCP(0, backend, interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        nets = ipaddress.ip_network
        factory, port = self.startProxy(
            [f"127.0.0.1:{backendPort.getHost().port}"],
            allow=(nets("127.0.0.0/8"),),
            deny=(nets("127.0.0.1/32"),),
        )
        denied = yield connectFrom(port, "127.0.0.1")
        yield withTimeout(denied.readDone)
        self.assertEqual(backend.protocols, [])
        self.assertEqual(events[-1]["reason"], "denied")
        allowed = yield connectFrom(port, "127.0.0.2")
        collector = yield withTimeout(backend.accepted.get())
        allowed.transport.write(b"ok")
        allowed.transport.loseConnection()
        self.assertEqual((yield withTimeout(collector.readDone)), b"ok")
        collector.transport.loseConnection()

    @defer.inlineCallbacks
    def test_allowDenyIPv6(self):
        if not socket.has_ipv6:
            raise self.skipTest("no IPv6 on this machine")
        backend = CollectorFactory()
        backendPort = reactor.listenTCP(0, backend, interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        target = [f"127.0.0.1:{backendPort.getHost().port}"]
        factory, port = self.startProxy(target, interface="::1", deny=(ipaddress.ip_network("::1/128"),))
        denied = yield connectFrom(port, "::1", "::1")
        yield withTimeout(denied.readDone)
        self.assertEqual(backend.protocols, [])
        factory, port = self.startProxy(target, interface="::1", allow=(ipaddress.ip_network("::1"),))
        allowed = yield connectFrom(port, "::1", "::1")
        collector = yield withTimeout(backend.accepted.get())
        allowed.transport.write(b"v6")
        allowed.transport.loseConnection()
        self.assertEqual((yield withTimeout(collector.readDone)), b"v6")
        collector.transport.loseConnection()


class TwistedRelayLimitTests(RelayLimitTests):
    """
    The same, relayed on Twisted's own transports.
    """

    engine = "twisted"


def sleep(seconds: float) -> Deferred:
    """
    Let real time pass (the behaviour under test is a timeout; nothing is
    synchronised on this).
    """
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def waitForLog(testCase, text: str) -> Deferred:
    """
    Fires on the first log event whose text contains C{text}.
    """
    d: Deferred = Deferred()

    def observer(event):
        if not d.called and "log_format" in event and text in event["log_format"].format(**event):
            d.callback(event)

    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return d


class HealthCheckLoopbackTests(TestCase):
    @defer.inlineCallbacks
    def test_stoppedTargetOutRestartedBackIn(self):
        """
        Active checks take a stopped target out of the rotation and bring it
        back in once it listens again.
        """
        listening = reactor.listenTCP(0, echoFactory(), interface="127.0.0.1")
        portNumber = listening.getHost().port
        other = echoBackend(self)
        a, b = parseTarget(f"127.0.0.1:{portNumber}"), parseTarget(f"127.0.0.1:{other}")
        health = HealthTracker("app", (a, b), reactor, rise=2, fall=2)
        checker = HealthChecker(health, reactor, HealthCheckConfig(interval=0.05, timeout=1, rise=2, fall=2))
        down = waitForLog(self, f"target {a} is down")
        checker.start()
        self.addCleanup(checker.stop)
        yield listening.stopListening()
        yield withTimeout(down)
        balancer = RoundRobin((a, b), health)
        self.assertEqual([balancer.order() for _ in range(2)], [[b], [b]])
        up = waitForLog(self, f"target {a} is up")
        again = reactor.listenTCP(portNumber, echoFactory(), interface="127.0.0.1")
        self.addCleanup(again.stopListening)
        yield withTimeout(up)
        self.assertEqual(sorted(map(str, balancer.order())), sorted([str(a), str(b)]))


class GlobalLimitTests(TestCase):
    @defer.inlineCallbacks
    def test_waitsInBacklogAndResumes(self):
        """
        At the proxy-wide MaxConnections the proxy stops accepting: a new
        client is not refused, it waits, and is served once a connection ends.
        """
        path = self.mktemp()
        port = deadPort()
        with open(path, "w") as f:
            json.dump(
                {
                    "BindAddress": "127.0.0.1",
                    "MaxConnections": 1,
                    "Apps": [{"Name": "app", "Ports": [port], "Targets": [f"127.0.0.1:{echoBackend(self)}"]}],
                },
                f,
            )
        service = ProxyService(loadConfig(path), reactor, engine=engineFor(self))
        service.startService()
        self.addCleanup(service.stopService)
        first = yield connectFrom(port)
        first.transport.write(b"1")
        yield withTimeout(first.waitFor(1))
        second = yield connectFrom(port)
        second.transport.write(b"2")
        yield withTimeout(sleep(0.3))
        self.assertEqual(bytes(second.data), b"")
        self.assertFalse(second.readDone.called)
        first.transport.loseConnection()
        yield withTimeout(second.waitFor(1))
        self.assertEqual(bytes(second.data), b"2")
        second.transport.loseConnection()
        yield service.factories["app"].whenIdle()
        self.assertEqual(service.gate.count, 0)


class ReloadLimitTests(TestCase):
    def test_reloadChangesSettingsForNewClients(self):
        path = self.mktemp()
        port = deadPort()
        app = {"Name": "app", "Ports": [port], "Targets": ["127.0.0.1:9"]}
        with open(path, "w") as f:
            json.dump({"BindAddress": "127.0.0.1", "Apps": [app]}, f)
        service = ProxyService(loadConfig(path), reactor, engine=engineFor(self))
        service.startService()
        self.addCleanup(service.stopService)
        factory = service.factories["app"]
        self.assertIsNone(factory.admit("127.0.0.1"))
        # What the end of that connection would do (relayEnded).
        factory.counter.close("127.0.0.1")
        service.gate.connectionClosed()
        with open(path, "w") as f:
            json.dump(
                {"BindAddress": "127.0.0.1", "MaxConnections": 5, "Apps": [dict(app, Deny=["127.0.0.1"])]}, f
            )
        result = self.successResultOf(service.reload())
        self.assertIn('apps changed: "app" (Deny)', "; ".join(result.plan.describe()))
        self.assertIn("MaxConnections: none -> 5", "; ".join(result.plan.describe()))
        self.assertEqual(factory.admit("127.0.0.1"), "denied")
        self.assertEqual(service.gate.maximum, 5)


class TwistedGlobalLimitTests(GlobalLimitTests):
    engine = "twisted"


class TwistedReloadLimitTests(ReloadLimitTests):
    engine = "twisted"
