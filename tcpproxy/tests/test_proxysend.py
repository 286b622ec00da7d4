"""
Tests for L{tcpproxy.proxysend}: the header written first on each target
connection (before what the protocol writes, and before TLS), the health
check's header, and what a connection's header says.
"""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcpproxy.config import loadConfig, parseTarget
from tcpproxy.proxyaccept import ProxiedAddress
from tcpproxy.proxyproto import (
    LOCAL_V2,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    ProxyHeader,
    encodeV2,
    parse,
)
from tcpproxy.proxysend import HeaderSource, SendProxyEndpoint, carryProxyHeader, headerFor, sendingEndpoints


class Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello")


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    Connects at once, to a L{StringTransport}.
    """

    def connect(self, factory):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9000))
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)
        return succeed(protocol)


class Relay:
    """
    What L{headerFor} reads of a relay.
    """

    def __init__(self, peer, host, proxied=None, tlsFields=None) -> None:
        self.transport = StringTransport(peerAddress=peer, hostAddress=host)
        self.proxied = proxied
        self.tlsFields = tlsFields or {}


CLIENT = IPv4Address("TCP", "192.0.2.9", 50000)
PORT = IPv4Address("TCP", "127.0.0.1", 7001)


class SendProxyEndpointTests(SynchronousTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IStreamClientEndpoint, SendProxyEndpoint(FakeEndpoint(), 2)))

    def test_headerFirst(self) -> None:
        """
        The connection's header is written before anything the protocol
        writes, and the dial gets the protocol itself.
        """
        endpoint = FakeEndpoint()
        factory = HeaderSource(Factory.forProtocol(Greeter), Relay(CLIENT, PORT))
        result = self.successResultOf(SendProxyEndpoint(endpoint, 1).connect(factory))
        self.assertIsInstance(result, Greeter)
        self.assertEqual(endpoint.transport.value(), b"PROXY TCP4 192.0.2.9 127.0.0.1 50000 7001\r\nhello")

    def test_healthCheck(self) -> None:
        """
        A factory with no connection's header (a health check) sends v2
        C{LOCAL}, or v1 C{UNKNOWN}.
        """
        for version, header in ((2, LOCAL_V2), (1, b"PROXY UNKNOWN\r\n")):
            endpoint = FakeEndpoint()
            self.successResultOf(SendProxyEndpoint(endpoint, version).connect(Factory.forProtocol(Greeter)))
            self.assertEqual(endpoint.transport.value(), header + b"hello")

    def test_carried(self) -> None:
        """
        A factory wrapping the relay's (TLS towards the target) carries its
        header down.
        """
        outer = HeaderSource(Factory.forProtocol(Greeter), Relay(CLIENT, PORT))
        inner = Factory.forProtocol(Greeter)
        carryProxyHeader(outer, inner)
        endpoint = FakeEndpoint()
        self.successResultOf(SendProxyEndpoint(endpoint, 1).connect(inner))
        self.assertTrue(endpoint.transport.value().startswith(b"PROXY TCP4 192.0.2.9 "))


class HeaderForTests(SynchronousTestCase):
    def test_tlsClient(self) -> None:
        relay = Relay(
            IPv6Address("TCP", "2001:db8::9", 4000),
            IPv6Address("TCP", "2001:db8::1", 443),
            tlsFields={
                "sni": "alpha.test",
                "alpn": "h2",
                "tlsVersion": "TLSv1.3",
                "cipher": "TLS_AES_128_GCM_SHA256",
            },
        )
        header, _ = parse(headerFor(relay, 2))
        self.assertEqual((header.source, header.destination), (("2001:db8::9", 4000), ("2001:db8::1", 443)))
        self.assertEqual(header.tlv(PP2_TYPE_AUTHORITY), b"alpha.test")
        self.assertEqual(header.tlv(PP2_TYPE_ALPN), b"h2")
        self.assertIn(b"TLSv1.3", header.tlv(PP2_TYPE_SSL))
        self.assertIsNone(header.tlv(PP2_TYPE_UNIQUE_ID))

    def test_connectionId(self) -> None:
        """
        A relay's connection id goes as C{PP2_TYPE_UNIQUE_ID}, before one
        received.
        """
        received = ProxyHeader(
            2, False, ("198.51.100.7", 1234), ("203.0.113.1", 443), ((PP2_TYPE_UNIQUE_ID, b"lb"),)
        )
        relay = Relay(CLIENT, PORT, ProxiedAddress(CLIENT, received, CLIENT))
        relay.connectionId = "k3x9-17"
        header, _ = parse(headerFor(relay, 2))
        self.assertEqual(header.tlv(PP2_TYPE_UNIQUE_ID), b"k3x9-17")

    def test_passedOn(self) -> None:
        """
        A header received gives the client and destination, and its TLVs
        are passed on where the proxy knows nothing better.
        """
        received = ProxyHeader(
            2,
            False,
            ("198.51.100.7", 1234),
            ("203.0.113.1", 443),
            ((PP2_TYPE_UNIQUE_ID, b"lb-42"), (PP2_TYPE_AUTHORITY, b"example.com")),
        )
        proxied = ProxiedAddress(IPv4Address("TCP", "198.51.100.7", 1234), received, CLIENT)
        header, _ = parse(headerFor(Relay(CLIENT, PORT, proxied), 2))
        self.assertEqual((header.source, header.destination), (("198.51.100.7", 1234), ("203.0.113.1", 443)))
        self.assertEqual(header.tlv(PP2_TYPE_UNIQUE_ID), b"lb-42")
        self.assertEqual(header.tlv(PP2_TYPE_AUTHORITY), b"example.com")

    def test_local(self) -> None:
        """
        A connection that came with a C{LOCAL} header is sent as the peer's
        own.
        """
        proxied = ProxiedAddress(CLIENT, ProxyHeader(2, True), CLIENT)
        self.assertEqual(
            headerFor(Relay(CLIENT, PORT, proxied), 2), encodeV2(("192.0.2.9", 50000), ("127.0.0.1", 7001))
        )


class ExampleTests(SynchronousTestCase):
    def test_examplesLoad(self) -> None:
        """
        The README's two-proxy example configurations are valid.
        """
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples")
        if not os.path.isdir(folder):
            self.skipTest("no examples folder beside the package (an installed copy)")
        edge = loadConfig(os.path.join(folder, "proxy-edge.json")).apps[0]
        inner = loadConfig(os.path.join(folder, "proxy-inner.json")).apps[0]
        self.assertEqual(edge.sendProxy, 2)
        self.assertEqual(str(edge.targets[0]), f"127.0.0.1:{inner.ports[0]}")
        self.assertTrue(inner.acceptProxy.required)


class SendingEndpointsTests(SynchronousTestCase):
    def test_perTarget(self) -> None:
        """
        A target's own version wins; without an app version, the other
        targets get their plain endpoint.
        """
        own, other = parseTarget("127.0.0.1:1"), parseTarget("127.0.0.1:2")
        plain = object()

        def endpointForTarget(reactor, target):
            return plain

        endpoints = sendingEndpoints(endpointForTarget, None, ((own, 1),))
        self.assertEqual(endpoints(None, own).version, 1)
        self.assertIs(endpoints(None, other), plain)
        endpoints = sendingEndpoints(endpointForTarget, 2, ((own, 1),))
        self.assertEqual((endpoints(None, own).version, endpoints(None, other).version), (1, 2))
        self.assertIs(sendingEndpoints(endpointForTarget, None), endpointForTarget)
