"""
Tests for L{tcpproxy.proxyproto}: the PROXY protocol codec, on the examples
of HAProxy's C{doc/proxy-protocol.txt} and on each malformed case.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import TestCase

from tcpproxy.proxyproto import (
    LOCAL_V2,
    NOT_A_HEADER,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    UNKNOWN_V1,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    detect,
    encodeV1,
    encodeV2,
    parse,
    sslTLV,
)


def v2(
    command: int = 1, family: int = 0x11, body: bytes = b"", version: int = 2, length: int | None = None
) -> bytes:
    """
    A v2 header by hand, as section 2.2 lays it out.
    """
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


INET = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443)


class DetectTests(TestCase):
    def test_versions(self) -> None:
        """
        The two versions are told apart by their signatures; a prefix of
        one is not yet known; anything else is no header.
        """
        self.assertEqual(detect(b"PROXY TCP4 "), 1)
        self.assertEqual(detect(V2_SIGNATURE), 2)
        self.assertIsNone(detect(b"PROX"))
        self.assertIsNone(detect(V2_SIGNATURE[:5]))
        self.assertIsNone(detect(b""))
        self.assertEqual(detect(b"GET / HTTP/1.1\r\n"), NOT_A_HEADER)
        self.assertEqual(detect(b"\r\n\r\nx"), NOT_A_HEADER)


class V1ParseTests(TestCase):
    def test_specExamples(self) -> None:
        """
        Section 2.1's examples, with the data after them left alone.
        """
        line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        self.assertEqual(
            parse(line + b"GET /"),
            (ProxyHeader(1, False, ("192.168.0.1", 56324), ("192.168.0.11", 443)), len(line)),
        )
        line6 = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
        self.assertRaises(ProxyHeaderError, parse, line6)
        line6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 65535\r\n"
        header, consumed = parse(line6)
        self.assertEqual(
            (header.source, header.destination, consumed),
            (("2001:db8::1", 65535), ("2001:db8::2", 65535), len(line6)),
        )

    def test_unknown(self) -> None:
        """
        C{UNKNOWN}: the rest of the line is ignored, the connection's own
        addresses are to be used.
        """
        self.assertEqual(parse(b"PROXY UNKNOWN\r\nx"), (ProxyHeader(1, True), 15))
        line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
        self.assertEqual(parse(line), (ProxyHeader(1, True), len(line)))

    def test_incomplete(self) -> None:
        """
        Each strict prefix of a line is incomplete, not an error.
        """
        line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        for end in range(len(line)):
            self.assertIsNone(parse(line[:end]), line[:end])

    def test_longest(self) -> None:
        """
        The longest line the specification allows (107 bytes with CRLF) is
        parsed; 107 bytes without a CRLF are refused.
        """
        worst = b"PROXY UNKNOWN " + b"f" * (107 - 16) + b"\r\n"
        self.assertEqual(len(worst), 107)
        self.assertEqual(parse(worst)[1], 107)
        error = self.assertRaises(ProxyHeaderError, parse, b"PROXY UNKNOWN " + b"f" * 93)
        self.assertEqual(str(error), "v1 line over 107 bytes")

    def test_malformed(self) -> None:
        """
        A bad family, address, port or field count is refused with a reason.
        """
        for line, reason in (
            (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "v1 unknown family"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "v1 line without its 6 fields"),
            (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "v1 bad address"),
            (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "v1 bad address"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "v1 bad port"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "v1 bad port"),
            (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "v1 line without its 6 fields"),
        ):
            error = self.assertRaises(ProxyHeaderError, parse, line)
            self.assertIn(reason, str(error))


class V2ParseTests(TestCase):
    def test_inet(self) -> None:
        """
        An IPv4 C{PROXY} header with TLVs; what follows is not taken.
        """
        tlvs = b"\x02\x00\x0bexample.com" + b"\x05\x00\x03abc"
        data = v2(body=INET + tlvs)
        header, consumed = parse(data + b"hello")
        self.assertEqual(consumed, len(data))
        self.assertEqual(header.source, ("192.168.0.1", 56324))
        self.assertEqual(header.destination, ("192.168.0.11", 443))
        self.assertEqual(header.tlv(PP2_TYPE_AUTHORITY), b"example.com")
        self.assertEqual(header.tlv(PP2_TYPE_UNIQUE_ID), b"abc")
        self.assertIsNone(header.tlv(PP2_TYPE_SSL))

    def test_inet6(self) -> None:
        body = bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack("!HH", 1000, 2000)
        header, _ = parse(v2(family=0x21, body=body))
        self.assertEqual((header.source, header.destination), (("::1", 1000), ("::2", 2000)))

    def test_local(self) -> None:
        """
        C{LOCAL}: the connection's own addresses are to be used, whatever
        the body holds.
        """
        self.assertEqual(parse(LOCAL_V2), (ProxyHeader(2, True), 16))
        self.assertEqual(parse(v2(command=0, body=INET))[0], ProxyHeader(2, True))

    def test_unspecAndUnix(self) -> None:
        self.assertTrue(parse(v2(family=0x00))[0].local)
        self.assertTrue(parse(v2(family=0x31, body=bytes(216)))[0].local)

    def test_incomplete(self) -> None:
        data = v2(body=INET + b"\x04\x00\x02zz")
        for end in range(len(data)):
            self.assertIsNone(parse(data[:end]))

    def test_malformed(self) -> None:
        """
        Unknown version, command, family or protocol, and wrong lengths are
        each refused with their reason.
        """
        for data, reason in (
            (v2(version=1, body=INET), "v2 unknown version 1"),
            (v2(version=3, body=INET), "v2 unknown version 3"),
            (v2(command=2, body=INET), "v2 unknown command 2"),
            (v2(family=0x41, body=INET), "v2 unknown family"),
            (v2(family=0x13, body=INET), "v2 unknown family or protocol 0x13"),
            (v2(body=INET[:11]), "v2 wrong length 11"),
            (v2(family=0x21, body=INET), "v2 wrong length 12"),
            (v2(body=INET + b"\x04\x00"), "v2 wrong length (a TLV cut short)"),
            (v2(body=INET + b"\x04\x00\x05ab"), "v2 wrong length (TLV 0x04 of 5 bytes cut short)"),
        ):
            error = self.assertRaises(ProxyHeaderError, parse, data)
            self.assertIn(reason, str(error))

    def test_badSignature(self) -> None:
        self.assertRaises(ProxyHeaderError, parse, b"HELLO")


class EncodeTests(TestCase):
    def test_v1(self) -> None:
        self.assertEqual(
            encodeV1(("192.168.0.1", 56324), ("192.168.0.11", 443)),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        )
        self.assertEqual(encodeV1(("::1", 1), ("::2", 2)), b"PROXY TCP6 ::1 ::2 1 2\r\n")

    def test_mixedFamilies(self) -> None:
        """
        One IPv4 and one IPv6 address are both written as IPv6, the IPv4 one
        mapped; two IPv4-mapped addresses are written as IPv4.
        """
        self.assertEqual(encodeV1(("10.0.0.1", 1), ("::2", 2)), b"PROXY TCP6 ::ffff:a00:1 ::2 1 2\r\n")
        self.assertEqual(
            encodeV1(("::ffff:10.0.0.1", 1), ("::ffff:10.0.0.2", 2)), b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
        )
        header, _ = parse(encodeV2(("::1", 1), ("10.0.0.2", 2)))
        self.assertEqual(header.destination, ("::ffff:a00:2", 2))

    def test_v2RoundTrip(self) -> None:
        """
        What L{encodeV2} writes, L{parse} reads back, TLVs included; the
        fixed part is laid out as section 2.2 says.
        """
        tlvs = ((PP2_TYPE_UNIQUE_ID, b"id-1"), sslTLV("TLSv1.3", "TLS_AES_128_GCM_SHA256"))
        data = encodeV2(("192.168.0.1", 56324), ("192.168.0.11", 443), tlvs)
        self.assertEqual(data[:16], V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(data) - 16))
        self.assertEqual(data[16:28], INET)
        header, consumed = parse(data)
        self.assertEqual(consumed, len(data))
        self.assertEqual(header.tlvs, tlvs)
        ssl = header.tlv(PP2_TYPE_SSL)
        self.assertEqual(ssl[:5], b"\x01\x00\x00\x00\x00")
        self.assertEqual(ssl[5:8], bytes([PP2_SUBTYPE_SSL_VERSION]) + struct.pack("!H", 7))
        self.assertEqual(ssl[8:15], b"TLSv1.3")

    def test_healthHeaders(self) -> None:
        self.assertEqual(parse(LOCAL_V2)[0].local, True)
        self.assertEqual(parse(UNKNOWN_V1)[0].local, True)
