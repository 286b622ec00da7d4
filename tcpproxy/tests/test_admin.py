"""
The admin endpoint on real loopback sockets: a L{ProxyService} with an
C{Admin} key, asked over HTTP as Prometheus, a browser or an operator's
C{curl} would ask it, and checked against what the clients did.
"""

from __future__ import annotations

import json
import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tcpproxy.config import AdminConfig, loadConfig
from tcpproxy.service import ProxyService
from tcpproxy.statuspage import renderPage
from tcpproxy.tests.loopback import (
    Collector,
    captureEvents,
    connectClient,
    deadPort,
    echoBackend,
    engineFor,
    eventually,
    listen,
)
from tcpproxy.tests.ports import freePorts


@inlineCallbacks
def request(url: str, method: bytes = b"GET", headers: dict[bytes, list[bytes]] | None = None):
    """
    Ask the admin endpoint; return C{(status code, body text, content type)}.
    """
    from twisted.web.http_headers import Headers

    response = yield Agent(reactor).request(method, url.encode("ascii"), Headers(headers or {}))
    body = yield readBody(response)
    contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
    return response.code, body.decode("utf-8"), contentType


def samples(text: str) -> dict[tuple, float]:
    """
    Every sample of a Prometheus text page, by C{(name, sorted labels)}.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@inlineCallbacks
def echoOnce(port: int, payload: bytes):
    """
    One client through the proxy: send C{payload}, EOF, read until closed.
    """
    client = yield connectClient(port)
    client.transport.write(payload)
    client.transport.loseWriteConnection()
    received = yield client.readDone
    yield client.lost
    return received


class AdminMixin:
    """
    A L{ProxyService} with the admin endpoint on a free loopback port.
    """

    timeout = 30

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.events = captureEvents(self, "tcpproxy")
        self.adminPort, self.appPort, self.otherPort = freePorts(3)

    def document(self, targets: list[str], admin: dict | None = None, **app) -> dict:
        return {
            "BindAddress": "127.0.0.1",
            "DrainTimeout": 5,
            "Admin": admin if admin is not None else {"Listen": f"127.0.0.1:{self.adminPort}"},
            "Apps": [{"Name": "web", "Ports": [self.appPort], "Targets": targets, **app}],
        }

    def write(self, document: dict) -> None:
        with open(self.path, "w") as f:
            json.dump(document, f)

    def serve(self, document: dict) -> ProxyService:
        self.write(document)
        self.service = ProxyService(loadConfig(self.path), reactor, engine=engineFor(self))
        self.service.bind()
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        return self.service

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.adminPort}{path}"

    @inlineCallbacks
    def scrape(self):
        code, text, contentType = yield request(self.url("/metrics"))
        self.assertEqual((code, contentType.split(";")[0]), (200, "text/plain"))
        return samples(text)

    def ended(self, count: int):
        """
        Fires once C{count} connections of the app have ended and been counted.
        """
        factory = self.service.factories["web"]

        def done() -> bool:
            """the proxy counted every connection out"""
            return factory.counter.total == 0 and factory.stats.duration.count == count

        return eventually(done)


class MetricsTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_exactCounts(self):
        """
        After N clients, C{/metrics} reads N accepted and none open, the
        bytes that crossed each way to the byte, each target's connections
        as the access log names them, a dead target's refused connects,
        and N connection durations.
        """
        live = [f"127.0.0.1:{echoBackend(self)}", f"127.0.0.1:{echoBackend(self)}"]
        dead = f"127.0.0.1:{deadPort()}"
        self.serve(self.document([*live, dead], HealthCheck=None))
        payloads = [os.urandom(size) for size in (1, 10, 1000, 65536, 200_000, 7, 300)]
        for payload in payloads:
            received = yield echoOnce(self.appPort, payload)
            self.assertEqual(received, payload)
        yield self.ended(len(payloads))
        found = yield self.scrape()
        app = (("app", "web"),)
        total = sum(map(len, payloads))
        self.assertEqual(found[("tcpproxy_connections_total", app)], len(payloads))
        self.assertEqual(found[("tcpproxy_connections_active", app)], 0)
        self.assertEqual(found[("tcpproxy_bytes_received_total", app)], total)
        self.assertEqual(found[("tcpproxy_bytes_sent_total", app)], total)
        self.assertEqual(found[("tcpproxy_connection_duration_seconds_count", app)], len(payloads))
        records = [e for e in self.events if e.get("log_namespace") == "tcpproxy.access"]
        self.assertEqual(len(records), len(payloads))
        for target in [*live, dead]:
            labels = (("app", "web"), ("target", target))
            served = sum(1 for e in records if e["target"] == target)
            self.assertEqual(found[("tcpproxy_target_connections_total", labels)], served)
            self.assertEqual(found[("tcpproxy_target_connect_seconds_count", labels)], served)
            self.assertEqual(found[("tcpproxy_target_connections_active", labels)], 0)
            failed = sum(1 for e in records for f in e["failures"] if f.startswith(target + ":"))
            self.assertEqual(
                found[
                    ("tcpproxy_target_connect_errors_total", (*labels[:1], ("reason", "refused"), labels[1]))
                ],
                failed,
            )
        self.assertEqual(sum(1 for e in records for f in e["failures"]), 1)
        self.assertEqual(found[("tcpproxy_target_up", (("app", "web"), ("target", dead)))], 0)
        self.assertEqual(found[("tcpproxy_target_up", (("app", "web"), ("target", live[0])))], 1)
        self.assertIn(("process_open_fds", ()), found)
        # Never a client's address in a label.
        for name, labels in found:
            self.assertLessEqual(
                {key for key, _ in labels}, {"app", "target", "reason", "le", "result"}, name
            )

    @inlineCallbacks
    def test_openConnectionCounted(self):
        """
        An open connection counts as active, to its target too, with the
        bytes it has relayed so far (read at scrape time).
        """
        target = f"127.0.0.1:{echoBackend(self)}"
        self.serve(self.document([target]))
        client = yield connectClient(self.appPort)
        client.transport.write(b"x" * 1234)
        yield eventually(lambda: len(client.data) == 1234)
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_connections_active", (("app", "web"),))], 1)
        self.assertEqual(found[("tcpproxy_bytes_received_total", (("app", "web"),))], 1234)
        self.assertEqual(
            found[("tcpproxy_target_connections_active", (("app", "web"), ("target", target)))], 1
        )
        client.transport.loseConnection()
        yield client.lost
        yield self.ended(1)

    @inlineCallbacks
    def test_queueLength(self):
        """
        A client waiting for a target below its C{MaxConnections} counts in
        C{tcpproxy_queue_length}; the one served counts as its target's.
        """
        target = f"127.0.0.1:{echoBackend(self)}"
        self.serve(self.document([{"Address": target, "MaxConnections": 1}], QueueTimeout=20))
        factory = self.service.factories["web"]
        first = yield connectClient(self.appPort)
        second = yield connectClient(self.appPort)
        yield eventually(lambda: len(factory.dispatcher.queue) == 1)
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_queue_length", (("app", "web"),))], 1)
        self.assertEqual(
            found[("tcpproxy_target_connections_active", (("app", "web"), ("target", target)))], 1
        )
        first.transport.loseConnection()
        yield first.lost
        yield eventually(lambda: not factory.dispatcher.queue)
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_queue_length", (("app", "web"),))], 0)
        second.transport.loseConnection()
        yield second.lost
        yield self.ended(2)

    @inlineCallbacks
    def test_refusals(self):
        """
        Clients refused by C{Deny} are counted as C{denied}, and none as accepted.
        """
        self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"], Deny=["127.0.0.0/8"]))
        for _ in range(3):
            client = yield connectClient(self.appPort)
            yield client.readDone  # closed by the proxy
            client.transport.loseConnection()
        found = yield self.scrape()
        refused = {
            dict(labels)["reason"]: value
            for (name, labels), value in found.items()
            if name == "tcpproxy_refused_total"
        }
        self.assertEqual(
            refused, {"denied": 3, "limit": 0, "no_target": 0, "tls_handshake": 0, "draining": 0}
        )
        self.assertEqual(found[("tcpproxy_connections_total", (("app", "web"),))], 0)

    @inlineCallbacks
    def test_tlsHandshakeRefused(self):
        """
        A client that speaks plaintext to a TLS port is refused as
        C{tls_handshake}, and not counted as accepted.
        """
        from tcpproxy.tests.certs import writePKI

        folder = writePKI(os.path.dirname(self.path))
        tls = {
            "Certificates": [
                {"Cert": os.path.join(folder, "alpha.pem"), "Key": os.path.join(folder, "alpha.key")}
            ]
        }
        self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"], TLS=tls))
        client = yield connectClient(self.appPort)
        client.transport.write(b"GET / HTTP/1.0\r\n\r\n")
        yield client.readDone  # dropped by the proxy
        client.transport.loseConnection()
        yield eventually(lambda: self.service.factories["web"].counter.refusals["tls_handshake"] == 1)
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_refused_total", (("app", "web"), ("reason", "tls_handshake")))], 1)
        self.assertEqual(found[("tcpproxy_connections_total", (("app", "web"),))], 0)

    @inlineCallbacks
    def test_noTarget(self):
        """
        A client no target could serve is accepted, then refused as
        C{no_target}; every failed connect is counted by its reason.
        """
        dead = f"127.0.0.1:{deadPort()}"
        self.serve(self.document([dead]))
        for _ in range(2):
            yield echoOnce(self.appPort, b"hello")
        yield self.ended(2)
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_refused_total", (("app", "web"), ("reason", "no_target")))], 2)
        self.assertEqual(found[("tcpproxy_connections_total", (("app", "web"),))], 2)
        self.assertEqual(
            found[
                (
                    "tcpproxy_target_connect_errors_total",
                    (("app", "web"), ("reason", "refused"), ("target", dead)),
                )
            ],
            2,
        )

    @inlineCallbacks
    def test_reloadsCounted(self):
        """
        Reloads are counted by result, and a successful one moves the
        last-load time.
        """
        service = self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"]))
        loaded = service.loadedAt
        yield service.reload()  # nothing changed
        self.write({"Apps": "nonsense"})
        yield service.reload()
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_reloads_total", (("result", "no_change"),))], 1)
        self.assertEqual(found[("tcpproxy_reloads_total", (("result", "refused"),))], 1)
        self.assertEqual(found[("tcpproxy_reloads_total", (("result", "applied"),))], 0)
        self.assertGreaterEqual(found[("tcpproxy_config_last_reload_success_timestamp_seconds", ())], loaded)


class StatusTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_status(self):
        """
        C{/status} lists the app's ports, limits and targets, with states
        and counts; C{/} is the HTML page, refreshing itself, with no
        external asset.
        """
        live = f"127.0.0.1:{echoBackend(self)}"
        dead = f"127.0.0.1:{deadPort()}"
        self.serve(self.document([dead, live], MaxConnections=50))
        yield echoOnce(self.appPort, b"abc")
        yield self.ended(1)
        code, text, contentType = yield request(self.url("/status"))
        self.assertEqual((code, contentType), (200, "application/json"))
        status = json.loads(text)
        self.assertEqual(status["config"]["path"], self.path)
        self.assertTrue(status["ready"])
        [app] = status["apps"]
        self.assertEqual(
            (app["name"], app["ports"], app["limits"]["maxConnections"]), ("web", [self.appPort], 50)
        )
        self.assertEqual(app["connections"]["total"], 1)
        self.assertEqual((app["bytesReceived"], app["bytesSent"]), (3, 3))
        targets = {t["target"]: t for t in app["targets"]}
        self.assertEqual(targets[dead]["state"], "down")
        self.assertEqual(targets[dead]["errors"]["refused"], 1)
        self.assertEqual(targets[dead]["lastError"]["reason"], "connection refused")
        self.assertEqual((targets[live]["state"], targets[live]["connections"]), ("up", 1))

        code, page, contentType = yield request(self.url("/"))
        self.assertEqual((code, contentType), (200, "text/html; charset=utf-8"))
        self.assertIn('<meta http-equiv="refresh"', page)
        self.assertIn(f'<tr class="down"><td>{dead}</td>', page)
        self.assertNotIn("http://", page.replace('http-equiv="refresh"', ""))
        self.assertNotIn("src=", page)

    def test_pageEscapes(self):
        """
        Names are escaped in the page.
        """
        status = {
            "ready": True,
            "config": {"path": "/etc/<x>.json", "loadedAt": 0.0},
            "apps": [
                {
                    "name": "<script>",
                    "ports": [1],
                    "tls": False,
                    "limits": {
                        "maxConnections": None,
                        "maxConnectionsPerClient": None,
                        "connectTimeout": 5.0,
                    },
                    "connections": {"active": 0, "total": 0, "refused": {}},
                    "bytesReceived": 0,
                    "bytesSent": 0,
                    "targets": [],
                }
            ],
        }
        page = renderPage(status, 0.0)
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;", page)

    @inlineCallbacks
    def test_forbidden(self):
        """
        A client outside C{Allow} gets 403 on every page.
        """
        admin = {"Listen": f"127.0.0.1:{self.adminPort}", "Allow": ["10.0.0.0/8"]}
        self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"], admin))
        for path in ("/metrics", "/status", "/", "/ready"):
            code, _, _ = yield request(self.url(path))
            self.assertEqual(code, 403, path)

    @inlineCallbacks
    def test_notFoundAndMethods(self):
        self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"]))
        code, _, _ = yield request(self.url("/nothing"))
        self.assertEqual(code, 404)
        code, _, _ = yield request(self.url("/metrics"), b"POST")
        self.assertEqual(code, 405)


class ReadinessTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_readyThenDraining(self):
        """
        C{/ready} is 200 while serving and 503 from the moment the stop
        begins, while a connection is drained; C{/live} stays 200.
        """
        self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"]))
        code, text, _ = yield request(self.url("/ready"))
        self.assertEqual((code, text), (200, "ready\n"))
        client = yield connectClient(self.appPort)
        yield eventually(lambda: self.service.openConnections() == 1)
        stopped = self.service.stopService()
        code, _, _ = yield request(self.url("/ready"))
        self.assertEqual(code, 503)
        code, _, _ = yield request(self.url("/live"))
        self.assertEqual(code, 200)
        client.transport.loseConnection()
        yield stopped
        with self.assertRaises(ConnectionRefusedError):
            yield request(self.url("/live"))

    @inlineCallbacks
    def test_head(self):
        """
        A C{HEAD} (as a monitoring check makes) is answered with the
        status and the length of the page a C{GET} gets, no body, and no
        warning in the log (twisted.web logs one for every resource that
        returns a body to a C{HEAD}).
        """
        self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"]))
        from twisted.web.http_headers import Headers

        webEvents = captureEvents(self, "twisted.web")
        for path, code in [("/ready", 200), ("/live", 200), ("/nope", 404), ("/metrics", 200)]:
            response = yield Agent(reactor).request(b"HEAD", self.url(path).encode("ascii"), Headers())
            body = yield readBody(response)
            self.assertEqual((response.code, body), (code, b""), path)
            if path != "/metrics":
                _, text, _ = yield request(self.url(path))
                self.assertEqual(
                    response.headers.getRawHeaders(b"content-length"), [str(len(text)).encode()], path
                )
        self.assertEqual([e["log_format"] for e in webEvents if "HEAD" in e.get("log_format", "")], [])


class ConnectionCapTests(AdminMixin, TestCase):
    @inlineCallbacks
    def idle(self, count: int, source: str) -> list[Collector]:
        clients = []
        for _ in range(count):
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.adminPort, bindAddress=(source, 0))
            clients.append((yield connectProtocol(endpoint, Collector())))
        return clients

    @inlineCallbacks
    def test_idleConnectionsCapped(self):
        """
        Idle connections to the admin endpoint are capped, those of clients
        outside C{Allow} apart, so that neither they nor a stuck scraper
        can take the descriptors the relay needs, nor outsiders the places
        of allowed clients: one more is closed at once, and a place freed
        is taken again.
        """
        from tcpproxy.admin import MAX_ALLOWED_CONNECTIONS, MAX_OTHER_CONNECTIONS

        self.serve(
            self.document(
                [f"127.0.0.1:{echoBackend(self)}"],
                admin={"Listen": f"127.0.0.1:{self.adminPort}", "Allow": ["127.0.0.1/32"]},
            )
        )
        others = yield self.idle(MAX_OTHER_CONNECTIONS + 1, "127.0.0.2")
        received = yield others[-1].readDone
        self.assertEqual(received, b"")
        allowed = yield self.idle(MAX_ALLOWED_CONNECTIONS + 1, "127.0.0.1")
        yield allowed[-1].readDone
        self.assertEqual(
            [c.readDone.called for c in allowed[:-1] + others[:-1]],
            [False] * (len(allowed) + len(others) - 2),
        )
        allowed[0].transport.loseConnection()
        yield allowed[0].lost

        @inlineCallbacks
        def served():
            code, text, _ = yield request(self.url("/live"))
            return code, text

        # The freed place is taken again once the endpoint has seen the close.
        result = yield served()
        self.assertEqual(result, (200, "live\n"))
        for client in allowed[1:-1] + others[:-1]:
            client.transport.loseConnection()


class RequestBodyTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_largeBodyNotStored(self):
        """
        A C{POST} with a large body, from a client outside C{Allow}, is
        answered 403 without its body being written anywhere (twisted.web
        writes a body over 100,000 bytes to a temporary file before any
        page is asked): no temporary file, at most L{MAX_BODY} bytes kept.
        """
        import tempfile

        from tcpproxy.admin import MAX_BODY, _AdminRequest

        files = []
        realFile = tempfile.TemporaryFile

        def temporaryFile(*args, **kwargs):
            files.append(args)
            return realFile(*args, **kwargs)

        self.patch(tempfile, "TemporaryFile", temporaryFile)
        kept = []
        handleContentChunk = _AdminRequest.handleContentChunk

        def spy(request, data):
            handleContentChunk(request, data)
            kept.append(request.content.tell())

        self.patch(_AdminRequest, "handleContentChunk", spy)
        self.serve(
            self.document(
                [f"127.0.0.1:{echoBackend(self)}"],
                admin={"Listen": f"127.0.0.1:{self.adminPort}", "Allow": ["127.0.0.1/32"]},
            )
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.adminPort, bindAddress=("127.0.0.2", 0))
        client = yield connectProtocol(endpoint, Collector())
        body = b"x" * (4 * 1024 * 1024)
        client.transport.write(
            b"POST /apps/web/targets/127.0.0.1:1/drain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        answer = yield client.readDone
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer[:100])
        self.assertEqual(files, [])
        self.assertEqual(max(kept), MAX_BODY)


class TargetControlTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_drainAndReady(self):
        """
        A drained target gets no new client while its open connection goes
        on; it shows as C{draining} in C{/status} and 0 in
        C{tcpproxy_target_up}; the change is logged.  C{ready} puts it back.
        """
        first = f"127.0.0.1:{echoBackend(self)}"
        second = f"127.0.0.1:{echoBackend(self)}"
        self.serve(self.document([first, second]))
        held = yield connectClient(self.appPort)  # to the first target
        held.transport.write(b"before")
        yield eventually(lambda: bytes(held.data) == b"before")
        code, text, _ = yield request(self.url(f"/apps/web/targets/{first}/drain"), b"POST")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(text)["state"], "draining")
        logged = [e for e in self.events if e.get("state") == "draining"]
        self.assertEqual([(e["target"], e["app"]) for e in logged], [(first, "web")])
        self.assertIn("POST from 127.0.0.1", logged[0]["why"])

        for _ in range(4):
            yield echoOnce(self.appPort, b"new")
        records = [e for e in self.events if e.get("log_namespace") == "tcpproxy.access"]
        self.assertEqual([e["target"] for e in records], [second] * 4)
        held.transport.write(b"after")
        yield eventually(lambda: bytes(held.data) == b"beforeafter")

        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_target_up", (("app", "web"), ("target", first)))], 0)
        self.assertEqual(
            found[("tcpproxy_target_connections_active", (("app", "web"), ("target", first)))], 1
        )
        code, text, _ = yield request(self.url("/status"))
        states = {t["target"]: t["state"] for t in json.loads(text)["apps"][0]["targets"]}
        self.assertEqual(states, {first: "draining", second: "up"})

        code, text, _ = yield request(self.url(f"/apps/web/targets/{first}/ready"), b"POST")
        self.assertEqual((code, json.loads(text)["state"]), (200, "up"))
        for _ in range(2):
            yield echoOnce(self.appPort, b"new")
        records = [e for e in self.events if e.get("log_namespace") == "tcpproxy.access"]
        self.assertEqual({e["target"] for e in records[-2:]}, {first, second})
        held.transport.loseConnection()
        yield held.lost
        yield self.ended(7)

    @inlineCallbacks
    def test_allDrained(self):
        """
        With every target drained, a new client is refused as C{draining}.
        """
        target = f"127.0.0.1:{echoBackend(self)}"
        self.serve(self.document([target]))
        yield request(self.url(f"/apps/web/targets/{target}/drain"), b"POST")
        client = yield connectClient(self.appPort, Collector())
        yield client.readDone  # closed by the proxy
        client.transport.loseConnection()
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_refused_total", (("app", "web"), ("reason", "draining")))], 1)

    @inlineCallbacks
    def test_unknown(self):
        """
        An unknown app or target is a 404; a GET on a control path a 405.
        """
        target = f"127.0.0.1:{echoBackend(self)}"
        self.serve(self.document([target]))
        code, _, _ = yield request(self.url(f"/apps/nope/targets/{target}/drain"), b"POST")
        self.assertEqual(code, 404)
        code, _, _ = yield request(self.url("/apps/web/targets/127.0.0.1:1/drain"), b"POST")
        self.assertEqual(code, 404)
        code, _, _ = yield request(self.url(f"/apps/web/targets/{target}/drain"))
        self.assertEqual(code, 405)

    @inlineCallbacks
    def test_otherSite(self):
        """
        A POST a browser makes for another site's page (its C{Origin} is
        not the endpoint's) is refused; one from the status page's own
        origin is not.
        """
        target = f"127.0.0.1:{echoBackend(self)}"
        self.serve(self.document([target]))
        url = self.url(f"/apps/web/targets/{target}/drain")
        code, _, _ = yield request(url, b"POST", {b"origin": [b"https://evil.example"]})
        self.assertEqual(code, 403)
        self.assertEqual(
            self.service.factories["web"].health.stateOf(
                next(iter(self.service.factories["web"].health.states))
            ),
            "up",
        )
        code, _, _ = yield request(url, b"POST", {b"origin": [f"http://127.0.0.1:{self.adminPort}".encode()]})
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_drainLastsUntilTargetLeaves(self):
        """
        A reload keeps a drained target drained; one that removes it
        forgets it, so it comes back in rotation if it is added again.
        """
        first = f"127.0.0.1:{echoBackend(self)}"
        second = f"127.0.0.1:{echoBackend(self)}"
        service = self.serve(self.document([first, second]))
        yield request(self.url(f"/apps/web/targets/{first}/drain"), b"POST")
        self.write(self.document([first, second], ConnectTimeout=3))
        yield service.reload()
        health = service.factories["web"].health
        self.assertEqual([health.stateOf(t) for t in health.states], ["draining", "up"])
        self.write(self.document([second]))
        yield service.reload()
        self.write(self.document([first, second]))
        yield service.reload()
        self.assertEqual([health.stateOf(t) for t in health.states], ["up", "up"])


class AdminReloadTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_onMoveOff(self):
        """
        A reload turns the endpoint on, moves it, and turns it off.
        """
        document = self.document([f"127.0.0.1:{echoBackend(self)}"])
        del document["Admin"]
        service = self.serve(document)
        with self.assertRaises(ConnectionRefusedError):
            yield request(self.url("/live"))
        document["Admin"] = {"Listen": f"127.0.0.1:{self.adminPort}"}
        self.write(document)
        result = yield service.reload()
        self.assertEqual(result.plan.describe(), [f"Admin: off -> 127.0.0.1:{self.adminPort}"])
        code, _, _ = yield request(self.url("/live"))
        self.assertEqual(code, 200)

        document["Admin"] = {"Listen": f"127.0.0.1:{self.otherPort}"}
        self.write(document)
        yield service.reload()
        code, _, _ = yield request(self.url("/live", self.otherPort))
        self.assertEqual(code, 200)
        with self.assertRaises(ConnectionRefusedError):
            yield request(self.url("/live"))

        del document["Admin"]
        self.write(document)
        yield service.reload()
        with self.assertRaises(ConnectionRefusedError):
            yield request(self.url("/live", self.otherPort))
        self.assertIsNone(service.config.admin)

    @inlineCallbacks
    def test_moveToBusyPort(self):
        """
        A move to a port that cannot be bound leaves the endpoint where it
        was, and the reload says why.
        """
        service = self.serve(self.document([f"127.0.0.1:{echoBackend(self)}"]))
        document = self.document([f"127.0.0.1:{echoBackend(self)}"], {"Listen": f"127.0.0.1:{self.appPort}"})
        self.write(document)
        result = yield service.reload()
        self.assertIn(f"Admin: cannot listen on 127.0.0.1:{self.appPort}", result.errors[0])
        self.assertEqual(service.config.admin, AdminConfig("127.0.0.1", self.adminPort))
        code, _, _ = yield request(self.url("/live"))
        self.assertEqual(code, 200)


class WarningTests(TestCase):
    def test_notLoopbackWithoutAllow(self):
        """
        An endpoint on an address that is not loopback, with no C{Allow},
        is warned about when it starts listening; with C{Allow}, or on
        loopback, it is not.
        """
        import socket

        from twisted.internet.testing import MemoryReactorClock

        from tcpproxy.admin import AdminServer
        from tcpproxy.config import ProxyConfig

        events = captureEvents(self, "tcpproxy.admin")
        server = AdminServer(type("Service", (), {"config": ProxyConfig(())})(), MemoryReactorClock())
        for admin in (
            AdminConfig("0.0.0.0", 9901),
            AdminConfig("0.0.0.0", 9901, (), True),
            AdminConfig("127.0.0.2", 9901),
        ):
            server._listen(admin, socket.socket())
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual([e["address"] for e in warnings], ["0.0.0.0:9901"])
        self.assertIn("with no Allow: only loopback clients are served", warnings[0]["log_format"])


class ScaleToZeroStatusTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_stoppedShown(self):
        """
        A target stopped by scale to zero shows as C{stopped} in C{/status},
        and as 1 in C{tcpproxy_target_stopped} and 0 in C{tcpproxy_target_up}.
        """
        target = f"127.0.0.1:{echoBackend(self)}"
        self.serve(
            self.document(
                [{"Address": target, "Start": ["true"], "Stop": ["true", "{address}"]}],
                ScaleToZero={"IdleAfter": 0.1},
            )
        )

        def stopDone() -> bool:
            """the target's Stop has run"""
            return any(formatEvent(e) == f"app web: target {target}: Stop done" for e in self.events)

        yield eventually(stopDone)
        code, text, _ = yield request(self.url("/status"))
        states = {t["target"]: t["state"] for t in json.loads(text)["apps"][0]["targets"]}
        self.assertEqual(states, {target: "stopped"})
        found = yield self.scrape()
        self.assertEqual(found[("tcpproxy_target_stopped", (("app", "web"), ("target", target)))], 1)
        self.assertEqual(found[("tcpproxy_target_up", (("app", "web"), ("target", target)))], 0)


class PoolStatusTests(AdminMixin, TestCase):
    @inlineCallbacks
    def test_poolShown(self):
        """
        An app with a warm pool shows, per target, its idle pooled
        connections (C{/metrics}, C{/status} and the page), the clients it
        served with no dial (hits) or not (misses), and the pooled
        connections the target closed: names, types and labels as
        Prometheus' own parser reads them.
        """
        from tcpproxy.tests.test_pool_loopback import GREETING, GreeterFactory

        backend = GreeterFactory()
        target = f"127.0.0.1:{listen(self, backend)}"
        self.serve(self.document([target], Pool={"Size": 2}, HealthCheck=None))
        pool = self.service.factories["web"].dialer

        def full() -> bool:
            """the pool holds two idle connections, each greeted"""
            idle = pool.idle[pool.targets[0]]
            return len(idle) == 2 and all(p.earlySize == len(GREETING) for p in idle)

        yield eventually(full)
        for protocol in list(backend.protocols):
            protocol.transport.loseConnection()
        yield eventually(lambda: len(backend.protocols) == 4)
        yield eventually(full)
        client = yield connectClient(self.appPort)
        client.transport.write(b"hello")
        yield eventually(lambda: bytes(client.data) == GREETING + b"hello")
        client.transport.loseConnection()
        yield client.lost
        yield self.ended(1)
        yield eventually(full)

        code, text, _ = yield request(self.url("/metrics"))
        types = {family.name: family.type for family in text_string_to_metric_families(text)}
        self.assertEqual(
            {name: kind for name, kind in types.items() if "_pool_" in name},
            {
                "tcpproxy_target_pool_idle_connections": "gauge",
                "tcpproxy_target_pool_hits": "counter",
                "tcpproxy_target_pool_misses": "counter",
                "tcpproxy_target_pool_dropped": "counter",
            },
        )
        found = samples(text)
        labels = (("app", "web"), ("target", target))
        self.assertEqual(found[("tcpproxy_target_pool_idle_connections", labels)], 2)
        self.assertEqual(found[("tcpproxy_target_pool_hits_total", labels)], 1)
        self.assertEqual(found[("tcpproxy_target_pool_misses_total", labels)], 0)
        closed = (("app", "web"), ("reason", "closed"), ("target", target))
        expired = (("app", "web"), ("reason", "expired"), ("target", target))
        self.assertEqual(found[("tcpproxy_target_pool_dropped_total", closed)], 2)
        self.assertEqual(found[("tcpproxy_target_pool_dropped_total", expired)], 0)
        # The pooled connections are not the clients': not "active".
        self.assertEqual(found[("tcpproxy_target_connections_active", labels)], 0)

        code, text, _ = yield request(self.url("/status"))
        [app] = json.loads(text)["apps"]
        self.assertEqual(app["pool"], {"size": 2, "maxIdle": 30.0})
        self.assertEqual([(t["target"], t["pooled"], t["active"]) for t in app["targets"]], [(target, 2, 0)])
        code, page, _ = yield request(self.url("/"))
        self.assertIn("<th>pooled (idle)</th>", page)
        self.assertIn('<td class="n pooled">2</td>', page)

    @inlineCallbacks
    def test_noPoolNoSeries(self):
        """
        An app without a pool has no pool series, C{pool} is C{null} in
        C{/status}, and the page has no pooled column.
        """
        target = f"127.0.0.1:{echoBackend(self)}"
        self.serve(self.document([target]))
        code, text, _ = yield request(self.url("/metrics"))
        self.assertNotIn("_pool_", "".join(name for name, _ in samples(text)))
        code, text, _ = yield request(self.url("/status"))
        [app] = json.loads(text)["apps"]
        self.assertEqual((app["pool"], app["targets"][0]["pooled"]), (None, 0))
        code, page, _ = yield request(self.url("/"))
        self.assertNotIn("pooled", page)
