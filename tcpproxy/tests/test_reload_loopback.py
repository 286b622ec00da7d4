"""
Reloads on real loopback sockets, checked as a user would: bytes that
arrive byte-exact through a reload, ports that refuse or answer after it,
connections never lost, descriptors not leaked.
"""

from __future__ import annotations

import json
import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tcpproxy.applying import APPLIED, NOT_APPLIED, REFUSED
from tcpproxy.config import loadConfig
from tcpproxy.demo import echoFactory
from tcpproxy.service import ProxyService
from tcpproxy.tests.loopback import (
    Collector,
    CollectorFactory,
    captureEvents,
    connectClient,
    deadPort,
    echoBackend,
    engineFor,
    listen,
    openSockets,
)


def canListenOn(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


@inlineCallbacks
def echoOnce(port: int, payload: bytes, address: str = "127.0.0.1"):
    """
    Send C{payload} through the proxy port to an echo target, then EOF;
    return what came back, once the connection is closed.
    """
    client = yield connectProtocol(TCP4ClientEndpoint(reactor, address, port, timeout=5), Collector())
    client.transport.write(payload)
    client.transport.loseWriteConnection()
    received = yield client.readDone
    yield client.lost
    return received


class ReloadMixin:
    """
    A L{ProxyService} serving a configuration file that the test rewrites
    and reloads.
    """

    timeout = 30

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.events = captureEvents(self, "tcpproxy")

    def write(self, document):
        with open(self.path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document))

    def serve(self, document) -> ProxyService:
        self.write(document)
        self.service = ProxyService(loadConfig(self.path), reactor, engine=engineFor(self))
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service

    def reloadWith(self, document) -> Deferred:
        self.write(document)
        return self.service.reload()

    def idle(self) -> Deferred:
        return gatherResults([f.whenIdle() for f in self.service._allFactories()])


def app(name, ports, targets, **extra):
    return {"Name": name, "Ports": list(ports), "Targets": [f"127.0.0.1:{t}" for t in targets], **extra}


def document(*apps, **top):
    return {"BindAddress": "127.0.0.1", "Apps": list(apps), **top}


class ReloadLoopbackTests(ReloadMixin, TestCase):
    @inlineCallbacks
    def test_openConnectionKeepsTarget(self):
        """
        A connection open across a reload keeps relaying, byte-exact, to the
        target it had, while its app's targets change; the next client goes
        to the new target.
        """
        first, second = CollectorFactory(), CollectorFactory()
        targetA, targetB = listen(self, first), listen(self, second)
        port = deadPort()
        self.serve(document(app("web", [port], [targetA])))
        client = yield connectClient(port)
        old = yield first.accepted.get()
        before, after = os.urandom(300_000), os.urandom(300_000)
        client.transport.write(before)

        result = yield self.reloadWith(document(app("web", [port], [targetB])))
        self.assertEqual(result.status, APPLIED)

        newcomer = yield connectClient(port)
        fresh = yield second.accepted.get()
        addresses = [f"127.0.0.1:{c.transport.getHost().port}" for c in (client, newcomer)]
        client.transport.write(after)
        client.transport.loseWriteConnection()
        received = yield old.readDone
        self.assertTrue(received == before + after, "bytes relayed across the reload differ")
        reply = os.urandom(200_000)
        old.transport.write(reply)
        old.transport.loseWriteConnection()
        self.assertTrue((yield client.readDone) == reply, "reply across the reload differs")
        newcomer.transport.loseConnection()
        fresh.transport.loseConnection()
        yield DeferredList([client.lost, old.lost, newcomer.lost, fresh.lost])
        yield self.idle()
        targets = {e["client"]: e["target"] for e in self.events if "bytesIn" in e}
        self.assertEqual(
            targets,
            {addresses[0]: f"127.0.0.1:{targetA}", addresses[1]: f"127.0.0.1:{targetB}"},
        )

    @inlineCallbacks
    def test_removedPort(self):
        """
        A removed port refuses new clients, while a client connected to it
        before goes on until it ends by itself.
        """
        backend = CollectorFactory()
        target = listen(self, backend)
        kept, removed = deadPort(), deadPort()
        self.serve(document(app("web", [kept, removed], [target])))
        client = yield connectClient(removed)
        server = yield backend.accepted.get()

        result = yield self.reloadWith(document(app("web", [kept], [target])))
        self.assertEqual(result.plan.removedPorts, ((removed, "web"),))

        yield self.assertFailure(connectClient(removed), ConnectionRefusedError)
        client.transport.write(b"still here")
        client.transport.loseWriteConnection()
        self.assertEqual((yield server.readDone), b"still here")
        server.transport.write(b"and so am I")
        server.transport.loseWriteConnection()
        self.assertEqual((yield client.readDone), b"and so am I")
        yield DeferredList([client.lost, server.lost])
        other = yield connectClient(kept)
        otherServer = yield backend.accepted.get()
        other.transport.loseConnection()
        otherServer.transport.loseConnection()
        yield DeferredList([other.lost, otherServer.lost])

    @inlineCallbacks
    def test_addedPortServes(self):
        target = echoBackend(self)
        first, added = deadPort(), deadPort()
        self.serve(document(app("web", [first], [target])))
        yield self.assertFailure(echoOnce(added, b"x"), ConnectionRefusedError)
        result = yield self.reloadWith(document(app("web", [first], [target]), app("new", [added], [target])))
        self.assertEqual(result.status, APPLIED)
        self.assertEqual((yield echoOnce(added, b"through the new port")), b"through the new port")

    @inlineCallbacks
    def test_invalidFileLeavesEveryPortWorking(self):
        targets = [echoBackend(self), echoBackend(self)]
        ports = [deadPort() for _ in range(3)]
        self.serve(document(app("web", ports[:2], targets), app("api", ports[2:], targets[1:])))
        for broken in ('{"Apps": [', {"Apps": [{"Name": "web", "Ports": [0], "Targets": ["x:1"]}]}):
            result = yield self.reloadWith(broken)
            self.assertEqual(result.status, REFUSED)
        for port in ports:
            self.assertEqual((yield echoOnce(port, b"port %d" % port)), b"port %d" % port)

    @inlineCallbacks
    def test_bindAddressChanged(self):
        """
        A new C{BindAddress} re-binds every port there; the old address
        refuses, a connection accepted on it goes on.  A change the kernel
        cannot make beside the running listeners (to the wildcard address)
        leaves every port as it was, with a message saying why.
        """
        if not canListenOn("127.0.0.2"):
            raise self.skipTest("127.0.0.2 is not a local address here")
        target = echoBackend(self)
        port = deadPort()
        self.serve(document(app("web", [port], [target])))
        client = yield connectClient(port)

        result = yield self.reloadWith(document(app("web", [port], [target]), BindAddress="127.0.0.2"))
        self.assertEqual(result.plan.bindAddress, ("127.0.0.1", "127.0.0.2"))
        self.assertEqual((yield echoOnce(port, b"new address", "127.0.0.2")), b"new address")
        yield self.assertFailure(echoOnce(port, b"old address"), ConnectionRefusedError)
        client.transport.write(b"accepted on the old address")
        client.transport.loseWriteConnection()
        self.assertEqual((yield client.readDone), b"accepted on the old address")

        result = yield self.reloadWith(document(app("web", [port], [target]), BindAddress="0.0.0.0"))
        self.assertEqual(result.status, NOT_APPLIED)
        [error] = result.errors
        self.assertIn("BindAddress not changed, every port stays on 127.0.0.2", error)
        self.assertIn("restart tcpproxy to make this change", error)
        self.assertEqual(self.service.config.bindAddress, "127.0.0.2")
        self.assertEqual((yield echoOnce(port, b"unchanged", "127.0.0.2")), b"unchanged")


class ReloadUnderLoadTests(ReloadMixin, TestCase):
    """
    Twenty reloads in a row while fifty clients keep connecting.
    """

    CLIENTS = 50
    RELOADS = 20
    BETWEEN = 10
    """
    Exchanges completed between two reloads, so that every reload happens
    with clients in every stage of their connection.
    """

    @inlineCallbacks
    def test_noConnectionLostNoListenerLeaked(self):
        """
        Every client of every exchange gets exactly its own bytes back,
        through ports that move between apps and targets that change; two
        connections open through all the reloads relay byte-exact; at the
        end the process holds as many descriptors as at the start.
        """
        echoes = [listen(self, echoFactory()) for _ in range(2)]
        pA, pMoved, pB, pExtra = (deadPort() for _ in range(4))
        configs = [
            document(app("a", [pA, pMoved], echoes), app("b", [pB], echoes[1:])),
            document(
                app("a", [pA], echoes[1:]),
                app("b", [pB, pMoved], list(reversed(echoes)), ConnectTimeout=2),
                app("c", [pExtra], echoes[:1]),
                DrainTimeout=3,
            ),
        ]
        self.serve(configs[0])
        start = openSockets()
        stable = [pA, pMoved, pB]

        long = yield DeferredList([connectClient(port) for port in (pA, pMoved)], fireOnOneErrback=True)
        long = [client for _, client in long]
        longSent = [bytearray(), bytearray()]

        done = [0]
        failures: list[str] = []
        waiters: list[tuple[int, Deferred]] = []
        stopping = [False]

        def completed():
            done[0] += 1
            for waiter in [w for w in waiters if w[0] <= done[0]]:
                waiters.remove(waiter)
                waiter[1].callback(None)

        def afterMore(count):
            d = Deferred()
            waiters.append((done[0] + count, d))
            return d

        @inlineCallbacks
        def worker(number):
            exchange = 0
            while not stopping[0]:
                port = stable[(number + exchange) % len(stable)]
                payload = os.urandom(2000 + number * 37) + b"client %d exchange %d" % (number, exchange)
                try:
                    received = yield echoOnce(port, payload)
                except Exception as e:
                    failures.append(f"client {number} on port {port}: {e!r}")
                    return
                if received != payload:
                    failures.append(
                        f"client {number} on port {port}: {len(received)} of {len(payload)} bytes"
                    )
                    return
                exchange += 1
                completed()

        workers = [worker(n) for n in range(self.CLIENTS)]
        results = []
        for number in range(self.RELOADS):
            yield afterMore(self.BETWEEN)
            for client, sent in zip(long, longSent, strict=True):
                chunk = os.urandom(5000)
                sent += chunk
                client.transport.write(chunk)
            results.append((yield self.reloadWith(configs[(number + 1) % 2])))
        stopping[0] = True
        yield DeferredList(workers)
        for client in long:
            client.transport.loseWriteConnection()
        echoed = yield DeferredList([client.readDone for client in long])
        yield DeferredList([client.lost for client in long])
        yield self.idle()

        self.assertEqual(failures, [])
        self.assertEqual([bytes(data) for _, data in echoed], [bytes(s) for s in longSent])
        self.assertEqual([r.status for r in results], [APPLIED] * self.RELOADS)
        self.assertGreaterEqual(done[0], self.RELOADS * self.BETWEEN)
        self.assertEqual(sorted(self.service.listeningPorts), sorted(stable))
        for _ in range(250):
            if openSockets() <= start:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertLessEqual(openSockets(), start, "sockets leaked")


class TwistedReloadLoopbackTests(ReloadLoopbackTests):
    engine = "twisted"


class TwistedReloadUnderLoadTests(ReloadUnderLoadTests):
    engine = "twisted"
