"""
Balancing on real sockets (both engines): the queue of a target at its
C{MaxConnections} holds a client's bytes and serves it when a slot frees,
a client turned away is logged with the reason, and C{source-hash} keeps a
client on one target.
"""

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tcpproxy.app import ProxyServerFactory, buildApp, updateApp
from tcpproxy.balancer import balancerFor
from tcpproxy.config import parseConfig
from tcpproxy.dialer import FailoverDialer
from tcpproxy.tests.loopback import (
    CollectorFactory,
    captureEvents,
    connectClient,
    engineFor,
    eventually,
    listen,
    listenProxy,
)
from tcpproxy.tls import loadAppTLS


class BalanceLoopbackTests(TestCase):
    def proxy(self, targets, **settings):
        """
        An app for C{targets} (as a configuration writes them) with
        C{settings}, listening on a free port.
        """
        from twisted.internet import reactor

        document = {"Apps": [{"Name": "app", "Ports": [1], "Targets": targets, **settings}]}
        app = parseConfig(document).apps[0]
        engine = engineFor(self)
        factory = ProxyServerFactory(
            app, balancerFor(app, None, reactor), FailoverDialer(engine.reactor, 5), reactor
        )
        port = listenProxy(self, factory)
        self.addCleanup(factory.whenIdle)
        return factory, port

    def backend(self):
        factory = CollectorFactory()
        return factory, listen(self, factory)

    @inlineCallbacks
    def test_queueHoldsBytes(self):
        """
        A client that finds its target at its C{MaxConnections} waits, what
        it sends held, and gets through, bytes and all, when the first
        client leaves.
        """
        backend, backendPort = self.backend()
        factory, port = self.proxy(
            [{"Address": f"127.0.0.1:{backendPort}", "MaxConnections": 1}], QueueTimeout=30
        )
        first = yield connectClient(port)
        first.transport.write(b"first")
        served = yield backend.accepted.get()
        second = yield connectClient(port)
        second.transport.write(b"second, queued")

        def queued():
            "the second client is queued"
            return len(factory.dispatcher.queue) == 1

        yield eventually(queued)
        self.assertEqual(len(backend.protocols), 1)
        first.transport.loseConnection()
        yield served.readDone
        served.transport.loseConnection()
        servedLater = yield backend.accepted.get()

        def arrived():
            "the second client's bytes arrived"
            return bytes(servedLater.data) == b"second, queued"

        yield eventually(arrived)
        self.assertEqual(bytes(served.data), b"first")
        self.assertEqual(factory.dispatcher.queue, {})
        second.transport.loseConnection()
        yield servedLater.readDone
        servedLater.transport.loseConnection()

    @inlineCallbacks
    def test_fullRefusedLogged(self):
        """
        With no C{QueueTimeout}, a client that finds every target full is
        closed at once, and the access log says why.
        """
        events = captureEvents(self)
        backend, backendPort = self.backend()
        factory, port = self.proxy([{"Address": f"127.0.0.1:{backendPort}", "MaxConnections": 1}])
        first = yield connectClient(port)
        served = yield backend.accepted.get()
        second = yield connectClient(port)
        yield second.readDone
        second.transport.loseConnection()
        self.assertEqual(len(backend.protocols), 1)
        texts = [e["log_format"].format(**e) for e in events]
        self.assertTrue(
            any(f"failed: 127.0.0.1:{backendPort}: at its MaxConnections (1)" in t for t in texts), texts
        )
        first.transport.loseConnection()
        yield served.readDone
        served.transport.loseConnection()
        yield first.lost

    @inlineCallbacks
    def test_sourceHash(self):
        """
        Every connection of one client goes to the same one of three targets.
        """
        backends = [self.backend() for _ in range(3)]
        factory, port = self.proxy([f"127.0.0.1:{p}" for _, p in backends], Balance="source-hash")
        for _ in range(6):
            client = yield connectClient(port)
            client.transport.loseConnection()
            yield client.lost

        def allArrived():
            "six connections reached the backends"
            return sum(len(b.protocols) for b, _ in backends) == 6

        yield eventually(allArrived)
        for b, _ in backends:
            for protocol in b.protocols:
                protocol.transport.loseConnection()
        self.assertEqual(sorted(len(b.protocols) for b, _ in backends), [0, 0, 6])

    @inlineCallbacks
    def test_reload(self):
        """
        A reload (the service's L{updateApp}) that changes the policy and
        raises a target's limit keeps the count of its open connection, and
        serves the client that was waiting for a slot at once.
        """
        from twisted.internet import reactor

        backend, backendPort = self.backend()

        def config(limit, policy):
            target = {"Address": f"127.0.0.1:{backendPort}", "MaxConnections": limit}
            document = {
                "Apps": [
                    {"Name": "app", "Ports": [1], "Targets": [target], "QueueTimeout": 30, "Balance": policy}
                ]
            }
            return parseConfig(document).apps[0]

        app = config(1, "round-robin")
        engine = engineFor(self)
        factory = buildApp(app, loadAppTLS(app, "<config>"), engine, reactor)
        port = listenProxy(self, factory)
        self.addCleanup(factory.whenIdle)
        first = yield connectClient(port)
        served = yield backend.accepted.get()
        second = yield connectClient(port)
        second.transport.write(b"waited")
        yield eventually(lambda: len(factory.dispatcher.queue) == 1)
        before = factory.balancer
        following = config(2, "least-connections")
        updateApp(factory, following, loadAppTLS(following, "<config>"), engine)
        self.assertIsNot(factory.balancer, before)
        self.assertEqual(type(factory.balancer).__name__, "LeastConnections")
        servedLater = yield backend.accepted.get()
        yield eventually(lambda: bytes(servedLater.data) == b"waited")
        self.assertEqual(list(factory.balancer.load.counts.values()), [2])
        for client, end in ((first, served), (second, servedLater)):
            client.transport.loseConnection()
            yield end.readDone
            end.transport.loseConnection()
        yield eventually(lambda: not factory.balancer.load.counts)


class TwistedBalanceLoopbackTests(BalanceLoopbackTests):
    engine = "twisted"
