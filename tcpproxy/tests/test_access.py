"""
Tests for L{tcpproxy.access}: the record in each C{"AccessLogFormat"}, the
refusal of a bad one, interim records (C{"AccessLogInterval"}) on a
L{Clock}, and a reload that changes the format.
"""

import json
from ipaddress import ip_network

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tcpproxy import access
from tcpproxy.access import FIELDS, InterimRecords, IRecordFormat
from tcpproxy.app import ProxyServerFactory
from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, ConfigError, parseConfig, parseTarget
from tcpproxy.dialer import Dialled, NoTargetAvailable
from tcpproxy.relay import ProxyClientProtocol
from tcpproxy.tests.loopback import captureEvents
from tcpproxy.tests.test_relay import FakeDialer, _ClientMixin, _HalfCloseableTransport

A, B = parseTarget("127.0.0.1:7001"), parseTarget("127.0.0.1:7002")

START = 1_790_000_000.0
"""
The clock at the start of each test: 2026-09-21T14:13:20Z.
"""


class _AppMixin(_ClientMixin):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.dialer = FakeDialer()
        self.dialer.cancelled = []
        self.events = captureEvents(self)

    def serve(self, **settings):
        app = AppConfig("web", (5001,), (A, B), **settings)
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)

    def reconfigure(self, **settings):
        app = AppConfig("web", (5001,), (A, B), **settings)
        self.factory.reconfigure(app, self.factory.balancer, self.dialer, None)

    def targetAnswers(self, index=0, target=A, failures=()):
        client = ProxyClientProtocol()
        transport = _HalfCloseableTransport()
        client.makeConnection(transport)
        self.dialer.calls[index][1].callback(Dialled(target, client, list(failures)))
        return client, transport

    def relayed(self, index=0, sent=b"hello", answer=b"hi", failures=()):
        """
        A client connects, its target answers, each sends, and it stays
        open; returns both sides.
        """
        server, _ = self.connectClient()
        target, _ = self.targetAnswers(index, failures=failures)
        server.dataReceived(sent)
        target.dataReceived(answer)
        return server, target

    def end(self, server, target):
        server.connectionLost(Failure(ConnectionDone()))
        target.connectionLost(Failure(ConnectionDone()))


class FormatTests(_AppMixin, SynchronousTestCase):
    def test_interfaces(self):
        for spec in ("text", "json", "{end}"):
            self.assertTrue(verifyObject(IRecordFormat, access.formatFor(spec)))

    def test_textByDefault(self):
        """
        Without C{"AccessLogFormat"}, the record is today's line.
        """
        self.serve()
        server, target = self.relayed(failures=[(B, "connection refused")])
        self.clock.advance(1.5)
        self.end(server, target)
        [event] = self.events
        self.assertEqual(
            formatEvent(event),
            f"[{server.connectionId}] 127.0.0.1:40000 -> web:5001 -> 127.0.0.1:7001: done after 1.500s, "
            "5 bytes in, 2 bytes out; failed: 127.0.0.1:7002: connection refused",
        )

    def test_textNoTarget(self):
        """
        The text line of a client no target served names no target (it
        is the refusal's shape, C{client -> app:port: what}), not
        C{-> None}.
        """
        self.serve()
        server, _ = self.connectClient()
        self.dialer.calls[0][1].errback(NoTargetAvailable([(A, "connection refused")]))
        server.connectionLost(Failure(ConnectionDone()))
        [event] = self.events
        self.assertEqual(
            formatEvent(event),
            f"[{server.connectionId}] 127.0.0.1:40000 -> web:5001: no target after 0.000s, "
            "0 bytes in, 0 bytes out; failed: 127.0.0.1:7001: connection refused",
        )
        self.assertIsNone(event["target"])

    def test_json(self):
        """
        With C{"json"}, the line is one JSON object with every field, in
        the order of L{FIELDS}; the event's fields are those of the text
        format.
        """
        self.serve(accessLogFormat="json")
        server, target = self.relayed(failures=[(B, "connection refused")])
        self.clock.advance(1.5)
        self.end(server, target)
        [event] = self.events
        line = formatEvent(event)
        self.assertNotIn("\n", line)
        record = json.loads(line)
        self.assertEqual(list(record), list(FIELDS))
        self.assertEqual(
            record,
            {
                "time": "2026-09-21T14:13:21.500Z",
                "connectionId": server.connectionId,
                "client": "127.0.0.1:40000",
                "app": "web",
                "port": 5001,
                "target": "127.0.0.1:7001",
                "failures": ["127.0.0.1:7002: connection refused"],
                "bytesIn": 5,
                "bytesOut": 2,
                "duration": 1.5,
                "end": "done",
                "reason": None,
                "tlsVersion": None,
                "cipher": None,
                "sni": None,
                "alpn": None,
            },
        )
        self.assertEqual(
            (event["bytesIn"], event["end"], event["connectionId"]), (5, "done", server.connectionId)
        )
        self.assertEqual(event["log_level"].name, "info")

    def test_jsonTLSFields(self):
        """
        The TLS fields of a connection whose TLS ended here are written.
        """
        self.serve(accessLogFormat="json")
        server, _ = self.connectClient()
        server.tlsFields = {
            "tlsVersion": "TLSv1.3",
            "cipher": "TLS_AES_128_GCM_SHA256",
            "sni": "a.example",
            "alpn": None,
        }
        target, _ = self.targetAnswers()
        self.end(server, target)
        record = json.loads(formatEvent(self.events[0]))
        self.assertEqual(
            [record[k] for k in ("tlsVersion", "cipher", "sni", "alpn")],
            ["TLSv1.3", "TLS_AES_128_GCM_SHA256", "a.example", None],
        )

    def test_jsonNoTarget(self):
        """
        A client no target could serve is a warning in JSON too, with every
        target's reason.
        """
        self.serve(accessLogFormat="json")
        server, _ = self.connectClient()
        self.dialer.calls[0][1].errback(
            NoTargetAvailable([(A, "connection refused"), (B, "no answer within 5s")])
        )
        server.connectionLost(Failure(ConnectionDone()))
        [event] = self.events
        record = json.loads(formatEvent(event))
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(
            (record["end"], record["target"], record["failures"]),
            (
                "no target",
                None,
                ["127.0.0.1:7001: connection refused", "127.0.0.1:7002: no answer within 5s"],
            ),
        )

    def test_template(self):
        """
        A template is filled in with the fields: C{-} for one with no
        value, the failures joined by C{"; "}, format specs as written.
        """
        self.serve(
            accessLogFormat="{time} {connectionId} {client} {target} {bytesIn}/{bytesOut} "
            "{duration:.1f}s {end} sni={sni} failed={failures} {{braces}}"
        )
        server, target = self.relayed(failures=[(B, "connection refused")])
        self.clock.advance(2.25)
        self.end(server, target)
        self.assertEqual(
            formatEvent(self.events[0]),
            f"2026-09-21T14:13:22.250Z {server.connectionId} 127.0.0.1:40000 127.0.0.1:7001 5/2 2.2s done "
            "sni=- failed=127.0.0.1:7002: connection refused {braces}",
        )

    def test_refusal(self):
        """
        A refusal is a record too: C{end} C{refused}, and the reason.
        """
        self.serve(accessLogFormat="json", deny=(ip_network("127.0.0.0/8"),))
        server, transport = self.connectClient()
        self.assertTrue(transport.disconnecting)
        [event] = self.events
        record = json.loads(formatEvent(event))
        self.assertEqual(
            {k: record[k] for k in ("time", "connectionId", "client", "port", "end", "reason", "bytesIn")},
            {
                "time": "2026-09-21T14:13:20.000Z",
                "connectionId": server.connectionId,
                "client": "127.0.0.1:40000",
                "port": 5001,
                "end": "refused",
                "reason": "denied",
                "bytesIn": 0,
            },
        )
        self.assertEqual(event["log_level"].name, "warn")

    def test_refusalTemplateAndText(self):
        """
        A refusal in a template, and in the default text.
        """
        self.serve(
            accessLogFormat="{connectionId} {end} {reason} {target}", deny=(ip_network("127.0.0.0/8"),)
        )
        first, _ = self.connectClient()
        self.reconfigure(deny=(ip_network("127.0.0.0/8"),))
        second, _ = self.connectClient()
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            [
                f"{first.connectionId} refused denied -",
                f"[{second.connectionId}] 127.0.0.1:40000 -> web:5001: refused (denied)",
            ],
        )

    def test_reloadAppliesToNewConnections(self):
        """
        A reload that changes the format writes the records of connections
        accepted since in the new one; those accepted before keep theirs.
        """
        self.serve()
        old = self.relayed(0)
        self.reconfigure(accessLogFormat="json")
        new = self.relayed(1)
        self.end(*new)
        self.end(*old)
        newLine, oldLine = (formatEvent(e) for e in self.events)
        self.assertEqual(json.loads(newLine)["connectionId"], new[0].connectionId)
        self.assertTrue(
            oldLine.startswith(f"[{old[0].connectionId}] 127.0.0.1:40000 -> web:5001 -> "), oldLine
        )


class IntervalTests(_AppMixin, SynchronousTestCase):
    """
    C{"AccessLogInterval"}: interim records of open connections, on one
    timer per app.
    """

    def test_interimRecords(self):
        """
        A connection open for a multiple of the interval gets an interim
        record (C{end} C{open}, the bytes so far), at most a quarter of the
        interval late; then its final record as usual.
        """
        self.serve(accessLogInterval=10.0)
        server, target = self.relayed()
        self.clock.pump([2.5] * 3 + [2])
        self.assertEqual(self.events, [])
        self.clock.advance(0.5)
        [interim] = self.events
        self.assertEqual(
            formatEvent(interim),
            f"[{server.connectionId}] 127.0.0.1:40000 -> web:5001 -> 127.0.0.1:7001: open for 10.000s, "
            "5 bytes in, 2 bytes out",
        )
        self.assertEqual((interim["end"], interim["duration"]), ("open", 10.0))
        server.dataReceived(b"more")
        self.clock.pump([2.5] * 4)
        self.assertEqual([e["bytesIn"] for e in self.events], [5, 9])
        self.clock.pump([2.5] * 2)
        self.end(server, target)
        self.assertEqual([(e["end"], e["duration"]) for e in self.events[2:]], [("done", 25.0)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eachByItsOwnStart(self):
        """
        Connections accepted at different times are each recorded when
        they have been open for the interval (up to a quarter late), and
        those that end first are not.
        """
        self.serve(accessLogInterval=4.0)
        first = self.relayed(0)
        self.clock.pump([1, 0.5])
        second = self.relayed(1)
        short = self.relayed(2)
        self.clock.advance(0.5)
        self.end(*short)
        del self.events[:]
        self.clock.pump([1, 1])  # 4 s
        self.assertEqual([e["connectionId"] for e in self.events], [first[0].connectionId])
        self.clock.advance(1)  # 5 s: the second is open for 3.5 s
        self.assertEqual(len(self.events), 1)
        self.clock.advance(1)  # 6 s: the second, open 4.5 s, seen on the look after its 4 s
        self.assertEqual([e["connectionId"] for e in self.events][1:], [second[0].connectionId])
        self.assertEqual(self.events[1]["duration"], 4.5)

    def test_oneTimerForAll(self):
        """
        A hundred open connections cost one timer, and none is kept once
        they end.
        """
        self.serve(accessLogInterval=60.0, idleTimeout=0)
        pairs = [self.relayed(i) for i in range(100)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(60)
        self.assertEqual(len(self.events), 100)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for pair in pairs:
            self.end(*pair)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_json(self):
        """
        An interim record in JSON: C{end} C{open}, C{time} the time now.
        """
        self.serve(accessLogInterval=1.0, accessLogFormat="json")
        self.relayed()
        self.clock.pump([0.25] * 4)
        record = json.loads(formatEvent(self.events[0]))
        self.assertEqual(
            (record["end"], record["duration"], record["time"]), ("open", 1.0, "2026-09-21T14:13:21.000Z")
        )

    def test_accessLogOff(self):
        """
        With C{"AccessLog": false}, no interim record is written either, and
        no timer is set for them.
        """
        self.serve(accessLogInterval=1.0, accessLog=False, idleTimeout=0)
        self.relayed()
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer for nothing
        self.clock.pump([0.25] * 20)
        self.assertEqual(self.events, [])

    def test_reloadKeepsEachConnectionsInterval(self):
        """
        A reload that changes the interval applies to new connections; one
        accepted before keeps its own (and one accepted without none gets
        none).
        """
        self.serve()
        before = self.relayed(0)
        self.reconfigure(accessLogInterval=2.0)
        during = self.relayed(1)
        self.reconfigure(accessLogInterval=8.0)
        after = self.relayed(2)
        self.clock.pump([0.5] * 16)
        ids = [e["connectionId"] for e in self.events]
        self.assertEqual(ids.count(before[0].connectionId), 0)
        self.assertEqual(ids.count(during[0].connectionId), 4)
        self.assertEqual(ids.count(after[0].connectionId), 1)


class SweepTests(SynchronousTestCase):
    """
    L{InterimRecords} alone.
    """

    def test_noneOpen(self):
        """
        With nothing open to look at, the timer is not set again.
        """
        clock = Clock()
        records = InterimRecords(clock, lambda: [], lambda record, now: None)
        records.start(4.0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(1)
        self.assertEqual(clock.getDelayedCalls(), [])


class ConfigTests(SynchronousTestCase):
    """
    C{"AccessLogFormat"} and C{"AccessLogInterval"} in a configuration:
    what is taken, and what is refused, in one line naming the file, the
    app, the key and the value.
    """

    def parse(self, defaults=None, **app):
        document = {"Apps": [{"Name": "web", "Ports": [1], "Targets": ["127.0.0.1:2"], **app}]}
        if defaults is not None:
            document["Defaults"] = defaults
        return parseConfig(document, source="proxy.json").apps[0]

    def refusal(self, **app):
        return str(self.assertRaises(ConfigError, self.parse, **app))

    def test_taken(self):
        self.assertEqual((self.parse().accessLogFormat, self.parse().accessLogInterval), ("text", 0.0))
        self.assertEqual(self.parse(AccessLogFormat="json").accessLogFormat, "json")
        self.assertEqual(
            self.parse(AccessLogFormat="{client:>21} {duration:.3f}").accessLogFormat,
            "{client:>21} {duration:.3f}",
        )
        self.assertEqual(self.parse(AccessLogInterval=30).accessLogInterval, 30.0)
        app = self.parse({"AccessLogFormat": "json", "AccessLogInterval": 5}, AccessLogInterval=0)
        self.assertEqual((app.accessLogFormat, app.accessLogInterval), ("json", 0.0))

    def test_unknownPlaceholder(self):
        self.assertEqual(
            self.refusal(AccessLogFormat="{client} {user}"),
            'proxy.json: app "web": key "AccessLogFormat": "{client} {user}" has an unknown placeholder '
            "{user}; the fields are " + ", ".join(FIELDS),
        )

    def test_closePlaceholder(self):
        """
        A placeholder close to a field's name is taken for a typo of it.
        """
        self.assertEqual(
            self.refusal(AccessLogFormat="{bytes_in}"),
            'proxy.json: app "web": key "AccessLogFormat": "{bytes_in}" has an unknown placeholder '
            "{bytes_in} (did you mean {bytesIn}?); the fields are " + ", ".join(FIELDS),
        )

    def test_indexedPlaceholder(self):
        self.assertIn(
            'key "AccessLogFormat": "{failures[0]}" has an unknown placeholder {failures[0]} '
            "(did you mean {failures}?); ",
            self.refusal(AccessLogFormat="{failures[0]}"),
        )
        self.assertIn(
            'key "AccessLogFormat": "{0}" has an unknown placeholder {0}; ',
            self.refusal(AccessLogFormat="{0}"),
        )

    def test_badSpec(self):
        # The rest is Python's message, which its versions word differently.
        self.assertTrue(
            self.refusal(AccessLogFormat="{bytesIn:zz}").startswith(
                'proxy.json: app "web": key "AccessLogFormat": "{bytesIn:zz}" cannot be written: '
            )
        )
        self.assertIn("cannot be written", self.refusal(AccessLogFormat="{target:.3f}"))

    def test_nestedPlaceholder(self):
        self.assertEqual(
            self.refusal(AccessLogFormat="{client:{port}}"),
            'proxy.json: app "web": key "AccessLogFormat": "{client:{port}}" has a placeholder inside '
            "{client}'s format",
        )

    def test_unbalanced(self):
        self.assertEqual(
            self.refusal(AccessLogFormat="{client} }"),
            'proxy.json: app "web": key "AccessLogFormat": "{client} }" is not a template: '
            "Single '}' encountered in format string; write a brace as {{ or }}",
        )

    def test_noPlaceholder(self):
        self.assertEqual(
            self.refusal(AccessLogFormat="JSON"),
            'proxy.json: app "web": key "AccessLogFormat": "JSON" is not "text", "json" or a template with '
            "{field} placeholders",
        )
        self.assertEqual(
            self.refusal(AccessLogFormat=["json"]),
            'proxy.json: app "web": key "AccessLogFormat": ["json"] is not "text", "json" or a template with '
            "{field} placeholders",
        )

    def test_lineBreak(self):
        self.assertEqual(
            self.refusal(AccessLogFormat="{client}\n{end}"),
            'proxy.json: app "web": key "AccessLogFormat": "{client}\\n{end}" has a line break, and a record '
            "is one line",
        )

    def test_inDefaults(self):
        """
        A bad format in C{"Defaults"} is refused as that section's.
        """
        error = self.assertRaises(ConfigError, self.parse, {"AccessLogFormat": "{nope}"})
        self.assertTrue(
            str(error).startswith('proxy.json: "Defaults": key "AccessLogFormat": "{nope}" has an unknown'),
            error,
        )

    def test_interval(self):
        self.assertEqual(
            self.refusal(AccessLogInterval=0.5),
            'proxy.json: app "web": key "AccessLogInterval": 0.5 is less than 1 second: interim records more '
            "often would flood the log (0 turns them off)",
        )
        self.assertEqual(
            self.refusal(AccessLogInterval="60"),
            'proxy.json: app "web": key "AccessLogInterval": "60" is not a number of seconds',
        )
        self.assertEqual(
            self.refusal(AccessLogInterval=-1),
            'proxy.json: app "web": key "AccessLogInterval": -1 must be 0 or more seconds',
        )
