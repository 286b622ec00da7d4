"""
Tests for L{tcpproxy.proxyaccept}: the PROXY header stage, on
L{StringTransport} and a L{Clock}: what the app's protocol is given (the
address, the bytes after the header, exactly), and each refusal, logged.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcpproxy import access
from tcpproxy.config import AcceptProxyConfig
from tcpproxy.deadlines import IExpiring
from tcpproxy.limits import ConnectionCounter
from tcpproxy.proxyaccept import HeaderStage, HeaderStageFactory, ProxiedAddress
from tcpproxy.proxyproto import LOCAL_V2, PP2_TYPE_AUTHORITY, encodeV2
from tcpproxy.tests.loopback import captureEvents

BALANCER = IPv4Address("TCP", "10.0.0.5", 40000)
STRANGER = IPv4Address("TCP", "192.0.2.7", 40001)
V1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 443\r\n"


@implementer(IHalfCloseableProtocol)
class App(Protocol):
    """
    Stands for the app's protocol: records its address and what it reads.
    """

    def __init__(self, addr) -> None:
        self.addr = addr
        self.data = b""
        self.eof = False
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.lost = reason


class AppFactory(Factory):
    def __init__(self) -> None:
        self.built: list[App] = []

    def buildProtocol(self, addr) -> App:
        protocol = App(addr)
        protocol.factory = self
        self.built.append(protocol)
        return protocol


class CountingGate:
    """
    Stands for the proxy-wide L{tcpproxy.limits.AcceptGate}.
    """

    def __init__(self) -> None:
        self.count = 0

    def connectionOpened(self) -> None:
        self.count += 1

    def connectionClosed(self) -> None:
        self.count -= 1


class HeaderStageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gate = CountingGate()
        self.clock = Clock()
        self.app = AppFactory()
        self.counter = ConnectionCounter()
        self.events = captureEvents(self)

    def connect(self, peer=BALANCER, required=True, timeout=3.0) -> tuple[HeaderStage, StringTransport]:
        settings = AcceptProxyConfig((ipaddress.ip_network("10.0.0.0/8"),), required, timeout)

        def logRefusal(client: str, port: int, reason: str, connectionId: str) -> None:
            access.logRefusal("web", client, port, reason, self.counter.refusals, connectionId)

        factory = HeaderStageFactory(
            settings, self.app, self.clock, logRefusal, self.counter.refusals, self.gate
        )
        stage = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.0.0.1", 443))
        stage.makeConnection(transport)
        return stage, transport

    def assertRefused(self, transport: StringTransport, reason: str) -> None:
        self.assertTrue(transport.disconnecting, "not closed")
        self.assertEqual(self.app.built, [], "the app's protocol was built")
        self.assertEqual(len(self.events), 1, self.events)
        event = self.events[0]
        self.assertIn(reason, event["reason"])
        self.assertEqual(self.counter.refusals, {"proxy_header": 1})

    def test_interfaces(self) -> None:
        stage, _ = self.connect()
        self.assertTrue(verifyObject(IHalfCloseableProtocol, stage))
        self.assertTrue(verifyObject(IExpiring, stage))

    def test_v1SplitOverSegments(self) -> None:
        """
        A header that arrives a byte at a time, then data in the same
        segment as its last byte: the app gets the header's client, and
        every byte after the header, once.
        """
        stage, transport = self.connect()
        data = V1 + b"GET / HTTP/1.0\r\n\r\n"
        for index in range(len(V1) - 1):
            stage.dataReceived(data[index : index + 1])
            self.assertEqual(self.app.built, [])
        stage.dataReceived(data[len(V1) - 1 :])
        [app] = self.app.built
        self.assertEqual(type(app.addr), ProxiedAddress)
        self.assertEqual((app.addr.host, app.addr.port), ("203.0.113.9", 51000))
        self.assertEqual(app.addr.via, BALANCER)
        self.assertIs(app.transport, transport)
        self.assertEqual(app.data, b"GET / HTTP/1.0\r\n\r\n")
        stage.dataReceived(b"more")
        self.assertEqual(app.data, b"GET / HTTP/1.0\r\n\r\nmore")
        self.assertEqual(self.events, [])
        self.assertEqual(self.clock.getDelayedCalls(), [], "the timeout is left behind")

    def test_v2WithDataInOneSegment(self) -> None:
        header = encodeV2(
            ("2001:db8::9", 5000), ("2001:db8::1", 443), ((PP2_TYPE_AUTHORITY, b"example.com"),)
        )
        stage, _ = self.connect()
        stage.dataReceived(header + b"\x00hello\r\n")
        [app] = self.app.built
        self.assertEqual(app.addr.address, IPv6Address("TCP", "2001:db8::9", 5000))
        self.assertEqual(app.addr.header.tlv(PP2_TYPE_AUTHORITY), b"example.com")
        self.assertEqual(app.data, b"\x00hello\r\n")

    def test_local(self) -> None:
        """
        A v2 C{LOCAL} header (a balancer's health check): served with the
        peer's own address.
        """
        stage, _ = self.connect()
        stage.dataReceived(LOCAL_V2 + b"ping")
        [app] = self.app.built
        self.assertEqual(app.addr.address, BALANCER)
        self.assertTrue(app.addr.header.local)
        self.assertEqual(app.data, b"ping")

    def test_halfCloseAndLossPassedOn(self) -> None:
        stage, _ = self.connect()
        stage.dataReceived(V1)
        [app] = self.app.built
        stage.readConnectionLost()
        self.assertTrue(app.eof)
        reason = Failure(ConnectionDone())
        stage.connectionLost(reason)
        self.assertIs(app.lost, reason)

    def test_noHeaderRequired(self) -> None:
        """
        A peer in C{From} that sends data without a header is refused, when
        one is required; nothing of it reaches the app.
        """
        stage, transport = self.connect()
        stage.dataReceived(b"GET / HTTP/1.0\r\n")
        self.assertRefused(transport, "no PROXY header")
        self.assertIn("10.0.0.5:40000", self.events[0]["client"])

    def test_badSignature(self) -> None:
        """
        A signature broken after its first byte is no header: refused.
        """
        stage, transport = self.connect()
        stage.dataReceived(b"\r\n\r\n\x01")
        self.assertRefused(transport, "no PROXY header")

    def test_malformed(self) -> None:
        """
        Each malformed header closes the connection, logged with its reason.
        """
        for data, reason in (
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "v1 line without its 6 fields"),
            (b"PROXY " + b"x" * 120, "v1 line over 107 bytes"),
            (encodeV2(("1.2.3.4", 1), ("5.6.7.8", 2))[:12] + b"\x31\x11\x00\x0c", "v2 unknown version 3"),
            (encodeV2(("1.2.3.4", 1), ("5.6.7.8", 2))[:12] + b"\x2f\x11\x00\x0c", "v2 unknown command 15"),
            (encodeV2(("1.2.3.4", 1), ("5.6.7.8", 2))[:12] + b"\x21\x51\x00\x0c", "v2 unknown family"),
            (
                encodeV2(("1.2.3.4", 1), ("5.6.7.8", 2))[:12] + b"\x21\x21\x00\x0c" + bytes(12),
                "v2 wrong length 12",
            ),
        ):
            self.events.clear()
            self.counter.refusals.clear()
            stage, transport = self.connect()
            stage.dataReceived(data + b"data")
            self.assertRefused(transport, "bad PROXY header: " + reason)
            stage.dataReceived(b"more")
            self.assertEqual(self.app.built, [])

    def test_untrustedRequired(self) -> None:
        """
        With C{Required}, a peer outside C{From} is refused at once.
        """
        _, transport = self.connect(peer=STRANGER)
        self.assertRefused(transport, "not in AcceptProxy.From: a PROXY header is required")
        self.assertIn("192.0.2.7", self.events[0]["client"])

    def test_untrustedSendsHeader(self) -> None:
        """
        Without C{Required}, a peer outside C{From} that sends a header is
        refused all the same.
        """
        stage, transport = self.connect(peer=STRANGER, required=False)
        stage.dataReceived(V1)
        self.assertRefused(transport, "not in AcceptProxy.From: it sent a PROXY header")

    def test_untrustedPlain(self) -> None:
        """
        Without C{Required}, a peer outside C{From} that sends no header is
        served as a plain client, every byte of it.
        """
        stage, _ = self.connect(peer=STRANGER, required=False)
        stage.dataReceived(b"PRO")
        stage.dataReceived(b"FILE x\r\n")
        [app] = self.app.built
        self.assertEqual(app.addr, STRANGER)
        self.assertEqual(app.data, b"PROFILE x\r\n")

    def test_trustedOptional(self) -> None:
        stage, _ = self.connect(required=False)
        stage.dataReceived(b"hello")
        [app] = self.app.built
        self.assertEqual((app.addr, app.data), (BALANCER, b"hello"))

    def test_timeout(self) -> None:
        """
        A peer that has not sent a complete header within C{Timeout}
        seconds (of the app's clock) is closed.
        """
        stage, transport = self.connect(timeout=2.0)
        stage.dataReceived(V1[:10])
        self.clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertRefused(transport, "PROXY header timeout: no complete PROXY header within 2s")

    def test_timeoutOptionalSilent(self) -> None:
        """
        Without C{Required}, a peer silent for C{Timeout} (it waits for the
        server to speak first) is served as a plain client then.
        """
        stage, transport = self.connect(required=False, timeout=1.0)
        self.clock.advance(1.0)
        [app] = self.app.built
        self.assertEqual((app.addr, app.data), (BALANCER, b""))
        self.assertFalse(transport.disconnecting)

    def test_goneBeforeHeader(self) -> None:
        """
        A peer that leaves before a complete header: nothing is built, no
        timer is left.
        """
        stage, transport = self.connect()
        stage.dataReceived(V1[:5])
        stage.readConnectionLost()
        stage.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.app.built, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_acceptGate(self) -> None:
        """
        A connection whose header is awaited counts in the proxy-wide gate
        (it holds a descriptor), until it is handed on, refused, timed out
        or gone.
        """
        stage, _ = self.connect()
        self.assertEqual(self.gate.count, 1)
        stage.dataReceived(V1)
        self.assertEqual(self.gate.count, 0)
        stage, _ = self.connect()
        stage.dataReceived(b"GET /")
        self.assertEqual(self.gate.count, 0)
        self.connect()
        self.assertEqual(self.gate.count, 1)
        self.clock.advance(3)
        self.assertEqual(self.gate.count, 0)
        stage, _ = self.connect()
        stage.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gate.count, 0)
        self.connect(peer=STRANGER)
        self.assertEqual(self.gate.count, 0)
        stage, _ = self.connect(required=False, timeout=1.0)
        self.clock.advance(1)
        self.assertEqual(self.gate.count, 0)
