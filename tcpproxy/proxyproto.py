"""
The PROXY protocol, versions 1 and 2, as bytes: a sans-IO codec.

The specification is HAProxy's C{doc/proxy-protocol.txt} ("The PROXY
protocol", versions 1 and 2); section numbers below are that document's.
Nothing here does I/O: L{detect} and L{parse} look at the bytes read so
far, L{encodeV1} and L{encodeV2} return bytes to write.  The stages that
use it are L{tcpproxy.proxyaccept} (receive) and L{tcpproxy.proxysend}
(send).

Why the project's own codec: Twisted's parsers (C{twisted.protocols.haproxy})
live in private modules (C{_v1parser}, C{_v2parser}), keep no TLV and have
no encoder; the C{proxy-protocol} package (PyPI, 0.11.3, last released
2024-04, one maintainer) parses and builds both versions but is built
around its own asyncio reader and result classes.  What is needed here is
small -- exact byte accounting for a header split over segments or followed
by data, a refusal reason for each malformed case, TLVs kept, a header
encoded per connection -- and is tested on the specification's examples
(L{tcpproxy.tests.test_proxyproto}).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""
The 12-byte signature of a version 2 header (section 2.2).
"""

V1_MAX = 107
"""
The longest version 1 line, CRLF included (section 2.1).
"""

V2_HEADER = 16
"""
The fixed part of a version 2 header: signature, version and command,
family and protocol, length (section 2.2).
"""

# Section 2.2: the type of each TLV.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01

UNIQUE_ID_MAX = 128
"""
The longest C{PP2_TYPE_UNIQUE_ID} value (section 2.2.5).
"""

_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_ADDRESS_LENGTHS = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

LOCAL_V2 = V2_SIGNATURE + b"\x20\x00\x00\x00"
"""
A version 2 C{LOCAL} header with no address: what a health check sends
(section 2.2: "the receiver must accept this connection as valid and must
use the real connection endpoints").
"""

UNKNOWN_V1 = b"PROXY UNKNOWN\r\n"
"""
A version 1 header that carries no address (section 2.1), for the same use.
"""


class ProxyHeaderError(ValueError):
    """
    Bytes that are not a valid PROXY header; the text says why, in a few
    words for the log.
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """
    One header, parsed.

    @ivar version: 1 or 2.
    @ivar local: the sender asks for the connection's own addresses to be
        used (a v2 C{LOCAL} command, a v1 C{UNKNOWN}, a v2 C{UNSPEC} or
        C{UNIX} family): C{source} and C{destination} are C{None}.
    @ivar source: the original client, C{(ip, port)}.
    @ivar destination: the address the client connected to, C{(ip, port)}.
    @ivar tlvs: the v2 TLVs, C{(type, value)} in the order sent.
    """

    version: int
    local: bool
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        """
        The value of the first TLV of type C{kind}, or C{None}.
        """
        for type_, value in self.tlvs:
            if type_ == kind:
                return value
        return None


NOT_A_HEADER = 0
"""
What L{detect} says of bytes that start with neither signature.
"""


def detect(data: bytes) -> int | None:
    """
    Which version of header C{data} starts with (told apart by their
    signatures, section 2), as far as C{data} can say.

    @return: 1 or 2; L{NOT_A_HEADER} if C{data} starts with neither
        signature; C{None} if C{data} is a strict prefix of a signature
        (more bytes are needed to tell).
    """
    for version, signature in ((1, V1_SIGNATURE), (2, V2_SIGNATURE)):
        if data[: len(signature)] == signature[: len(data)]:
            return version if len(data) >= len(signature) else None
    return NOT_A_HEADER


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """
    Parse the header at the start of C{data}.

    @return: the header and how many bytes of C{data} it took (what follows
        is the client's first data), or C{None} if C{data} holds only the
        start of a header so far.
    @raise ProxyHeaderError: C{data} does not start with a valid header.
    """
    version = detect(data)
    if version is None:
        return None
    if version == 1:
        return _parseV1(data)
    if version == 2:
        return _parseV2(data)
    raise ProxyHeaderError("bad signature")


def _parseV1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 line over {V1_MAX} bytes")
        return None
    line = data[:end]
    consumed = end + 2
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        # Section 2.1: the receiver must ignore anything before the CRLF.
        return ProxyHeader(1, True), consumed
    if len(fields) != 6:
        raise ProxyHeaderError("v1 line without its 6 fields")
    _, family, src, dst, sport, dport = fields
    if family == b"TCP4":
        kind = ipaddress.IPv4Address
    elif family == b"TCP6":
        kind = ipaddress.IPv6Address
    else:
        raise ProxyHeaderError(f"v1 unknown family {family[:8]!r}")
    source = (_v1Address(kind, src), _v1Port(sport))
    destination = (_v1Address(kind, dst), _v1Port(dport))
    return ProxyHeader(1, False, source, destination), consumed


def _v1Address(kind: type, text: bytes) -> str:
    try:
        return str(kind(text.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"v1 bad address {text[:40]!r}") from None


def _v1Port(text: bytes) -> int:
    # Section 2.1: decimal, 0-65535, no leading zero.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyHeaderError(f"v1 bad port {text[:8]!r}")
    return int(text)


def _parseV2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_HEADER:
        return None
    versionCommand, familyProtocol, length = struct.unpack_from("!BBH", data, 12)
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError(f"v2 unknown version {versionCommand >> 4}")
    command = versionCommand & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"v2 unknown command {command}")
    family, protocol = familyProtocol >> 4, familyProtocol & 0x0F
    if family > _AF_UNIX or protocol > 2:
        raise ProxyHeaderError(f"v2 unknown family or protocol 0x{familyProtocol:02x}")
    consumed = V2_HEADER + length
    if len(data) < consumed:
        return None
    body = data[V2_HEADER:consumed]
    if command == 0:
        # LOCAL (section 2.2): the addresses, if any, are to be ignored.
        return ProxyHeader(2, True), consumed
    addressLength = _ADDRESS_LENGTHS.get(family, 0)
    if length < addressLength:
        raise ProxyHeaderError(f"v2 wrong length {length} for family {family}")
    tlvs = _parseTLVs(body[addressLength:])
    if family == _AF_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family == _AF_INET6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    else:
        # UNSPEC or UNIX: no IP address to use; the receiver uses the
        # connection's own (section 2.2).
        return ProxyHeader(2, True, tlvs=tlvs), consumed
    return ProxyHeader(2, False, source, destination, tlvs), consumed


def _parseTLVs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 0
    while offset < len(data):
        if offset + 3 > len(data):
            raise ProxyHeaderError("v2 wrong length (a TLV cut short)")
        kind, length = struct.unpack_from("!BH", data, offset)
        offset += 3
        if offset + length > len(data):
            raise ProxyHeaderError(f"v2 wrong length (TLV 0x{kind:02x} of {length} bytes cut short)")
        tlvs.append((kind, data[offset : offset + length]))
        offset += length
    return tuple(tlvs)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.split("%", 1)[0])


def _sameFamily(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """
    The two addresses of a header, of one family: an IPv4 address beside an
    IPv6 one is written as IPv4-mapped IPv6 (C{::ffff:a.b.c.d}), as HAProxy
    does, since a header has one family for both (sections 2.1, 2.2).  An
    IPv4-mapped pair is written as IPv4.
    """
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version == 6 and dst.version == 6 and src.ipv4_mapped and dst.ipv4_mapped:
        return src.ipv4_mapped, dst.ipv4_mapped
    if src.version != dst.version:
        if src.version == 4:
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        else:
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, dst


def encodeV1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """
    A version 1 header (section 2.1) for a client at C{source} that
    connected to C{destination} (each C{(ip, port)}).
    """
    src, dst = _sameFamily(source, destination)
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encodeV2(
    source: tuple[str, int], destination: tuple[str, int], tlvs: tuple[tuple[int, bytes], ...] = ()
) -> bytes:
    """
    A version 2 C{PROXY} header over TCP (section 2.2) for a client at
    C{source} that connected to C{destination} (each C{(ip, port)}),
    followed by C{tlvs}, C{(type, value)} each.
    """
    src, dst = _sameFamily(source, destination)
    if src.version == 4:
        familyProtocol = 0x11  # AF_INET, STREAM
        addresses = struct.pack("!4s4sHH", src.packed, dst.packed, source[1], destination[1])
    else:
        familyProtocol = 0x21  # AF_INET6, STREAM
        addresses = struct.pack("!16s16sHH", src.packed, dst.packed, source[1], destination[1])
    extra = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    body = addresses + extra
    if len(body) > 0xFFFF:
        raise ValueError(f"a v2 header of {len(body)} bytes is too long")
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, familyProtocol, len(body)) + body


def sslTLV(version: str | None, cipher: str | None = None) -> tuple[int, bytes]:
    """
    The C{PP2_TYPE_SSL} TLV (section 2.2.6) of a client whose TLS was
    terminated: client flag C{PP2_CLIENT_SSL}, verify 0 (no client
    certificate was asked for), and the version (and cipher) as sub-TLVs.
    """
    subs = b""
    for kind, text in ((PP2_SUBTYPE_SSL_VERSION, version), (PP2_SUBTYPE_SSL_CIPHER, cipher)):
        if text:
            value = text.encode("ascii", "replace")
            subs += struct.pack("!BH", kind, len(value)) + value
    return PP2_TYPE_SSL, struct.pack("!BI", PP2_CLIENT_SSL, 0) + subs
