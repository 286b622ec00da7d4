"""
The PROXY header stage: the first bytes of a connection to an app with
C{AcceptProxy}, read before anything else sees the client.

A balancer in front of the proxy (HAProxy, a cloud load balancer) starts
each connection with a header that says who the client is
(L{tcpproxy.proxyproto}).  This stage reads it off the accepted
transport, then builds the app's protocol -- the relay, or TLS termination
in front of it -- with the address from the header, so that every later
step takes the header's client for the client: C{Allow}/C{Deny}, the
per-client limits, the access log, C{SendProxy}.  TLS is terminated after
the header, as the header comes before the TLS bytes.

The shape is that of Twisted's C{twisted.protocols.haproxy} wrapper: a
sans-IO parser behind a thin protocol.  Unlike that wrapper, it steps out
of the way once the header is read: the app's protocol gets the transport
itself (its writes, producers and splicing go straight to it), and the
transport's C{dataReceived} calls go straight to the app's protocol (an
attribute of this instance), so a connection costs nothing more per byte.

The rules (the C{AcceptProxy} key, L{tcpproxy.config.AcceptProxyConfig}):

  - Only a peer in C{From} may send a header; anyone else who sends one is
    refused.  With C{Required}, a peer outside C{From} is refused at once,
    and one in it that sends no header is refused; without, either is
    served with its own address.
  - A v2 C{LOCAL} header (a balancer's health check), a v1 C{UNKNOWN}, or a
    v2 C{UNSPEC}/C{UNIX} family: served with the peer's own address.
  - A malformed header closes the connection, logged with the peer and the
    reason; no byte reaches a target.
  - A peer that has not sent a complete header within C{Timeout} seconds
    is closed (timed by the app's clock, through one timer for all,
    L{tcpproxy.deadlines.Deadlines}).  Without C{Required}, a peer whose
    first bytes are still too few to tell a header from data is served as
    a plain client then (a client that waits for the server to speak first
    waits C{Timeout} seconds: the price of an optional header).
  - Whatever follows the header in the same segment, or arrives in the
    same read as its last bytes, is handed to the app's protocol, exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpproxy.config import AcceptProxyConfig
from tcpproxy.connid import newConnectionId
from tcpproxy.deadlines import Deadlines, IExpiring
from tcpproxy.describe import describeAddress
from tcpproxy.limits import permitted
from tcpproxy.proxyproto import NOT_A_HEADER, ProxyHeader, ProxyHeaderError, detect, parse

REFUSED_PROXY_HEADER = "proxy_header"
"""
What every refusal of the header stage is counted as, in the app's
refusals (the C{reason} label of C{tcpproxy_refused_total}).
"""

# Why a client was refused by the header stage, as logged.
REFUSED_NO_HEADER = "no PROXY header"
REFUSED_UNTRUSTED = "not in AcceptProxy.From"
REFUSED_BAD_HEADER = "bad PROXY header"
REFUSED_HEADER_TIMEOUT = "PROXY header timeout"


class ProxiedAddress:
    """
    The client of a connection as a PROXY header gave it: what the header
    stage hands to the app's factory as C{buildProtocol}'s address.

    @ivar address: the client (an L{IPv4Address} or L{IPv6Address}).
    @ivar header: the header (L{ProxyHeader}), with its destination and TLVs.
    @ivar via: the peer that sent the header (the balancer).
    """

    __slots__ = ("address", "header", "via")

    def __init__(self, address: IPv4Address | IPv6Address, header: ProxyHeader, via) -> None:
        self.address = address
        self.header = header
        self.via = via

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port

    def __repr__(self) -> str:
        return f"<ProxiedAddress {describeAddress(self.address)} via {describeAddress(self.via)}>"


def _address(ip: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in ip:
        return IPv6Address("TCP", ip, port)
    return IPv4Address("TCP", ip, port)


@implementer(IHalfCloseableProtocol, IExpiring)
class HeaderStage(Protocol):
    """
    Reads a connection's PROXY header (or finds it has none), then hands
    the transport to the app's protocol.

    @ivar wrapped: the app's protocol, once built.
    """

    factory: HeaderStageFactory

    def __init__(self) -> None:
        self._buffer = b""
        self._trusted = False
        self._waiting = False
        self._peer = None
        self.wrapped: Protocol | None = None

    def connectionMade(self) -> None:
        factory = self.factory
        settings = factory.settings
        self._peer = self.transport.getPeer()
        self._trusted = permitted(getattr(self._peer, "host", ""), settings.trusted, ())
        if not self._trusted and settings.required:
            self._refuse(REFUSED_UNTRUSTED, "a PROXY header is required")
            return
        self._waiting = True
        factory.deadlines.add(self, settings.timeout)
        if factory.acceptGate is not None:
            # It holds a descriptor while it waits, as a TLS handshake does.
            factory.acceptGate.connectionOpened()

    def dataReceived(self, data: bytes) -> None:
        # Called only until the header is read: then an attribute of this
        # instance sends the transport's calls to the app's protocol.
        if not self._waiting:
            return  # refused, closing
        buffer = self._buffer + data if self._buffer else data
        version = detect(buffer)
        if version is None:
            self._buffer = buffer
            return
        if version == NOT_A_HEADER:
            if self._trusted and self.factory.settings.required:
                self._refuse(REFUSED_NO_HEADER, "one is required from AcceptProxy.From")
                return
            self._handOver(self._peer, buffer)
            return
        if not self._trusted:
            self._refuse(REFUSED_UNTRUSTED, "it sent a PROXY header")
            return
        try:
            parsed = parse(buffer)
        except ProxyHeaderError as e:
            self._refuse(REFUSED_BAD_HEADER, str(e))
            return
        if parsed is None:
            self._buffer = buffer
            return
        header, consumed = parsed
        if header.local:
            address = ProxiedAddress(self._peer, header, self._peer)
        else:
            address = ProxiedAddress(_address(*header.source), header, self._peer)
        self._handOver(address, buffer[consumed:])

    def _handOver(self, address, rest: bytes) -> None:
        """
        Build the app's protocol for C{address}, give it the transport, and
        C{rest} (what the peer sent after the header).
        """
        self._stopWaiting()
        self._buffer = b""
        protocol = self.factory.wrappedFactory.buildProtocol(address)
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrapped = protocol
        self.dataReceived = protocol.dataReceived
        protocol.makeConnection(self.transport)
        if rest:
            protocol.dataReceived(rest)

    def _stopWaiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self.factory.deadlines.remove(self, self.factory.settings.timeout)
            self._leaveGate()

    def _leaveGate(self) -> None:
        if self.factory.acceptGate is not None:
            self.factory.acceptGate.connectionClosed()

    def _refuse(self, reason: str, detail: str) -> None:
        """
        Close a peer the stage does not take; log it with the reason.
        """
        self._stopWaiting()
        self._buffer = b""
        port = self.transport.getHost().port
        self.factory.refused(describeAddress(self._peer), port, reason, detail)
        self.transport.loseConnection()

    def timedOut(self) -> None:
        """
        No complete header within C{Timeout} seconds.
        """
        self._waiting = False
        self._leaveGate()
        settings = self.factory.settings
        if not settings.required and detect(self._buffer) is None:
            # Too few bytes to tell a header from data: a plain client.
            self._handOver(self._peer, self._buffer)
            return
        self._refuse(REFUSED_HEADER_TIMEOUT, f"no complete PROXY header within {settings.timeout:g}s")

    def readConnectionLost(self) -> None:
        wrapped = self.wrapped
        if wrapped is None:
            # Gone before a complete header: nothing to serve.
            self._stopWaiting()
            self.transport.loseConnection()
        elif IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.readConnectionLost()
        else:
            # What the transport does for a protocol without half-close.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        wrapped = self.wrapped
        if wrapped is not None and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self._stopWaiting()
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)


class HeaderStageFactory(Factory):
    """
    Puts a L{HeaderStage} in front of C{wrappedFactory}'s protocols.

    @ivar settings: the app's L{AcceptProxyConfig}.
    @ivar wrappedFactory: what builds the app's protocol once the header is
        read (the app's factory, or TLS termination in front of it), given
        a L{ProxiedAddress} or the peer's own address.
    @ivar deadlines: the header timeouts of the connections under way.
    """

    noisy = False
    protocol = HeaderStage

    def __init__(
        self,
        settings: AcceptProxyConfig,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        logRefusal: Callable[[str, int, str, str], None],
        refusals: Counter[str] | None = None,
        acceptGate=None,
    ) -> None:
        """
        @param logRefusal: writes the access record of a refused client:
            called with its address, the port, the reason and a connection
            id (the app's L{tcpproxy.app.ProxyServerFactory.logRefusal}).
        @param refusals: the app's refusals by reason, counted into.
        @param acceptGate: the proxy-wide L{tcpproxy.limits.AcceptGate}, if
            any: a connection whose header is awaited holds a descriptor,
            and counts there until it is handed on (where the app, or its
            TLS handshake, counts it) or closed, so that slow headers do not
            let the proxy accept past its limits.
        """
        self.settings = settings
        self.wrappedFactory = wrappedFactory
        self.deadlines = Deadlines(clock)
        self._logRefusal = logRefusal
        self.refusals = refusals
        self.acceptGate = acceptGate

    def refused(self, client: str, port: int, reason: str, detail: str) -> None:
        """
        Log (and count) a peer the stage closed; it gets a connection id of
        its own (one the stage let through gets its id where it is served).
        """
        if self.refusals is not None:
            self.refusals[REFUSED_PROXY_HEADER] += 1
        self._logRefusal(client, port, f"{reason}: {detail}", newConnectionId())
