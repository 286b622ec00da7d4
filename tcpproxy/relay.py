"""
The relay: a pair of protocols that copy bytes between a client and the
target chosen for it, with backpressure both ways and half-close.

The pattern is that of L{twisted.protocols.portforward}: each transport is
registered as the other's streaming producer, so a side whose write buffer
fills pauses the reading of the other side, and memory stays bounded whatever
the speeds.  On top of that:

  - Half-close.  Both protocols provide L{IHalfCloseableProtocol}.  When one
    side's peer sends EOF, that side stops producing into the other and the
    other transport is shut for writing once its buffer is flushed; bytes the
    other way keep flowing.  Twisted delivers no C{connectionLost} after both
    halves are shut, so the pair closes itself when both directions are done.

  - Producers are unregistered before every close: a transport whose paused
    producer stays registered never finishes closing.

  - While the target is being dialled the client is read into a small buffer
    and then paused, so a client that leaves during a slow dial is noticed
    (and the dial cancelled) without anything it sent being lost or held
    without bound.

  - TLS (L{tcpproxy.tls}) has no half-close.  An EOF on a plain side whose
    peer is TLS sends C{close_notify} to the peer (which stops writing to
    it, and keeps reading until the peer answers); an EOF or
    C{close_notify} on a TLS side arrives as C{connectionLost}, and closes
    the other side once what is in flight to it has been written.  A TLS
    transport being closed is aborted if its peer stops answering (see
    L{tcpproxy.tls.closeTLS}).

One log event per connection, when both sides are gone, carries the client,
app, port, target, failed attempts, bytes each way, duration and how it ended
(and, for TLS terminated here, the TLS version, cipher and SNI name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from tcpproxy.app import ProxyServerFactory

from tcpproxy.access import (
    END_ABORTED,
    END_CLIENT_LEFT,
    END_CLIENT_LOST,
    END_DONE,
    END_IDLE,
    END_NO_TARGET,
    END_TARGET_LOST,
    IConnectionRecord,
)
from tcpproxy.describe import describeAddress
from tcpproxy.dialer import Dialled, NoTargetAvailable
from tcpproxy.idle import IIdleWatched
from tcpproxy.limits import Throttle, TokenBucket
from tcpproxy.tls import TLSCloser
from tcpproxy.transport.tcp import ISplicing

PREDIAL_BUFFER = 64 * 1024
"""
How much a client may send before its target is connected; past this the
client is paused until then.
"""

LINGER = 30.0
"""
Seconds a side whose peer is gone may take to send its EOF, while what it
still sends is read and dropped (a lingering close), before it is reset.
"""

class IRelayed(IConnectionRecord, IIdleWatched):
    """
    One client's connection, as its app keeps it while it is open and
    records it when it ends.
    """

    def abort() -> None:
        """
        Drop both sides at once (the drain period is over).
        """


@implementer(IPushProducer)
class _Feed:
    """
    What a side's transport gets as its producer: the other side's
    transport (or its L{Throttle}), but for C{stopProducing}.

    A transport whose connection is lost calls C{stopProducing} on its
    producer, and for a TCP transport that is C{loseConnection}: the other
    side would be closed at once -- with a reset, losing what it was sent,
    if its remote end is still sending.  The relay closes the other side
    itself, as it must (L{_RelaySide.closePeer}).
    """

    __slots__ = ("pauseProducing", "resumeProducing")

    def __init__(self, producer: IPushProducer) -> None:
        self.pauseProducing = producer.pauseProducing
        self.resumeProducing = producer.resumeProducing

    def stopProducing(self) -> None:
        pass


def _drop(data: bytes) -> None:
    """
    What a side in a lingering close does with what it still receives.
    """


def _noDelay(transport) -> None:
    """
    Turn Nagle's algorithm off (on the TCP transport under a TLS one): the
    relay writes whole chunks as they come, and must not hold back a small
    reply waiting for an ACK.
    """
    if _isTLS(transport):
        transport = transport.transport
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def _isTLS(transport) -> bool:
    """
    Whether C{transport} is a TLS one (which has no half-close).
    """
    return ISSLTransport.providedBy(transport)


@implementer(IHalfCloseableProtocol)
class _RelaySide(Protocol):
    """
    What the client side and the target side have in common: copying to the
    peer, and turning EOF and loss into the matching action on the peer.

    @ivar peer: the other side, once paired.
    @ivar readDone: this side's remote end sent EOF.
    @ivar writeDone: this side's transport was shut for writing, so its
        remote end has seen EOF.
    @ivar closed: C{connectionLost} was called.
    @ivar received: bytes read from this side's remote end (spliced ones
        included).
    @ivar lingerCall: while in a lingering close (L{linger}), the reset
        that ends it if it takes too long.
    @ivar closer: while a TLS transport of this side is being closed, the
        L{TLSCloser} that aborts it if its peer stops answering.
    @ivar throttle: with a bandwidth limit, the L{Throttle} this side's
        transport produces through (told of every chunk read); else C{None}.
    """

    peer: _RelaySide | None = None
    throttle: Throttle | None = None
    lingerCall: IDelayedCall | None = None
    closer: TLSCloser | None = None
    feeding = False
    readDone = False
    writeDone = False
    closed = False
    received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.throttle is not None:
            self.throttle.consumed(len(data))
        self.peer.transport.write(data)

    def spliced(self, size: int) -> None:
        """
        C{size} bytes went from this side to the peer inside the kernel
        (L{ISplicing}): counted as if read.
        """
        self.received += size

    def stopFeeding(self) -> None:
        """
        This transport will produce nothing more for the peer's: take it
        off as the peer transport's producer.  Left registered, the peer
        would resume it after EOF (and read EOF again), or never finish
        closing while it is paused.
        """
        if self.feeding:
            self.feeding = False
            self.peer.transport.unregisterProducer()
        if self.throttle is not None:
            self.throttle.stop()

    def readConnectionLost(self) -> None:
        self.readDone = True
        if self.lingerCall is not None:
            # The lingering close is over.
            self.transport.loseConnection()
            return
        peer = self.peer
        if peer is not None and not peer.closed:
            self.stopFeeding()
            self.shutPeerWrite()

    def shutPeerWrite(self) -> None:
        """
        Pass this side's EOF on to the peer: shut its transport for writing
        once flushed, or, TLS having no half-close (C{loseWriteConnection}
        is broken on it, Twisted #5341), send it C{close_notify}; the TLS
        side goes on reading (and relaying) until its peer answers.
        """
        peer = self.peer
        if not _isTLS(peer.transport):
            peer.transport.loseWriteConnection()
            return
        if peer.closer is not None:
            return

        def activity() -> object:
            return (peer.received, TLSCloser.unsent(peer.transport), TLSCloser.unsent(self.transport))

        # Still this side's producer if it feeds it: not resumed by force.
        peer.closer = TLSCloser(peer.transport, self.relay.factory.clock, activity, resume=False)

    def closePeer(self) -> None:
        """
        This side is gone: close the peer once it has flushed what it holds.
        A TLS peer is resumed first (it may have been paused for this side,
        and a paused TLS transport never completes its close, Twisted #8901).
        """
        peer = self.peer
        transport = peer.transport
        if _isTLS(transport):
            if peer.closer is None:
                peer.closer = TLSCloser(transport, self.relay.factory.clock)
        elif peer.readDone:
            transport.loseConnection()
        else:
            peer.linger()

    def linger(self) -> None:
        """
        The peer is gone, and this side's remote end may still be sending:
        closed with unread bytes, the socket would send a reset, and the
        remote end lose what it was sent but has not read yet.  Pass EOF
        once what is buffered is flushed, then read and drop until its EOF;
        reset it if that takes more than L{LINGER} seconds.
        """
        self.dataReceived = _drop
        transport = self.transport
        transport.loseWriteConnection()
        transport.resumeProducing()
        self.lingerCall = self.relay.factory.clock.callLater(LINGER, transport.abortConnection)

    def writeConnectionLost(self) -> None:
        self.writeDone = True
        self.relay.checkBothDirectionsDone()

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        if self.closer is not None:
            self.closer.cancel()
        if self.lingerCall is not None and self.lingerCall.active():
            self.lingerCall.cancel()
        if self.throttle is not None:
            self.throttle.stop()
        peer = self.peer
        if peer is not None and not peer.closed:
            # Our transport dropped its producer as it closed.
            peer.feeding = False
            if peer.throttle is not None:
                peer.throttle.stop()
            self.stopFeeding()
            # Let the peer flush what this side already sent it, then close.
            self.closePeer()

    def pairWith(self, peer: _RelaySide, bandwidthLimit: float | None = None, clock=None) -> None:
        """
        Make C{peer} the other side, and each transport the other's producer.

        With a C{bandwidthLimit} (bytes per second, each direction), each
        transport produces through a L{Throttle} of its own, which pauses
        it for backpressure or for its token bucket.  Without one, two
        transports that can splice (L{ISplicing}) may move bulk data
        inside the kernel, each direction on its own.
        """
        self.peer = peer
        peer.peer = self
        if bandwidthLimit:
            self.throttle = Throttle(self.transport, TokenBucket(bandwidthLimit, clock))
            peer.throttle = Throttle(peer.transport, TokenBucket(bandwidthLimit, clock))
        self.transport.registerProducer(_Feed(peer.throttle or peer.transport), True)
        peer.transport.registerProducer(_Feed(self.throttle or self.transport), True)
        self.feeding = peer.feeding = True
        mine, theirs = self.transport, peer.transport
        # implementedBy, not providedBy: a wrapping transport (TLS) claims
        # every interface of the one under it, whose splice would move its
        # raw (encrypted) bytes past it.
        splicing = ISplicing.implementedBy(type(mine)) and ISplicing.implementedBy(type(theirs))
        if not bandwidthLimit and splicing:
            mine.spliceTo(theirs, self.spliced)
            theirs.spliceTo(mine, peer.spliced)


class ProxyClientProtocol(_RelaySide):
    """
    The side connected to the target.

    @ivar relay: the L{ProxyServerProtocol} that owns this pair.
    """

    relay: ProxyServerProtocol

    def connectionLost(self, reason: Failure) -> None:
        _RelaySide.connectionLost(self, reason)
        self.relay.sideLost(self, reason)


@implementer(IRelayed)
class ProxyServerProtocol(_RelaySide):
    """
    The side connected to the client; it owns the pair.

    It dials a target when the client connects, pairs the two sides, closes
    the pair when both directions are done, and logs the connection at the end.
    """

    log = Logger()
    factory: ProxyServerFactory
    client: ProxyClientProtocol | None = None
    target = None
    end: str | None = None
    tlsFields: dict[str, str | None] = {}
    """
    For a client whose TLS was terminated here: C{tlsVersion}, C{cipher}
    and C{sni}, set before C{connectionMade} (L{tcpproxy.tls}).
    """
    refused: str | None = None
    idleSeen = 0
    idleSince: float | None = None

    def __init__(self) -> None:
        self._pending: list[bytes] | None = []
        self._pendingSize = 0
        self._dialling = None
        self.failures: list = []

    @property
    def relay(self) -> ProxyServerProtocol:
        return self

    def connectionMade(self) -> None:
        factory = self.factory
        self.started = factory.clock.seconds()
        peer = self.transport.getPeer()
        self.clientAddress = describeAddress(peer)
        self.port = self.transport.getHost().port
        # The settings this connection keeps, whatever a reload does.
        self.app = factory.app
        self.clientHost = getattr(peer, "host", "")
        refused = factory.admit(self.clientHost)
        if refused is not None:
            self._refuse(refused)
            return
        factory.relays.add(self)
        _noDelay(self.transport)
        self._dialling = factory.dialer.dial(factory.clientFactory, factory.balancer.order())
        self._dialling.addCallbacks(self._targetConnected, self._noTarget)

    def _refuse(self, reason: str) -> None:
        """
        Close a client the app does not take, before any target is dialled.
        """
        self.refused = reason
        self.factory.logRefusal(self.clientAddress, self.port, reason)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._pending is None:
            _RelaySide.dataReceived(self, data)
            return
        self.received += len(data)
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize >= PREDIAL_BUFFER:
            self.transport.pauseProducing()

    def _targetConnected(self, dialled: Dialled) -> None:
        self._dialling = None
        self.target = dialled.target
        self.failures = dialled.failures
        client = self.client = dialled.protocol
        client.relay = self
        _noDelay(client.transport)
        pending, self._pending = self._pending, None
        app = self.app
        self.pairWith(client, app.bandwidthLimit, self.factory.clock)
        if app.idleTimeout:
            self.factory.idleSweeper.watch(self)
        if self.readDone:
            # The client sent EOF while the target was dialled.
            self.stopFeeding()
            client.transport.write(b"".join(pending))
            self.shutPeerWrite()
            return
        self.transport.resumeProducing()
        if pending:
            client.transport.write(b"".join(pending))
            if self.throttle is not None:
                self.throttle.consumed(self._pendingSize)

    @property
    def idleTimeout(self) -> float:
        # The app's settings when this client came (a reload changes new ones).
        return self.app.idleTimeout

    def activity(self) -> int:
        return self.received + self.client.received

    def idleTimedOut(self) -> None:
        """
        No byte either way for C{IdleTimeout}: close both sides (abort them
        if they are still open one check later, unable to flush).
        """
        client = self.client
        if self.end == END_IDLE or self.closed or client.closed:
            # Still not closed a whole idle period later (or lingering).
            self.abort()
            return
        self.end = END_IDLE
        for side in (self, client):
            if not side.closed:
                side.stopFeeding()
        for side in (self, client):
            if not side.closed:
                side.transport.loseConnection()

    def _noTarget(self, reason: Failure) -> None:
        self._dialling = None
        if reason.check(CancelledError):
            # The client left, or shutdown aborted us: already handled.
            return
        if reason.check(NoTargetAvailable):
            self.failures = reason.value.failures
            self.end = END_NO_TARGET
            self.transport.loseConnection()
        else:
            self.log.failure("dialling failed unexpectedly", reason)
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        if self.client is None:
            # Still dialling: remember the EOF, deliver it once connected.
            self.readDone = True
            return
        _RelaySide.readConnectionLost(self)

    def connectionLost(self, reason: Failure) -> None:
        if self._dialling is not None:
            self.end = self.end or END_CLIENT_LEFT
            self._dialling.cancel()
        _RelaySide.connectionLost(self, reason)
        self.sideLost(self, reason)

    def checkBothDirectionsDone(self) -> None:
        """
        Close the pair once each remote end has seen the other's EOF.

        Twisted gives no C{connectionLost} once both halves of a socket are
        shut, so the pair must close itself.
        """
        client = self.client
        if client is not None and self.writeDone and client.writeDone:
            # Both have read EOF, so neither feeds the other any more.
            self.end = self.end or END_DONE
            self.transport.loseConnection()
            client.transport.loseConnection()

    def sideLost(self, side: _RelaySide, reason: Failure) -> None:
        """
        One side's connection is gone; log the connection once both are.
        """
        if self.end is None and not reason.check(ConnectionDone):
            self.end = END_CLIENT_LOST if side is self else END_TARGET_LOST
        client = self.client
        if self.closed and (client is None or client.closed) and self in self.factory.relays:
            self.factory.relayEnded(self)

    def abort(self) -> None:
        """
        Drop both sides at once (used when the drain period is over).
        """
        self.end = self.end or END_ABORTED
        if self._dialling is not None:
            self._dialling.cancel()
        for side in (self, self.client):
            if side is not None and not side.closed:
                side.transport.abortConnection()

    @property
    def bytesIn(self) -> int:
        return self.received

    @property
    def bytesOut(self) -> int:
        return 0 if self.client is None else self.client.received
