"""
Targets found in DNS, on real sockets: a real DNS server (L{twisted.names}'
own, on 127.0.0.1, started by the test: never the machine's name servers),
a L{ProxyService} asking it, and clients that see which target answered.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.trial.unittest import TestCase

from tcpproxy.config import loadConfig
from tcpproxy.discovery import DiscoveryResolver
from tcpproxy.service import ProxyService
from tcpproxy.tests.dnsserver import DNSServer, Zone
from tcpproxy.tests.loopback import captureEvents, connectClient, deadPort, engineFor, eventually, listen

SRV = "_echo._tcp.cluster.test"
REFRESH = 1


class _Name(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(self.factory.name)
        self.transport.loseConnection()


def namedBackend(testCase, name: bytes) -> int:
    """
    A target that sends its name to each client, then closes.
    """
    factory = Factory.forProtocol(_Name)
    factory.name = name
    factory.noisy = False
    return listen(testCase, factory)


class DiscoveryLoopbackMixin:
    timeout = 15

    def setUp(self):
        self.zone = Zone(ttl=1)
        self.dns = DNSServer(self, self.zone)
        self.backends = {name: namedBackend(self, name) for name in (b"a", b"b", b"c")}
        for name in self.backends:
            self.zone.a(f"{name.decode()}.cluster.test", ["127.0.0.1"])
        self.events = captureEvents(self, "tcpproxy")

    def records(self, *names: bytes) -> None:
        self.zone.srv(SRV, [(10, 1, self.backends[n], f"{n.decode()}.cluster.test") for n in names])

    def serve(self, **keys) -> ProxyService:
        path = os.path.abspath(self.mktemp())
        self.port = deadPort()
        with open(path, "w") as f:
            json.dump(
                {
                    "BindAddress": "127.0.0.1",
                    "Resolvers": [self.dns.address],
                    "Apps": [
                        {
                            "Name": "echo",
                            "Ports": [self.port],
                            "Targets": [f"srv:{SRV}"],
                            "Refresh": REFRESH,
                            **keys,
                        }
                    ],
                },
                f,
            )
        service = ProxyService(loadConfig(path), reactor, engine=engineFor(self))
        service.startService()
        self.addCleanup(service.stopService)
        self.factory = service.factories["echo"]
        return service

    def targetsAre(self, *names: bytes):
        wanted = {self.backends[n] for n in names}

        def found() -> bool:
            """the app's targets are those of the SRV records"""
            return {t.port for t in self.factory.app.targets} == wanted

        return found

    @inlineCallbacks
    def answers(self, count: int):
        """
        The names of the targets that answered C{count} clients, one after
        the other.
        """
        names = []
        for _ in range(count):
            client = yield connectClient(self.port)
            names.append((yield client.readDone))
            client.transport.loseConnection()
            yield client.lost
        return names

    @inlineCallbacks
    def test_changeReachesClients(self):
        """
        Records changed while the proxy runs: within C{Refresh} + 1 s the
        new target gets clients and the removed one gets none.
        """
        self.records(b"a", b"b")
        self.serve()
        yield eventually(self.targetsAre(b"a", b"b"), REFRESH + 1)
        self.assertEqual(sorted((yield self.answers(4))), [b"a", b"a", b"b", b"b"])
        self.records(b"b", b"c")
        yield eventually(self.targetsAre(b"b", b"c"), REFRESH + 1)
        self.assertEqual(sorted((yield self.answers(4))), [b"b", b"b", b"c", b"c"])

    @inlineCallbacks
    def test_serverStoppedKeepsLastAnswer(self):
        """
        The DNS server stopped: the last good answer is kept (for C{Hold}
        seconds), said once in the log, and clients still reach the targets.
        """
        self.records(b"a", b"b")
        self.serve()
        yield eventually(self.targetsAre(b"a", b"b"), REFRESH + 1)
        yield self.dns.stop()

        def held() -> bool:
            """a failed lookup was logged as held"""
            return any(e.get("discovery") == "held" for e in self.events)

        yield eventually(held, 15)
        self.assertEqual(sorted((yield self.answers(2))), [b"a", b"b"])
        self.assertEqual([e.get("discovery") for e in self.events if "discovery" in e], ["ok", "held"])

    @inlineCallbacks
    def test_noRecordsAtStart(self):
        """
        An SRV name that does not resolve at start-up: the proxy starts, its
        clients are refused with "no target" (logged), and are served once
        the records exist.
        """
        self.serve()

        def unresolved() -> bool:
            """the name was logged as not resolving"""
            return any(e.get("discovery") == "unresolved" for e in self.events)

        yield eventually(unresolved, REFRESH + 1)
        self.assertEqual((yield self.answers(1)), [b""])
        self.assertIn("no target", [e.get("end") for e in self.events])
        self.records(b"c")
        yield eventually(self.targetsAre(b"c"), REFRESH + 1 + 1)
        self.assertEqual((yield self.answers(1)), [b"c"])

    @inlineCallbacks
    def test_resolveAll(self):
        """
        A hostname with C{"Resolve": "all"}: each address is a target.
        """
        self.zone.a("db.cluster.test", ["127.0.0.1"])
        path = os.path.abspath(self.mktemp())
        self.port = deadPort()
        with open(path, "w") as f:
            json.dump(
                {
                    "BindAddress": "127.0.0.1",
                    "Resolvers": [self.dns.address],
                    "Apps": [
                        {
                            "Name": "echo",
                            "Ports": [self.port],
                            "Targets": [f"db.cluster.test:{self.backends[b'a']}"],
                            "Resolve": "all",
                            "Refresh": REFRESH,
                        }
                    ],
                },
                f,
            )
        service = ProxyService(loadConfig(path), reactor, engine=engineFor(self))
        service.startService()
        self.addCleanup(service.stopService)
        self.factory = service.factories["echo"]
        yield eventually(self.targetsAre(b"a"), REFRESH + 1)
        self.assertEqual((yield self.answers(1)), [b"a"])


class DiscoveryLoopbackTests(DiscoveryLoopbackMixin, TestCase):
    pass


class DiscoveryLoopbackTwistedTests(DiscoveryLoopbackMixin, TestCase):
    engine = "twisted"


class ResolverSourcePortTests(TestCase):
    """
    L{DiscoveryResolver} on a real socket, against the test's DNS server.
    """

    timeout = 15

    @inlineCallbacks
    def test_sourcePortPerLookup(self):
        """
        Each lookup is sent from a source port of its own (RFC 5452 section
        9.2: a fixed port leaves only the query id to guess to forge an
        answer), and the sockets opened and closed for it log nothing.
        """
        zone = Zone(ttl=1)
        zone.a("a.cluster.test", ["127.0.0.1"])
        server = DNSServer(self, zone)
        resolver = DiscoveryResolver([("127.0.0.1", server.number)], reactor)
        self.addCleanup(resolver.stop)
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for _ in range(3):
            answers, _, _ = yield resolver.lookupAddress("a.cluster.test")
            self.assertEqual([a.payload.dottedQuad() for a in answers if a.type == dns.A], ["127.0.0.1"])
        globalLogPublisher.removeObserver(logged.append)
        ports = [port for _, port in server.peers]
        self.assertEqual(len(ports), 3)
        # Three ports drawn at random from the kernel's ephemeral range
        # (about 28000 ports): all three the same by chance is unthinkable.
        self.assertGreater(len(set(ports)), 1, f"every lookup came from the same port: {ports}")
        self.assertEqual([e.get("log_format") or e.get("log_text") or e.get("message") for e in logged], [])
