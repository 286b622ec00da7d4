"""
Targets found in DNS, on real sockets: a real DNS server (L{twisted.names}'
own, on 127.0.0.1, started by the test: never the machine's name servers),
a L{ProxyService} asking it, and clients that see which target answered.
"""

from __future__ import annotations

import json
import os
from itertools import pairwise

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.trial.unittest import TestCase

from tcpproxy.config import DNSSource, loadConfig
from tcpproxy.discovery import DiscoveryResolver, lookUp
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


def _a(name: str, address: str, cls: int = dns.IN) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), dns.A, cls=cls, ttl=1, payload=dns.Record_A(address, 1))


def _cname(name: str, alias: str) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), dns.CNAME, ttl=1, payload=dns.Record_CNAME(alias.encode(), 1))


class AnswerCheckTests(TestCase):
    """
    L{DiscoveryResolver} and L{lookUp} against the test's DNS server, when
    a reply, or records in it, answer another question than the one asked:
    such a reply is ignored (RFC 5452 section 9.1), such records are not
    used (RFC 1034 section 3.6.2), and never become targets.
    """

    timeout = 15

    def setUp(self):
        self.zone = Zone(ttl=1)
        self.server = DNSServer(self, self.zone)
        self.resolver = DiscoveryResolver([("127.0.0.1", self.server.number)], reactor)
        self.addCleanup(self.resolver.stop)

    @inlineCallbacks
    def targets(self, source: DNSSource):
        answer = yield lookUp(self.resolver, source)
        return [str(t) for t in answer.targets]

    @inlineCallbacks
    def test_replyToAnotherQuestionIgnored(self):
        """
        Replies with the id of the query, from the server asked, but another
        question -- another name, type or class -- are ignored and the query
        waits on; one whose question differs only in case is taken (names
        compare without regard to case).
        """
        self.zone.a("web.cluster.test", ["127.0.0.1"])
        self.server.forgeries.extend(
            [
                ([dns.Query(b"evil.example", dns.A)], [_a("evil.example", "10.6.6.1")]),
                ([dns.Query(b"web.cluster.test", dns.MX)], [_a("web.cluster.test", "10.6.6.2")]),
                ([dns.Query(b"web.cluster.test", dns.A, dns.CH)], [_a("web.cluster.test", "10.6.6.3")]),
                ([], [_a("web.cluster.test", "10.6.6.4")]),
                ([dns.Query(b"WEB.Cluster.TEST", dns.A)], [_a("WEB.Cluster.TEST", "127.0.0.2")]),
            ]
        )
        self.assertEqual((yield self.targets(DNSSource("all", "web.cluster.test", 80))), ["127.0.0.2:80"])

    @inlineCallbacks
    def test_recordsOfOtherNamesIgnored(self):
        """
        Of an answer to an A or AAAA question, only the records of the name
        asked, or of the names its CNAME records lead to, are used.
        """
        self.zone.answer(
            "web.cluster.test",
            dns.A,
            [
                _a("evil.example", "10.6.6.1"),
                _cname("web.cluster.test", "one.cluster.test"),
                _cname("One.Cluster.Test", "two.cluster.test"),
                _a("two.cluster.test", "127.0.0.3"),
                _a("other.cluster.test", "10.6.6.2"),
            ],
        )
        self.zone.answer(
            "web.cluster.test",
            dns.AAAA,
            [dns.RRHeader(b"evil.example", dns.AAAA, ttl=1, payload=dns.Record_AAAA("::6", 1))],
        )
        self.assertEqual((yield self.targets(DNSSource("all", "web.cluster.test", 80))), ["127.0.0.3:80"])

    @inlineCallbacks
    def test_aliasChainBounded(self):
        """
        A CNAME chain is followed for 8 steps at most, and not round a loop.
        """

        def chain(name: str, steps: int) -> list[dns.RRHeader]:
            names = [name] + [f"{i}.{name}" for i in range(1, steps + 1)]
            return [_cname(a, b) for a, b in pairwise(names)] + [_a(names[-1], "127.0.0.4")]

        self.zone.answer("eight.cluster.test", dns.A, chain("eight.cluster.test", 8))
        self.zone.answer("nine.cluster.test", dns.A, chain("nine.cluster.test", 9))
        self.zone.answer(
            "loop.cluster.test",
            dns.A,
            [
                _cname("loop.cluster.test", "back.cluster.test"),
                _cname("back.cluster.test", "loop.cluster.test"),
                _a("evil.example", "10.6.6.1"),
            ],
        )
        self.assertEqual((yield self.targets(DNSSource("all", "eight.cluster.test", 80))), ["127.0.0.4:80"])
        self.assertEqual((yield self.targets(DNSSource("all", "nine.cluster.test", 80))), [])
        self.assertEqual((yield self.targets(DNSSource("all", "loop.cluster.test", 80))), [])

    @inlineCallbacks
    def test_otherClassIgnored(self):
        """
        Records of class CH (or any but IN) are not used.
        """
        self.zone.answer(
            "web.cluster.test",
            dns.A,
            [_a("web.cluster.test", "10.6.6.1", cls=dns.CH), _a("web.cluster.test", "127.0.0.1")],
        )
        self.assertEqual((yield self.targets(DNSSource("all", "web.cluster.test", 80))), ["127.0.0.1:80"])

    @inlineCallbacks
    def test_srvOfOtherNamesIgnored(self):
        """
        Of an answer to an SRV question, only the SRV records of class IN
        owned by the name asked are used.
        """

        def srv(name: str, port: int, cls: int = dns.IN) -> dns.RRHeader:
            return dns.RRHeader(
                name.encode(),
                dns.SRV,
                cls=cls,
                ttl=1,
                payload=dns.Record_SRV(10, 1, port, "a.cluster.test", 1),
            )

        self.zone.a("a.cluster.test", ["127.0.0.1"])
        self.zone.answer(
            SRV,
            dns.SRV,
            [srv("_evil._tcp.cluster.test", 6661), srv(SRV, 6662, cls=dns.CH), srv(SRV.upper(), 7001)],
        )
        self.assertEqual((yield self.targets(DNSSource("srv", SRV))), ["127.0.0.1:7001"])
