"""
The PROXY protocol on real loopback sockets, through a whole
L{ProxyService} built from a configuration file, on both engines: a
header received (split or with data) gives the client for everything after
it, a header is sent first to each target, TLS is terminated after the
header, health checks send C{LOCAL}, and a reload applies to new clients.
"""

from __future__ import annotations

import socket
import ssl

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tcpproxy.applying import APPLIED
from tcpproxy.proxyproto import (
    LOCAL_V2,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    encodeV2,
    parse,
)
from tcpproxy.tests.certs import ALPHA, pki
from tcpproxy.tests.loopback import (
    CollectorFactory,
    collectCyclesOnly,
    connectClient,
    deadPort,
    eventually,
    leftForTheCollector,
    listen,
)
from tcpproxy.tests.test_tls import TLSServiceMixin

HEADER_V1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 443\r\n"


def accessEvents(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("log_namespace") == "tcpproxy.access"]


class ProxyProtocolMixin(TLSServiceMixin):
    def app(self, backendPort: int, **keys) -> tuple[dict, int]:
        port = deadPort()
        return {"Name": "pp", "Ports": [port], "Targets": [f"127.0.0.1:{backendPort}"], **keys}, port

    def backend(self) -> tuple[CollectorFactory, int]:
        factory = CollectorFactory()
        return factory, listen(self, factory)

    @inlineCallbacks
    def receivedHeader(self, backends: CollectorFactory, size: int):
        """
        The next target connection: its PROXY header, parsed, and C{size}
        bytes after it.
        """
        target = yield backends.accepted.get()
        yield eventually(
            lambda: (
                parse(bytes(target.data)) is not None
                and len(target.data) >= parse(bytes(target.data))[1] + size
            )
        )
        header, consumed = parse(bytes(target.data))
        return target, header, bytes(target.data[consumed:])

    @inlineCallbacks
    def test_acceptAndSendV2(self):
        """
        A v1 header and data in one segment: the target gets a v2 header
        with the header's client, then the data exactly; the reply comes
        back; the access log names the header's client.
        """
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, AcceptProxy={"From": ["127.0.0.1/32"]}, SendProxy="v2")
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(HEADER_V1 + b"hello")
        target, header, rest = yield self.receivedHeader(backends, 5)
        self.assertEqual((header.version, header.local), (2, False))
        self.assertEqual((header.source, header.destination), (("203.0.113.9", 51000), ("10.0.0.1", 443)))
        self.assertEqual(rest, b"hello")
        target.transport.write(b"reply")
        yield eventually(lambda: bytes(client.data) == b"reply")
        client.transport.loseConnection()
        target.transport.loseConnection()
        yield self.idle()
        [event] = accessEvents(self.events)
        self.assertEqual(event["client"], "203.0.113.9:51000")
        self.assertEqual(event["bytesIn"], 5)
        self.assertEqual(self.service.gate.count, 0)
        # The connection id the proxy logs it with, for the target's log.
        self.assertEqual(header.tlv(PP2_TYPE_UNIQUE_ID), event["connectionId"].encode())

    @inlineCallbacks
    def test_splitHeaderV1Sent(self):
        """
        A v2 header split over segments; C{SendProxy} v1 writes the client
        as a v1 line.
        """
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, AcceptProxy={"From": ["127.0.0.0/8"]}, SendProxy="v1")
        self.serve([app])
        client = yield connectClient(port)
        header = encodeV2(("198.51.100.4", 4000), ("192.0.2.1", 80))
        for index in range(0, len(header), 5):
            client.transport.write(header[index : index + 5])
            yield deferToThread(lambda: None)  # a turn or more between the segments
        client.transport.write(b"data")
        target = yield backends.accepted.get()
        yield eventually(lambda: len(target.data) >= 4 and target.data.endswith(b"data"))
        self.assertEqual(bytes(target.data), b"PROXY TCP4 198.51.100.4 192.0.2.1 4000 80\r\ndata")
        client.transport.loseConnection()
        target.transport.loseConnection()
        yield self.idle()

    @inlineCallbacks
    def test_denyUsesHeaderClient(self):
        """
        C{Deny} is applied to the header's client, not to the balancer.
        """
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, AcceptProxy={"From": ["127.0.0.1/32"]}, Deny=["203.0.113.0/24"])
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(HEADER_V1 + b"hello")
        self.assertEqual((yield client.readDone), b"")
        client.transport.loseConnection()
        self.assertEqual(backends.protocols, [])
        [event] = accessEvents(self.events)
        self.assertEqual((event["client"], event["reason"]), ("203.0.113.9:51000", "denied"))

    @inlineCallbacks
    def test_perClientLimitUsesHeaderClient(self):
        """
        C{MaxConnectionsPerClient} counts the header's clients, not the
        balancer they all come through.
        """
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, AcceptProxy={"From": ["127.0.0.1/32"]}, MaxConnectionsPerClient=1)
        self.serve([app])
        first = yield connectClient(port)
        first.transport.write(HEADER_V1 + b"1")
        target = yield backends.accepted.get()
        yield eventually(lambda: bytes(target.data) == b"1")
        again = yield connectClient(port)
        again.transport.write(HEADER_V1.replace(b"51000", b"51001") + b"2")
        self.assertEqual((yield again.readDone), b"")
        again.transport.loseConnection()
        other = yield connectClient(port)
        other.transport.write(b"PROXY TCP4 203.0.113.10 10.0.0.1 51000 443\r\n3")
        otherTarget = yield backends.accepted.get()
        yield eventually(lambda: bytes(otherTarget.data) == b"3")
        for side in (first, target, other, otherTarget):
            side.transport.loseConnection()
        yield self.idle()
        refused = [e for e in accessEvents(self.events) if e.get("reason")]
        self.assertEqual(
            [(e["client"], e["reason"]) for e in refused], [("203.0.113.9:51001", "MaxConnectionsPerClient")]
        )

    @inlineCallbacks
    def test_sourceHashUsesHeaderClient(self):
        """
        C{"Balance": "source-hash"} keeps each of the header's clients on
        one target, though every connection comes from the same balancer:
        sixteen clients whose headers differ are spread over both targets,
        each on its own target every time.
        """
        first, firstPort = self.backend()
        second, secondPort = self.backend()
        app, port = self.app(firstPort, AcceptProxy={"From": ["127.0.0.1/32"]}, Balance="source-hash")
        app["Targets"].append(f"127.0.0.1:{secondPort}")
        self.serve([app])
        landed: dict[str, set[str]] = {}
        for index in range(32):
            client = f"203.0.113.{index % 16 + 1}"
            before = len(first.protocols)
            connection = yield connectClient(port)
            connection.transport.write(f"PROXY TCP4 {client} 10.0.0.1 {50000 + index} 443\r\nx".encode())
            yield eventually(lambda index=index: len(first.protocols) + len(second.protocols) == index + 1)
            landed.setdefault(client, set()).add("first" if len(first.protocols) > before else "second")
            connection.transport.loseConnection()
        for backends in (first, second):
            for target in backends.protocols:
                target.transport.loseConnection()
        yield self.idle()
        self.assertEqual(len(landed), 16)
        self.assertTrue(all(len(targets) == 1 for targets in landed.values()), landed)
        # Hashed on the balancer's address, all would share one target.
        self.assertEqual(set().union(*landed.values()), {"first", "second"})

    @inlineCallbacks
    def test_malformedReachesNoTarget(self):
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, AcceptProxy={"From": ["127.0.0.1/32"]})
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(b"PROXY TCP4 203.0.113.999 10.0.0.1 51000 443\r\nhello")
        self.assertEqual((yield client.readDone), b"")
        client.transport.loseConnection()
        self.assertEqual(backends.protocols, [])
        [event] = accessEvents(self.events)
        self.assertIn("bad PROXY header: v1 bad address", event["reason"])
        self.assertEqual(self.service.gate.count, 0)
        self.assertTrue(event["client"].startswith("127.0.0.1:"))

    @inlineCallbacks
    def test_plainClientSendV1(self):
        """
        Without C{AcceptProxy}, the header sent carries the peer and the
        proxy's port it connected to.
        """
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, SendProxy="v1")
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(b"x")
        target, header, rest = yield self.receivedHeader(backends, 1)
        mine = client.transport.getHost()
        self.assertEqual((header.source, header.destination), ((mine.host, mine.port), ("127.0.0.1", port)))
        self.assertEqual(rest, b"x")
        client.transport.loseConnection()
        target.transport.loseConnection()
        yield self.idle()

    @inlineCallbacks
    def test_wildcardBindSendsAddressDialled(self):
        """
        On a port bound to every address (C{"BindAddress": "0.0.0.0"}, the
        default), the header's destination is the address the client
        dialled, not the wildcard the port listens on.
        """
        self.bindAddress = "0.0.0.0"
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, SendProxy="v1")
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(b"x")
        target, header, rest = yield self.receivedHeader(backends, 1)
        mine = client.transport.getHost()
        self.assertEqual((header.source, header.destination), ((mine.host, mine.port), ("127.0.0.1", port)))
        client.transport.loseConnection()
        target.transport.loseConnection()
        yield self.idle()

    def ipv6Backend(self) -> tuple[CollectorFactory, int]:
        if not socket.has_ipv6:
            raise SkipTest("no IPv6 here")
        backends = CollectorFactory()
        try:
            listening = reactor.listenTCP(0, backends, interface="::1")
        except CannotListenError:
            raise SkipTest("cannot listen on ::1 here") from None
        self.addCleanup(listening.stopListening)
        return backends, listening.getHost().port

    @inlineCallbacks
    def test_ipv4ClientIPv6Target(self):
        """
        A client and a target of different families: the header describes
        the client's side (TCP4), whatever the target's family.
        """
        backends, backendPort = self.ipv6Backend()
        port = deadPort()
        self.serve([{"Name": "pp", "Ports": [port], "Targets": [f"[::1]:{backendPort}"], "SendProxy": "v1"}])
        client = yield connectClient(port)
        mine = client.transport.getHost()
        client.transport.write(b"x")
        target, header, rest = yield self.receivedHeader(backends, 1)
        self.assertEqual(
            bytes(target.data), f"PROXY TCP4 127.0.0.1 127.0.0.1 {mine.port} {port}\r\nx".encode()
        )
        client.transport.loseConnection()
        target.transport.loseConnection()
        yield self.idle()

    @inlineCallbacks
    def test_ipv6Client(self):
        """
        An IPv6 client (from its v2 header) sent on in v1 to an IPv6 target.
        """
        backends, backendPort = self.ipv6Backend()
        port = deadPort()
        app = {
            "Name": "pp",
            "Ports": [port],
            "Targets": [f"[::1]:{backendPort}"],
            "AcceptProxy": {"From": ["127.0.0.1/32"]},
            "SendProxy": "v1",
        }
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(encodeV2(("2001:db8::7", 7000), ("2001:db8::1", 443)) + b"six")
        target, header, rest = yield self.receivedHeader(backends, 3)
        self.assertEqual(
            bytes(target.data[: target.data.index(b"\r\n")]), b"PROXY TCP6 2001:db8::7 2001:db8::1 7000 443"
        )
        self.assertEqual(rest, b"six")
        client.transport.loseConnection()
        target.transport.loseConnection()
        yield self.idle()

    @inlineCallbacks
    def test_tlsAfterHeader(self):
        """
        A TLS app: the header is read first, TLS terminated after it; the
        v2 header sent carries the SNI name and the TLS version.
        """
        backends, backendPort = self.backend()
        app, port = self.app(
            backendPort,
            AcceptProxy={"From": ["127.0.0.1/32"]},
            SendProxy="v2",
            TLS={"Certificates": [{"Cert": "alpha.pem", "Key": "alpha.key"}]},
        )
        self.serve([app])

        def client() -> bytes:
            context = ssl.create_default_context(cadata=pki()["ca.pem"].decode("ascii"))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(HEADER_V1)
                with context.wrap_socket(raw, server_hostname=ALPHA) as tls:
                    tls.sendall(b"over TLS")
                    return tls.version()

        version = yield deferToThread(client)
        target, header, rest = yield self.receivedHeader(backends, 8)
        self.assertEqual(header.source, ("203.0.113.9", 51000))
        self.assertEqual(header.tlv(PP2_TYPE_AUTHORITY), ALPHA.encode())
        ssl_ = header.tlv(PP2_TYPE_SSL)
        self.assertEqual(ssl_[0], 1)  # PP2_CLIENT_SSL
        self.assertEqual(ssl_[5], PP2_SUBTYPE_SSL_VERSION)
        self.assertEqual(ssl_[8 : 8 + len(version)], version.encode())
        self.assertEqual(rest, b"over TLS")
        target.transport.loseConnection()
        yield self.idle()
        [event] = accessEvents(self.events)
        self.assertEqual(event["client"], "203.0.113.9:51000")

    @inlineCallbacks
    def test_headerBeforeTargetTLS(self):
        """
        With C{TargetTLS}, the header goes first on the TCP connection,
        before the TLS handshake: here to a second app of the proxy that
        reads it, then terminates TLS.
        """
        backends, backendPort = self.backend()
        inner, innerPort = self.app(
            backendPort,
            AcceptProxy={"From": ["127.0.0.1/32"]},
            TLS={"Certificates": [{"Cert": "alpha.pem", "Key": "alpha.key"}]},
        )
        inner["Name"] = "inner"
        outer, port = self.app(innerPort, SendProxy="v1", TargetTLS={"CA": "ca.pem", "ServerName": ALPHA})
        self.serve([inner, outer])
        client = yield connectClient(port)
        mine = client.transport.getHost()
        client.transport.write(b"through two")
        target = yield backends.accepted.get()
        yield eventually(lambda: bytes(target.data) == b"through two")
        client.transport.loseConnection()
        target.transport.loseConnection()
        yield self.idle()
        events = {e["app"]: e for e in accessEvents(self.events)}
        self.assertEqual(events["inner"]["client"], f"{mine.host}:{mine.port}")
        self.assertEqual(events["pp"]["client"], f"{mine.host}:{mine.port}")

    @inlineCallbacks
    def test_perTarget(self):
        """
        A target written as an object with its own C{SendProxy} gets that
        version; the others the app's; a reload that changes a target's
        applies to its next connection.
        """
        first, firstPort = self.backend()
        second, secondPort = self.backend()
        app, port = self.app(firstPort, SendProxy="v2")
        app["Targets"].append({"Address": f"127.0.0.1:{secondPort}", "SendProxy": "v1"})
        self.serve([app])
        versions = []
        for backends, changed in ((first, None), (second, None), (first, "v1"), (second, None)):
            if changed:
                app["Targets"][0] = {"Address": f"127.0.0.1:{firstPort}", "SendProxy": changed}
                self.config([app])
                result = yield self.service.reload()
                self.assertEqual(result.status, APPLIED)
            client = yield connectClient(port)
            client.transport.write(b"x")
            target, header, rest = yield self.receivedHeader(backends, 1)
            versions.append(header.version)
            self.assertEqual(rest, b"x")
            client.transport.loseConnection()
            target.transport.loseConnection()
            yield self.idle()
        self.assertEqual(versions, [2, 1, 1, 1])

    @inlineCallbacks
    def test_freedWithoutTheGarbageCollector(self):
        """
        A connection that came with a header and was sent on with one is
        freed by reference counting once it has ended, as any other: the
        header stages leave no cycle for the cyclic garbage collector.
        """
        from tcpproxy.proxyaccept import HeaderStage
        from tcpproxy.relay import ProxyClientProtocol, ProxyServerProtocol

        backends, backendPort = self.backend()
        app, port = self.app(backendPort, AcceptProxy={"From": ["127.0.0.1/32"]}, SendProxy="v2")
        self.serve([app])
        collectCyclesOnly(self)
        for _ in range(3):
            client = yield connectClient(port)
            client.transport.write(HEADER_V1 + b"x")
            target, _, _ = yield self.receivedHeader(backends, 1)
            client.transport.loseConnection()
            target.transport.loseConnection()
            yield self.idle()
            del client, target
        # Not HeaderSource: the dial's factory, held (as the app's own
        # target-side factory is without SendProxy) by the cycle that
        # Twisted's client endpoint leaves per connect.
        left = yield leftForTheCollector(ProxyServerProtocol, ProxyClientProtocol, HeaderStage)
        self.assertEqual(left, [])

    @inlineCallbacks
    def test_healthCheckSendsLocal(self):
        backends, backendPort = self.backend()
        app, _ = self.app(backendPort, SendProxy="v2", HealthCheck={"Interval": 60})
        self.serve([app])
        probe = yield backends.accepted.get()
        yield probe.readDone
        probe.transport.loseConnection()
        self.assertEqual(bytes(probe.data), LOCAL_V2)

    @inlineCallbacks
    def test_healthCheckV1Unknown(self):
        backends, backendPort = self.backend()
        app, _ = self.app(backendPort, SendProxy="v1", HealthCheck={"Interval": 60})
        self.serve([app])
        probe = yield backends.accepted.get()
        yield probe.readDone
        probe.transport.loseConnection()
        self.assertEqual(bytes(probe.data), b"PROXY UNKNOWN\r\n")

    @inlineCallbacks
    def test_reload(self):
        """
        A reload that changes C{SendProxy} and C{AcceptProxy} applies to new
        connections; one open keeps what it started with.
        """
        backends, backendPort = self.backend()
        app, port = self.app(backendPort, SendProxy="v1")
        self.serve([app])
        before = yield connectClient(port)
        before.transport.write(b"1")
        first, header, _ = yield self.receivedHeader(backends, 1)
        self.assertEqual(header.version, 1)
        self.config([{**app, "SendProxy": "v2", "AcceptProxy": {"From": ["127.0.0.1/32"]}}])
        result = yield self.service.reload()
        self.assertEqual(result.status, APPLIED)
        after = yield connectClient(port)
        after.transport.write(HEADER_V1 + b"2")
        second, header, rest = yield self.receivedHeader(backends, 1)
        self.assertEqual((header.version, header.source, rest), (2, ("203.0.113.9", 51000), b"2"))
        before.transport.write(b"more")
        yield eventually(lambda: first.data.endswith(b"1more"))
        for side in (before, after, first, second):
            side.transport.loseConnection()
        yield self.idle()


class ProxyProtocolFastTests(ProxyProtocolMixin, TestCase):
    pass


class ProxyProtocolTwistedTests(ProxyProtocolMixin, TestCase):
    engine = "twisted"
