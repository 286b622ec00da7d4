"""
PROXY headers sent to targets: an app's C{SendProxy} (C{"v1"} or C{"v2"}),
or a target's own (a target written as an object).

The header goes first on each TCP connection to a target, before any byte
of the client's and before a TLS handshake with the target (C{TargetTLS}):
so it is written in one place, at the bottom of the dial path, by an
endpoint (L{SendProxyEndpoint}) wrapped around each target's TCP endpoint,
under TLS.  Health checks dial through the same endpoints and send a v2
C{LOCAL} header (C{PROXY UNKNOWN} for v1), which says "no client here"
(HAProxy's C{doc/proxy-protocol.txt}, sections 2.1 and 2.2).

A connection's own header is asked of the factory the relay dials with
(L{HeaderSource}, made for the connection): its C{proxyHeader(version)}.
TLS towards the target wraps that factory in its own, which carries the
same C{proxyHeader} down (L{carryProxyHeader}).

What the header says (L{headerFor}): the client (as C{AcceptProxy} read it,
else the peer), the address it connected to, and for v2 the TLVs
C{PP2_TYPE_UNIQUE_ID} (the connection id), C{PP2_TYPE_AUTHORITY} (the SNI
name of a TLS client) and C{PP2_TYPE_SSL} (the TLS version and cipher);
what the proxy does not know itself is passed on from a header it received.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocolFactory,
    IReactorTCP,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpproxy.config import Target
from tcpproxy.proxyproto import (
    LOCAL_V2,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    UNIQUE_ID_MAX,
    UNKNOWN_V1,
    encodeV1,
    encodeV2,
    sslTLV,
)


def connectionId(relay) -> bytes | None:
    """
    The connection id sent as C{PP2_TYPE_UNIQUE_ID}: the one every log line
    of the connection starts with (L{tcpproxy.connid}), so a target's log
    and the proxy's can be matched.
    """
    ident = getattr(relay, "connectionId", None)
    return ident.encode("ascii", "replace") if ident else None


def headerFields(relay) -> tuple[tuple[str, int], tuple[str, int], tuple[tuple[int, bytes], ...]]:
    """
    What the PROXY header of C{relay}'s client says (a
    L{tcpproxy.relay.ProxyServerProtocol}, connected): its source and
    destination, C{(ip, port)} each, and the v2 TLVs.
    """
    proxied = relay.proxied
    received = None if proxied is None else proxied.header
    transport = relay.transport
    if proxied is not None:
        peer = proxied.address
    else:
        peer = transport.getPeer()
    if received is not None and not received.local:
        destination = received.destination
    else:
        host = transport.getHost()
        destination = (host.host, host.port)
    source = (peer.host, peer.port)
    tlvs = []
    tls = relay.tlsFields

    def passOn(kind: int) -> bytes | None:
        return None if received is None else received.tlv(kind)

    # Ours first (a target matches its log with the proxy's); a balancer's
    # id received only where the connection has none of its own.
    unique = connectionId(relay) or passOn(PP2_TYPE_UNIQUE_ID)
    if unique:
        tlvs.append((PP2_TYPE_UNIQUE_ID, unique[:UNIQUE_ID_MAX]))
    if tls:
        if tls.get("sni"):
            tlvs.append((PP2_TYPE_AUTHORITY, tls["sni"].encode("ascii", "replace")))
        if tls.get("alpn"):
            tlvs.append((PP2_TYPE_ALPN, tls["alpn"].encode("ascii", "replace")))
        tlvs.append(sslTLV(tls.get("tlsVersion"), tls.get("cipher")))
    else:
        for kind in (PP2_TYPE_AUTHORITY, PP2_TYPE_ALPN, PP2_TYPE_SSL):
            value = passOn(kind)
            if value is not None:
                tlvs.append((kind, value))
    return source, destination, tuple(tlvs)


def encodeHeader(fields, version: int) -> bytes:
    """
    The header of C{version} (1 or 2) saying L{headerFields}' C{fields}.
    """
    source, destination, tlvs = fields
    if version == 1:
        return encodeV1(source, destination)
    return encodeV2(source, destination, tlvs)


def headerFor(relay, version: int) -> bytes:
    """
    The PROXY header of C{version} (1 or 2) of C{relay}'s client.
    """
    return encodeHeader(headerFields(relay), version)


class HeaderSource(Factory):
    """
    The factory a relay dials its target with when its app has
    C{SendProxy}: the app's target-side factory, and what the connection's
    header says (L{headerFields}, taken when it is made: holding the relay
    instead would make a cycle, relay to target transport to its connector
    to this factory, left for the cyclic garbage collector).
    """

    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory, relay) -> None:
        self.wrappedFactory = wrappedFactory
        self._fields = headerFields(relay)

    def proxyHeader(self, version: int) -> bytes:
        return encodeHeader(self._fields, version)

    def buildProtocol(self, addr):
        return self.wrappedFactory.buildProtocol(addr)


def carryProxyHeader(outer: IProtocolFactory, inner: IProtocolFactory) -> None:
    """
    A factory (C{inner}) made to wrap C{outer} on the way down to the TCP
    connection (TLS towards the target) carries C{outer}'s header with it.
    """
    source = getattr(outer, "proxyHeader", None)
    if source is not None:
        inner.proxyHeader = source


def healthHeader(version: int) -> bytes:
    """
    The header of a connection that carries no client (a health check).
    """
    return LOCAL_V2 if version == 2 else UNKNOWN_V1


@implementer(IHalfCloseableProtocol)
class _HeaderFirst(Protocol):
    """
    Writes the header on a new connection, then hands the transport to the
    protocol it wraps, and steps aside: the transport's C{dataReceived}
    calls go straight to that protocol (an attribute of this instance).
    """

    def __init__(self, wrapped: Protocol, header: bytes) -> None:
        self.wrapped = wrapped
        self._header = header

    def makeConnection(self, transport) -> None:
        self.connected = 1
        self.transport = transport
        transport.write(self._header)
        self.dataReceived = self.wrapped.dataReceived
        self.wrapped.makeConnection(transport)

    def readConnectionLost(self) -> None:
        if IHalfCloseableProtocol.providedBy(self.wrapped):
            self.wrapped.readConnectionLost()
        else:
            # What the transport does for a protocol without half-close.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if IHalfCloseableProtocol.providedBy(self.wrapped):
            self.wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self.connected = 0
        self.wrapped.connectionLost(reason)


class _HeaderFirstFactory(Factory):
    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory, header: bytes) -> None:
        self.wrappedFactory = wrappedFactory
        self.header = header

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return _HeaderFirst(protocol, self.header)


@implementer(IStreamClientEndpoint)
class SendProxyEndpoint:
    """
    Connects through C{endpoint}, and writes a PROXY header of C{version}
    first on the connection: the one of the factory's C{proxyHeader}
    (L{HeaderSource}), or L{healthHeader} for a factory without one.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, version: int) -> None:
        self.endpoint = endpoint
        self.version = version

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        source = getattr(protocolFactory, "proxyHeader", None)
        header = healthHeader(self.version) if source is None else source(self.version)
        connecting = self.endpoint.connect(_HeaderFirstFactory(protocolFactory, header))
        return connecting.addCallback(lambda first: first.wrapped)


def sendingEndpoints(
    endpointForTarget: Callable[[IReactorTCP, Target], IStreamClientEndpoint],
    version: int | None,
    perTarget: Iterable[tuple[Target, int]] = (),
) -> Callable[[IReactorTCP, Target], IStreamClientEndpoint]:
    """
    C{endpointForTarget} (reactor, target -> endpoint), with a PROXY header
    sent first: of C{perTarget}'s version for a target it names (its own
    C{"SendProxy"}), else of C{version}, unless that is C{None}.
    """
    versions = dict(perTarget)
    if version is None and not versions:
        return endpointForTarget

    def endpoint(reactor: IReactorTCP, target: Target) -> IStreamClientEndpoint:
        wanted = versions.get(target, version)
        plain = endpointForTarget(reactor, target)
        return plain if wanted is None else SendProxyEndpoint(plain, wanted)

    return endpoint
