"""
Tests for L{tcpproxy.discovery}: targets found in DNS, on a L{Clock} with
a resolver answering at once (L{Zone}), and on a L{ProxyService} over a
memory reactor.  (A real DNS server and real clients:
L{tcpproxy.tests.test_discovery_loopback}.)
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.config import ConfigError, DNSSource, Target, loadConfig, parseConfig
from tcpproxy.discovery import AppDiscovery, clampTTL, srvWeight
from tcpproxy.service import ProxyService
from tcpproxy.tests.dnsserver import Zone
from tcpproxy.tests.loopback import captureEvents, deadPort


def app(targets, **keys):
    return parseConfig({"Apps": [{"Name": "echo", "Ports": [5001], "Targets": targets, **keys}]}).apps[0]


def t(address: str, weight: int = 1) -> Target:
    host, port = address.rsplit(":", 1)
    return Target(host, int(port), "ipv4", weight)


class ConfigTests(SynchronousTestCase):
    """
    How C{srv:} targets, C{Resolve}, C{Refresh}, C{Hold} and C{Resolvers}
    are read, and refused.
    """

    def refusal(self, document) -> str:
        return str(self.assertRaises(ConfigError, parseConfig, document, "p.json"))

    def test_srv(self):
        echo = app(["srv:_echo._tcp.Service.Example.", "127.0.0.1:7"])
        self.assertEqual(echo.discover, (DNSSource("srv", "_echo._tcp.service.example"),))
        self.assertEqual(echo.targets, (Target("127.0.0.1", 7, "ipv4"),))
        self.assertEqual((echo.refresh, echo.hold), (None, 300.0))

    def test_onlySRV(self):
        """
        An app may have no target but DNS ones.
        """
        self.assertEqual(app(["srv:_echo._tcp.example"]).targets, ())

    def test_resolveAll(self):
        """
        With C{"Resolve": "all"}, a hostname is a DNS source; an IP address
        stays a target.
        """
        echo = app(["db.example:5432", "127.0.0.1:7"], Resolve="all", Refresh=2, Hold=0)
        self.assertEqual(echo.discover, (DNSSource("all", "db.example", 5432),))
        self.assertEqual(echo.targets, (Target("127.0.0.1", 7, "ipv4"),))
        self.assertEqual((echo.refresh, echo.hold), (2.0, 0.0))
        self.assertEqual(app(["db.example:5432"]).discover, ())

    def test_resolveInDefaults(self):
        config = parseConfig(
            {
                "Defaults": {"Resolve": "all"},
                "Apps": [{"Name": "a", "Ports": [1], "Targets": ["db.example:1"]}],
            }
        )
        self.assertEqual(config.apps[0].discover, (DNSSource("all", "db.example", 1),))

    def test_resolvers(self):
        config = parseConfig(
            {
                "Resolvers": ["127.0.0.1:8600", "10.0.0.2", "[::1]:53"],
                "Apps": [{"Name": "a", "Ports": [1], "Targets": ["srv:_a._tcp.x"]}],
            }
        )
        self.assertEqual(config.resolvers, (("127.0.0.1", 8600), ("10.0.0.2", 53), ("::1", 53)))

    def test_refusals(self):
        def one(targets=("srv:_a._tcp.x",), **keys):
            return self.refusal({"Apps": [{"Name": "a", "Ports": [1], "Targets": list(targets), **keys}]})

        self.assertEqual(
            one(Resolve="every"),
            'p.json: app "a": key "Resolve": "every" is not one of "connect" (resolve a hostname on each'
            ' connect) or "all" (every A and AAAA address a target)',
        )
        self.assertIn('key "Refresh": 0.5 is less than 1 second', one(Refresh=0.5))
        self.assertIn('key "Hold": -1 must be 0 or more seconds', one(Hold=-1))
        self.assertIn('key "Targets": "srv:" has no name after srv:', one(targets=["srv:"]))
        self.assertIn('"srv:_a _tcp.x" is not a DNS name after srv:', one(targets=["srv:_a _tcp.x"]))
        self.assertIn('"srv:_a._tcp.x" is listed twice', one(targets=["srv:_a._tcp.x", "srv:_a._tcp.x"]))
        self.assertIn(
            '"Resolvers": "dns.example:53" is not an IP address',
            self.refusal(
                {
                    "Resolvers": ["dns.example:53"],
                    "Apps": [{"Name": "a", "Ports": [1], "Targets": ["srv:_a._tcp.x"]}],
                }
            ),
        )

    def test_helpers(self):
        self.assertEqual([clampTTL(0), clampTTL(30), clampTTL(86400)], [1.0, 30.0, 300.0])
        self.assertEqual([srvWeight(0), srvWeight(5), srvWeight(65535)], [1, 5, 256])


class AppDiscoveryTests(SynchronousTestCase):
    """
    One app's DNS sources on a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.zone = Zone(ttl=30)
        self.changes: list[tuple[Target, ...]] = []
        self.events = captureEvents(self, "tcpproxy.discovery")

    def start(self, targets=("srv:_echo._tcp.example",), **keys) -> AppDiscovery:
        self.discovery = AppDiscovery(
            app(list(targets), **keys),
            self.zone,
            self.clock,
            lambda name: self.changes.append(self.discovery.targets),
        )
        self.discovery.start()
        self.addCleanup(self.discovery.stop)
        return self.discovery

    def messages(self):
        return [e["log_format"].split(":", 1)[1].split("{")[0] + e.get("discovery", "") for e in self.events]

    def test_srvOrderAndWeight(self):
        """
        SRV records give their hosts' addresses with the records' ports:
        lowest priority first (the others as backups), heavier first within
        a priority, the record's weight as the target's.
        """
        self.zone.srv(
            "_echo._tcp.example",
            [(20, 1, 7003, "c.example"), (10, 1, 7001, "a.example"), (10, 5, 7002, "b.example")],
        )
        self.zone.a("a.example", ["127.0.0.1"])
        self.zone.a("b.example", ["127.0.0.2"])
        self.zone.a("c.example", ["127.0.0.3"])
        discovery = self.start()
        self.assertEqual(discovery.targets, (t("127.0.0.2:7002"), t("127.0.0.1:7001"), t("127.0.0.3:7003")))
        self.assertEqual([x.weight for x in discovery.targets], [5, 1, 1])
        # Those of a higher priority are tried only when those of the
        # lowest cannot be reached: backup targets.
        self.assertEqual([x.backup for x in discovery.targets], [False, False, True])
        self.assertEqual(len(self.changes), 1)

    def test_resolveAll(self):
        """
        Every A and AAAA address of a hostname is a target, on its port.
        """
        self.zone.a("db.example", ["127.0.0.1", "127.0.0.2"])
        self.zone.aaaa("db.example", ["::1"])
        discovery = self.start(["db.example:5432"], Resolve="all")
        self.assertEqual(
            discovery.targets, (t("127.0.0.1:5432"), t("127.0.0.2:5432"), Target("::1", 5432, "ipv6"))
        )

    def test_refreshFromTTL(self):
        """
        Without C{Refresh}, the next lookup comes after the records' TTL
        (within 1-300 s); a change is applied then, and only then.
        """
        self.zone.a("db.example", ["127.0.0.1"])
        discovery = self.start(["db.example:1"], Resolve="all")
        self.zone.a("db.example", ["127.0.0.2"])
        self.clock.advance(29.9)
        self.assertEqual(discovery.targets, (t("127.0.0.1:1"),))
        self.clock.advance(0.1)
        self.assertEqual(discovery.targets, (t("127.0.0.2:1"),))
        self.assertEqual(self.changes, [(t("127.0.0.1:1"),), (t("127.0.0.2:1"),)])

    def test_refreshGiven(self):
        self.zone.a("db.example", ["127.0.0.1"])
        discovery = self.start(["db.example:1"], Resolve="all", Refresh=2)
        self.zone.a("db.example", ["127.0.0.2"])
        self.clock.advance(2)
        self.assertEqual(discovery.targets, (t("127.0.0.2:1"),))

    def test_holdLastGood(self):
        """
        A lookup that fails keeps the last good answer for C{Hold} seconds,
        logged once; then the targets are removed, logged once; an answer
        again is logged once more.
        """
        self.zone.a("db.example", ["127.0.0.1"])
        discovery = self.start(["db.example:1"], Resolve="all", Refresh=1, Hold=10)
        self.zone.down = True
        for _ in range(9):
            self.clock.advance(1)
        self.assertEqual(discovery.targets, (t("127.0.0.1:1"),))
        self.clock.advance(1)
        self.assertEqual(discovery.targets, ())
        self.clock.advance(5)
        self.zone.down = False
        self.clock.advance(1)
        self.assertEqual(discovery.targets, (t("127.0.0.1:1"),))
        self.assertEqual(self.changes, [(t("127.0.0.1:1"),), (), (t("127.0.0.1:1"),)])
        self.assertEqual([e.get("discovery") for e in self.events], ["ok", "held", "expired", "ok"])
        self.assertIn(
            "keeping its 1 last target(s) for up to 10 s",
            self.events[1]["log_format"].replace("{count}", "1").replace("{hold:g}", "10"),
        )

    def test_emptyIsHeld(self):
        """
        An answer without records counts as a failed lookup: the last good
        one is kept.
        """
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1")])
        discovery = self.start(Refresh=1)
        self.zone.srv("_echo._tcp.example", [])
        self.clock.advance(1)
        self.assertEqual(discovery.targets, (t("127.0.0.1:7001"),))
        self.assertEqual([e.get("discovery") for e in self.events], ["ok", "held"])

    def test_unresolvedAtStart(self):
        """
        A name that does not resolve at start gives no targets (logged
        once), and is asked again until it does.
        """
        discovery = self.start(Refresh=1)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(discovery.targets, ())
        self.assertEqual(self.changes, [])
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1")])
        self.clock.advance(1)
        self.assertEqual(discovery.targets, (t("127.0.0.1:7001"),))
        self.assertEqual([e.get("discovery") for e in self.events], ["unresolved", "ok"])
        self.assertIn("no such name", self.events[0]["why"])

    def test_noUsableRecordLogged(self):
        """
        An answer whose records are all for another name or class gives no
        target, and the log says why in one line.
        """
        self.zone.answer(
            "db.example",
            dns.A,
            [
                dns.RRHeader(b"evil.example", dns.A, ttl=30, payload=dns.Record_A("10.6.6.1", 30)),
                dns.RRHeader(b"db.example", dns.A, cls=dns.CH, ttl=30, payload=dns.Record_A("10.6.6.2", 30)),
            ],
        )
        discovery = self.start(["db.example:1"], Resolve="all", Refresh=1)
        self.assertEqual(discovery.targets, ())
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            [
                'app "echo": db.example:1 does not resolve (no usable record: 2 record(s) for another'
                " name, class or type ignored): no targets from it until it does"
            ],
        )

    def test_stop(self):
        self.zone.a("db.example", ["127.0.0.1"])
        discovery = self.start(["db.example:1"], Resolve="all", Refresh=1)
        discovery.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ServiceTests(SynchronousTestCase):
    """
    A L{ProxyService} whose app's targets come from DNS.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.zone = Zone(ttl=30)
        self.path = self.mktemp()
        self.events = captureEvents(self, "tcpproxy")

    def write(self, targets, **keys):
        with open(self.path, "w") as f:
            json.dump(
                {
                    "BindAddress": "127.0.0.1",
                    "Resolvers": ["127.0.0.1:1"],
                    "Apps": [{"Name": "echo", "Ports": [deadPort()], "Targets": targets, **keys}],
                },
                f,
            )

    def serve(self, targets, **keys) -> ProxyService:
        self.write(targets, **keys)
        servers = []

        def resolverFactory(given, reactor):
            servers.append(given)
            return self.zone

        self.service = ProxyService(loadConfig(self.path), self.reactor, resolverFactory=resolverFactory)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(servers, [(("127.0.0.1", 1),)])
        return self.service

    def test_startsWithoutTargets(self):
        """
        An SRV name that does not resolve at start-up: the app starts, with
        no target (its clients are refused with "no target").
        """
        service = self.serve(["srv:_echo._tcp.example"], Refresh=1)
        factory = service.factories["echo"]
        self.assertEqual((factory.app.targets, factory.balancer.order()), ((), []))
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1")])
        self.reactor.advance(1)
        self.assertEqual(factory.balancer.order(), [t("127.0.0.1:7001")])

    def test_changeKeepsHealthAndRotation(self):
        """
        A new answer is applied as a reload applies targets: one that stays
        keeps its health (a target down stays down), the rotation goes on.
        """
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1"), (1, 1, 7002, "127.0.0.2")])
        service = self.serve(["srv:_echo._tcp.example", "127.0.0.9:9"], Refresh=1)
        factory = service.factories["echo"]
        a, b, c = t("127.0.0.9:9"), t("127.0.0.1:7001"), t("127.0.0.2:7002")
        self.assertEqual(factory.app.targets, (a, b, c))
        for _ in range(factory.health.fall):
            factory.health.connectFailed(b, "refused")
        self.assertFalse(factory.health.isUp(b))
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1"), (1, 1, 7003, "127.0.0.3")])
        self.reactor.advance(1)
        d = t("127.0.0.3:7003")
        self.assertEqual(factory.app.targets, (a, b, d))
        self.assertFalse(factory.health.isUp(b))
        self.assertEqual(set(factory.stats.targets), {a, b, d})

    def test_weightChange(self):
        """
        A record whose weight alone changed is a change of the app's
        targets: the balancer gets the new weight.
        """
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1"), (1, 1, 7002, "127.0.0.2")])
        service = self.serve(["srv:_echo._tcp.example"], Refresh=1)
        factory = service.factories["echo"]
        self.zone.srv("_echo._tcp.example", [(1, 3, 7001, "127.0.0.1"), (1, 1, 7002, "127.0.0.2")])
        self.reactor.advance(1)
        self.assertEqual([x.weight for x in factory.app.targets], [3, 1])
        firsts = [factory.balancer.order()[0] for _ in range(8)]
        self.assertEqual(firsts.count(t("127.0.0.1:7001")), 6)

    def test_holdExpiredNoTarget(self):
        """
        Once C{Hold} is over without an answer, the targets are removed:
        nothing left to try (clients are refused with "no target").
        """
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1")])
        service = self.serve(["srv:_echo._tcp.example"], Refresh=1, Hold=3)
        factory = service.factories["echo"]
        self.zone.down = True
        self.reactor.advance(1)
        self.reactor.advance(1)
        self.assertEqual(factory.balancer.order(), [t("127.0.0.1:7001")])
        self.reactor.advance(1)
        self.assertEqual((factory.app.targets, factory.balancer.order()), ((), []))

    def test_reloadKeepsFoundTargets(self):
        """
        A reload of the file keeps the targets found in DNS: an unchanged
        file changes nothing.
        """
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1")])
        service = self.serve(["srv:_echo._tcp.example"], Refresh=1)
        result = self.successResultOf(service.reload())
        self.assertEqual(result.status, "no change")
        self.assertEqual(service.factories["echo"].app.targets, (t("127.0.0.1:7001"),))
        self.write(["srv:_echo._tcp.example"], Refresh=1, ConnectTimeout=2)
        result = self.successResultOf(service.reload())
        self.assertEqual(result.status, "applied")
        self.assertEqual(service.factories["echo"].app.targets, (t("127.0.0.1:7001"),))
        self.assertEqual(service.factories["echo"].app.connectTimeout, 2)

    def test_stopped(self):
        """
        A stopped service asks no more.
        """
        self.zone.srv("_echo._tcp.example", [(1, 1, 7001, "127.0.0.1")])
        service = self.serve(["srv:_echo._tcp.example"], Refresh=1)
        self.successResultOf(service.stopService())
        asked = len(self.zone.queries)
        self.reactor.advance(5)
        self.assertEqual(len(self.zone.queries), asked)
