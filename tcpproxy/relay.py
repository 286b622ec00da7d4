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

  - A reset is passed on as a reset (L{ResetWhenSent}): the other side gets
    what it was owed, then a reset, so a cut-off stream never looks like a
    complete one.  A clean close stays clean.

  - A client that sends and leaves cleanly while its target is dialled
    has what it sent delivered, then EOF.

  - TLS (L{tcpproxy.tlslayer}) half-closes as TCP does: C{close_notify}
    from a TLS side is its EOF, and an EOF passed on to a TLS side is sent
    as C{close_notify}, after which that side is still read (RFC 8446
    section 6.1).  A TLS side closed for good (its peer gone) is sent
    C{close_notify} and aborted if it stops answering (see
    L{tcpproxy.tls.TLSCloser}).

  - Two transports that can splice (L{ISplicing}: the fast engine's) move
    bulk data inside the kernel; the relay still counts every byte.

The protocols speak only to Twisted's interfaces (C{ITransport},
C{IPushProducer}, C{IConsumer}), so they run on either engine
(L{tcpproxy.transport.engine}).  When both sides are gone, the app writes
the connection's record (L{tcpproxy.access}).
"""

from __future__ import annotations

import fcntl
import sys
import termios
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    ILoggingContext,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from tcpproxy.app import ProxyServerFactory
    from tcpproxy.proxyaccept import ProxiedAddress

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
from tcpproxy.connid import connectionIdOf, newConnectionNumber
from tcpproxy.describe import describeAddress
from tcpproxy.dialer import Dialled, NoTargetAvailable
from tcpproxy.idle import IIdleWatched
from tcpproxy.limits import Throttle, TokenBucket
from tcpproxy.proxysend import HeaderSource
from tcpproxy.tls import TLSCloser
from tcpproxy.transport.tcp import ISpliceCounter, ISplicing, IWriteBuffer

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


RESET_POLL = 0.01
"""
Seconds between looks at what a side to be reset still has to send.
"""


def _unsent(transport) -> int:
    """
    Bytes written to C{transport} (or the TCP transport under a TLS one)
    that its peer has not acknowledged yet: what the transport still holds
    where it says (L{IWriteBuffer}), and the kernel's send queue
    (C{SIOCOUTQ}, Linux C{tcp(7)}) of its socket.
    """
    if _isTLS(transport):
        transport = transport.transport
    held = transport.bufferedBytes if IWriteBuffer.providedBy(transport) else 0
    if ISystemHandle.providedBy(transport):
        try:
            queued = fcntl.ioctl(transport.getHandle().fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            held += int.from_bytes(queued, sys.byteorder, signed=True)
        except (OSError, ValueError):
            pass
    return held


class ResetWhenSent:
    """
    Reset a side once what it was sent has reached its peer: its peer on
    the other side of the relay was reset, and a clean end here would pass
    a cut-off stream for a complete one (as HAProxy, which aborts the other
    side of a session whose side was reset).

    Nothing more is read from the side.  Every L{RESET_POLL} seconds the
    bytes still unsent (L{_unsent}) are looked at; the side is aborted
    once they are none on two looks in a row (Twisted's own transports
    say nothing of their buffer, which they hand to the kernel within a
    turn), or after L{LINGER} seconds whatever is left.
    """

    def __init__(self, transport, clock: IReactorTime) -> None:
        self._transport = transport
        self._clock = clock
        self._deadline = clock.seconds() + LINGER
        self._emptyBefore = False
        transport.pauseProducing()
        self._call = clock.callLater(0, self._check)

    def _check(self) -> None:
        self._call = None
        empty = _unsent(self._transport) <= 0
        if (empty and self._emptyBefore) or self._clock.seconds() >= self._deadline:
            _abort(self._transport)
            return
        self._emptyBefore = empty
        self._call = self._clock.callLater(RESET_POLL, self._check)

    def cancel(self) -> None:
        """
        The side is gone: nothing is left to reset.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _tcp(side: _RelaySide):
    """
    The transport that reads and writes C{side}'s socket: its own, or the
    TCP one under a TLS one.
    """
    return side.transport.transport if side.tls else side.transport


def _noDelay(side: _RelaySide) -> None:
    """
    Turn Nagle's algorithm off (on the TCP transport under a TLS one): the
    relay writes whole chunks as they come, and must not hold back a small
    reply waiting for an ACK.
    """
    transport = _tcp(side)
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


BULK_READ = 256 * 1024
"""
Bytes a TCP transport of a pair that does not splice reads at once.
"""


def _readInBulk(side: _RelaySide) -> None:
    """
    Have the TCP transport of C{side} (the one under a TLS one) read up to
    L{BULK_READ} bytes at once, instead of Twisted's 64 KiB: what the
    kernel holds is taken in one call, and a TLS layer above decrypts it
    and writes the plaintext in one pass where it took four (TLS
    termination's bulk throughput: +18%, bench C{tls}, same run).  A small
    read costs no more: the bytes object is cut to what arrived.

    Only the fast engine's transports (L{ISplicing}), which hold one read
    at most for a slow receiver; Twisted's buffer what the kernel does not
    take, and would hold twice as much per direction.  Not for a pair that
    splices, where a read that fills the usual size is what starts
    splicing, nor for a throttled one: a read is a burst the token bucket
    can only pay back afterwards.  C{bufferSize} is the read size's name
    on Twisted's transports too.
    """
    transport = _tcp(side)
    if ISplicing.providedBy(transport):
        transport.bufferSize = BULK_READ


def _abort(transport) -> None:
    """
    Reset a side's connection: the TCP transport itself, under a TLS one,
    so that no C{close_notify} can go first (the peer would take it for a
    clean end).
    """
    if _isTLS(transport):
        transport = transport.transport
    transport.abortConnection()


def _orderly(reason: Failure) -> bool:
    """
    Whether a connection ended cleanly (EOF both ways), not by an error or
    reset.  C{isinstance} on the value is what C{reason.check(ConnectionDone)}
    answers, at a tenth of its cost (it walks the class names): this is
    asked twice per relayed connection.
    """
    return isinstance(reason.value, ConnectionDone)


def _isTLS(transport) -> bool:
    """
    Whether C{transport} is a TLS one.
    """
    return ISSLTransport.providedBy(transport)


@implementer(IProtocol, ILoggingContext, IHalfCloseableProtocol, ISpliceCounter, IPushProducer)
class _RelaySide:
    """
    What the client side and the target side have in common: copying to the
    peer, and turning EOF and loss into the matching action on the peer.

    A side is also the producer registered with its peer's transport: it
    pauses and resumes its own transport (or its L{Throttle}), but for
    C{stopProducing}.  A transport whose connection is lost calls
    C{stopProducing} on its producer, and for a TCP transport that is
    C{loseConnection}: the other side would be closed at once -- with a
    reset, losing what it was sent, if its remote end is still sending.
    The relay closes the other side itself, as it must (L{closePeer}).

    @ivar peer: the other side, once paired.
    @ivar readDone: this side's remote end sent EOF.
    @ivar writeDone: this side's transport was shut for writing, so its
        remote end has seen EOF.
    @ivar closed: C{connectionLost} was called.
    @ivar received: bytes read from this side's remote end (spliced ones
        included).
    @ivar closing: while this side is closed because its peer is gone
        (L{closePeer}), what ends that close, cancelled if the connection
        ends first: in a lingering close (L{linger}), the timer of the reset
        that ends it if it takes too long; for a TLS transport, the
        L{TLSCloser} that aborts it if its peer stops answering; once the
        peer was reset, the L{ResetWhenSent} that resets this side too.
        One slot for the three: a side is closed for its peer once, one way
        (8 bytes per side less for every other open connection).
    @ivar throttle: with a bandwidth limit, the L{Throttle} this side's
        transport produces through (told of every chunk read); else C{None}.
    @ivar dropping: in a lingering close (or once nothing can take what
        arrives): what arrives is dropped, and EOF closes the side.
    @ivar tls: this side's transport is a TLS one (looked at once).
    """

    # Slots: a relayed pair is two of these for as long as it is open, and
    # an instance dictionary would be most of what an idle one costs.
    __slots__ = (
        "factory",
        "transport",
        "peer",
        "throttle",
        "closing",
        "feeding",
        "readDone",
        "writeDone",
        "closed",
        "received",
        "dropping",
        "tls",
    )

    def __init__(self) -> None:
        self.factory = None
        self.tls = False
        self.transport = None
        self.peer: _RelaySide | None = None
        self.throttle: Throttle | None = None
        self.closing: IDelayedCall | TLSCloser | ResetWhenSent | None = None
        self.feeding = False
        self.readDone = False
        self.writeDone = False
        self.closed = False
        self.received = 0
        self.dropping = False

    # IProtocol, as Twisted's Protocol gives it: not inherited from it, whose
    # instance dictionary would be 44 more bytes per side for every open
    # connection (two sides each).  Nor its "connected" flag, which nothing
    # reads ("closed" says when a side is gone): 8 bytes per side.

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        pass

    def logPrefix(self) -> str:
        return self.__class__.__name__

    def pauseProducing(self) -> None:
        (self.throttle or self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        (self.throttle or self.transport).resumeProducing()

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self.dropping:
            return
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
        if self.dropping:
            # The lingering close is over.
            self.transport.loseConnection()
            return
        peer = self.peer
        if peer is not None and not peer.closed:
            self.stopFeeding()
            if peer.readDone and self.writeDone and not peer.tls:
                # The other direction is done: this EOF is the last thing
                # the pair carries.  Closing the peer (once it has flushed
                # what it holds) sends it, as its remote end already sent
                # its own: the same end for it, without shutting its write
                # side first (a system call less per connection).
                self.relay.bothDirectionsDone()
                return
            self.shutPeerWrite()

    def shutPeerWrite(self) -> None:
        """
        Pass this side's EOF on to the peer: shut its transport for writing
        once flushed -- for a TLS peer, C{close_notify}, which closes only
        the sender's side (RFC 8446 section 6.1, L{tcpproxy.tlslayer}); the
        peer goes on being read (and relayed) until its own EOF.
        """
        self.peer.transport.loseWriteConnection()

    def closePeer(self, reset: bool) -> None:
        """
        This side is gone: close the peer once it has flushed what it holds.

        If this side was reset (or failed), so is the peer, once what it was
        owed has reached it (L{ResetWhenSent}): a clean end would pass a
        cut-off stream for a complete one.  Otherwise a TLS peer is resumed
        first (it may have been paused for this side, and a paused TLS
        transport never completes its close, Twisted #8901); a plain one
        gets EOF (L{linger}) or, if it already sent its own, is closed.
        """
        peer = self.peer
        transport = peer.transport
        if peer.closing is not None:
            return  # (called once per side: its peer's connection is lost once)
        if reset:
            peer.closing = ResetWhenSent(transport, self.relay.factory.clock)
        elif peer.tls:
            peer.closing = TLSCloser(transport, self.relay.factory.clock)
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
        self.dropping = True
        transport = self.transport
        transport.loseWriteConnection()
        transport.resumeProducing()
        self.closing = self.relay.factory.clock.callLater(LINGER, self._lingeredTooLong)

    def _lingeredTooLong(self) -> None:
        """
        The lingering close took L{LINGER} seconds: reset the side.
        """
        self.closing = None  # (called: nothing left to cancel)
        _abort(self.transport)

    def writeConnectionLost(self) -> None:
        self.writeDone = True
        self.relay.checkBothDirectionsDone()

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        if self.closing is not None:
            self.closing.cancel()
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
            self.closePeer(reset=not _orderly(reason))

    def pairWith(self, peer: _RelaySide, bandwidthLimit: float | None = None, clock=None) -> None:
        """
        Make C{peer} the other side, and each transport the other's producer.

        With a C{bandwidthLimit} (bytes per second, each direction), each
        transport produces through a L{Throttle} of its own, which pauses
        it for backpressure or for its token bucket.  Without one, two
        transports that can splice (L{ISplicing}) may move bulk data
        inside the kernel, each direction on its own; if they cannot (TLS
        on either side), they read in bulk (L{_readInBulk}).
        """
        self.peer = peer
        peer.peer = self
        if bandwidthLimit:
            self.throttle = Throttle(self.transport, TokenBucket(bandwidthLimit, clock), _tcp(self))
            peer.throttle = Throttle(peer.transport, TokenBucket(bandwidthLimit, clock), _tcp(peer))
        self.transport.registerProducer(peer, True)
        peer.transport.registerProducer(self, True)
        self.feeding = peer.feeding = True
        if bandwidthLimit:
            return
        mine, theirs = self.transport, peer.transport
        spliced = False
        # implementedBy, not providedBy: a wrapping transport (TLS) claims
        # every interface of the one under it, whose splice would move its
        # raw (encrypted) bytes past it.
        if ISplicing.implementedBy(type(mine)) and ISplicing.implementedBy(type(theirs)):
            spliced = mine.spliceTo(theirs, self)
            spliced = theirs.spliceTo(mine, peer) and spliced
        if not spliced:
            _readInBulk(self)
            _readInBulk(peer)


_NO_FIELDS: dict[str, str | None] = {}
"""
The TLS fields of a client whose TLS does not end here (never changed).
"""


def _frontOf(proxied: ProxiedAddress | None, tlsFields: dict[str, str | None]):
    """
    What L{ProxyServerProtocol} keeps of what the stages in front told of
    its client: the TLS fields (a dict, maybe L{_NO_FIELDS}), the PROXY
    header's address, or both as a tuple.
    """
    if proxied is None:
        return tlsFields
    if not tlsFields:
        return proxied
    return (proxied, tlsFields)


class ProxyClientProtocol(_RelaySide):
    """
    The side connected to the target.
    """

    # Its relay is its peer (set by the relay as soon as the target is
    # connected): no slot of its own, 16 bytes less for every open
    # connection (one slot took it past a 16-byte class).
    __slots__ = ()

    @property
    def relay(self) -> ProxyServerProtocol | None:
        """
        The L{ProxyServerProtocol} that owns this pair (its peer), once
        the target is connected; C{None} before, and once the pair is over.
        """
        return self.peer

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

    __slots__ = (
        "client",
        "target",
        "end",
        "_front",
        "idleSeen",
        "idleSince",
        "_pending",
        "_dialling",
        "failures",
        "started",
        "port",
        "app",
        "clientHost",
        "_id",
    )

    def __init__(self) -> None:
        _RelaySide.__init__(self)
        self.client: ProxyClientProtocol | None = None
        self.target = None
        self.end: str | None = None
        # What the stages in front told of the client (see proxied and
        # tlsFields): nothing, for most.
        self._front: dict | ProxiedAddress | tuple = _NO_FIELDS
        self.idleSeen = 0
        self.idleSince: float | None = None
        # What the client sent while its target is dialled: the bytes of
        # its first read as they came (most clients send one chunk, if any,
        # before their target is connected: nothing to join), a bytearray
        # once more came.  Its length is the size held.
        self._pending: bytes | bytearray | None = None
        self._dialling = None
        self.failures: list | tuple = ()
        self.started = 0.0
        self.port = 0
        self.app = None
        self.clientHost = ""
        # The connection id, or its number (see connectionId).
        self._id: int | str | None = None

    @property
    def relay(self) -> ProxyServerProtocol:
        return self

    # What the stages in front of the relay tell of a client, before
    # connectionMade, in one slot: its TLS session's fields alone (a dict),
    # its PROXY header's address alone, or both (a tuple), as few clients
    # have.  Two slots took the relay past a 16-byte class of pymalloc's:
    # 16 bytes more for every open connection.

    @property
    def proxied(self) -> ProxiedAddress | None:
        """
        The client as a PROXY header gave it (L{tcpproxy.proxyaccept}), set
        before C{connectionMade}; C{None} without one: the transport's peer
        is the client.
        """
        front = self._front
        if type(front) is tuple:
            return front[0]
        return None if type(front) is dict else front

    @proxied.setter
    def proxied(self, address: ProxiedAddress | None) -> None:
        self._front = _frontOf(address, self.tlsFields)

    @property
    def tlsFields(self) -> dict[str, str | None]:
        """
        For a client whose TLS was terminated here: C{tlsVersion},
        C{cipher}, C{sni} and C{alpn}, set before C{connectionMade}
        (L{tcpproxy.tls}); else empty.
        """
        front = self._front
        if type(front) is tuple:
            return front[1]
        return front if type(front) is dict else _NO_FIELDS

    @tlsFields.setter
    def tlsFields(self, fields: dict[str, str | None]) -> None:
        self._front = _frontOf(self.proxied, fields)

    @property
    def connectionId(self) -> str | None:
        """
        The connection's id (L{tcpproxy.connid}); C{None} before
        C{connectionMade}.  Kept as its number, and written when asked for
        (to log the connection, mostly): 40 bytes less for every open
        connection.  A client whose TLS ends here has the id its handshake's
        log lines had, given as a string by the TLS gate before
        C{connectionMade}.
        """
        ident = self._id
        return connectionIdOf(ident) if type(ident) is int else ident

    @connectionId.setter
    def connectionId(self, value: str) -> None:
        self._id = value

    def connectionMade(self) -> None:
        if self._id is None:
            self._id = newConnectionNumber()
        factory = self.factory
        self.started = factory.clock.seconds()
        if not self.clientHost:
            # Not known from buildProtocol's address.
            self.clientHost = getattr(self._client(), "host", "")
        self.port = self.transport.getHost().port
        # The settings this connection keeps, whatever a reload does.
        self.app = factory.app
        refused = factory.admit(self.clientHost)
        if refused is not None:
            self._refuse(refused)
            return
        factory.relays.add(self)
        self.tls = _isTLS(self.transport)
        _noDelay(self)
        clientFactory = factory.clientFactory
        if self.app.sendsProxy:
            # Its PROXY header goes first to the target (tcpproxy.proxysend).
            clientFactory = HeaderSource(clientFactory, self)
        self._dialling = factory.dispatcher.dispatch(clientFactory, self.clientHost)
        self._dialling.addCallbacks(self._targetConnected, self._noTarget)

    def _refuse(self, reason: str) -> None:
        """
        Close a client the app does not take, before any target is dialled.
        """
        self.factory.logRefusal(self.clientAddress, self.port, reason, self.connectionId)
        self.transport.loseConnection()

    def _client(self):
        """
        The client's address: as its PROXY header gave it, else the
        transport's peer.  Not kept: 150 bytes per open connection, asked
        for only when the connection is logged.
        """
        proxied = self.proxied
        return self.transport.getPeer() if proxied is None else proxied.address

    @property
    def clientAddress(self) -> str:
        # Written only when logged: most connections are not, with AccessLog off.
        return describeAddress(self._client())

    def dataReceived(self, data: bytes) -> None:
        if self.client is not None:
            _RelaySide.dataReceived(self, data)
            return
        self.received += len(data)
        pending = self._pending
        if pending is None:
            self._pending = pending = data
        else:
            if not isinstance(pending, bytearray):
                pending = self._pending = bytearray(pending)
            pending += data
        if len(pending) >= PREDIAL_BUFFER:
            self.transport.pauseProducing()

    def _targetConnected(self, dialled: Dialled) -> None:
        self._dialling = None
        self.target = dialled.target
        self.failures = dialled.failures
        client = self.client = dialled.protocol
        # Its relay (and its peer, once paired: a client that left cleanly
        # meanwhile is not paired, but its target side still reports to it).
        client.peer = self
        client.tls = _isTLS(client.transport)
        _noDelay(client)
        # (bytes() of bytes is the same object: no copy of a single chunk.)
        pending, self._pending = bytes(self._pending or b""), None
        if self.closed:
            # The client left cleanly after sending this: deliver it, then
            # EOF; whatever the target answers has nowhere to go.
            client.dropping = True
            client.transport.write(pending)
            client.transport.loseConnection()
            return
        app = self.app
        self.pairWith(client, app.bandwidthLimit, self.factory.clock)
        if dialled.early:
            # A pooled connection's greeting, sent before this client came.
            self.transport.write(dialled.early)
        if app.idleTimeout:
            self.factory.idleSweeper.watch(self)
        if self.readDone:
            # The client sent EOF while the target was dialled.
            self.stopFeeding()
            client.transport.write(pending)
            self.shutPeerWrite()
            return
        self.transport.resumeProducing()
        if pending:
            client.transport.write(pending)
            if self.throttle is not None:
                self.throttle.consumed(len(pending))

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
            # The client left, or shutdown aborted us: already handled, but
            # for a client that had left cleanly (see connectionLost).
            if self.closed:
                self.sideLost(self, reason)
            return
        if reason.check(NoTargetAvailable):
            self.failures = reason.value.failures
            self.end = END_NO_TARGET
            if self.closed:
                # The client had left cleanly meanwhile.
                self.sideLost(self, reason)
                return
            self.transport.loseConnection()
        else:
            self.log.failure(
                "[{connectionId}] dialling failed unexpectedly", reason, connectionId=self.connectionId
            )
            _abort(self.transport)

    def readConnectionLost(self) -> None:
        if self.client is None:
            # Still dialling: remember the EOF, deliver it once connected.
            self.readDone = True
            return
        _RelaySide.readConnectionLost(self)

    def connectionLost(self, reason: Failure) -> None:
        if self._dialling is not None:
            if self._pending and _orderly(reason):
                # It sent what it had and left cleanly while its target was
                # dialled (as openssl s_client does: close_notify, then the
                # TCP connection closed): deliver that, then EOF, as for a
                # client that shut its side (see _targetConnected).
                self.closed = self.readDone = True
                return
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
            self.bothDirectionsDone()

    def bothDirectionsDone(self) -> None:
        """
        Each remote end has sent its EOF, and has (or is about to have, once
        flushed) the other's: close both sides.
        """
        # Both have read EOF, so neither feeds the other any more.
        self.end = self.end or END_DONE
        self.transport.loseConnection()
        self.client.transport.loseConnection()

    def sideLost(self, side: _RelaySide, reason: Failure) -> None:
        """
        One side's connection is gone; log the connection once both are.
        """
        if self.end is None and not _orderly(reason):
            self.end = END_CLIENT_LOST if side is self else END_TARGET_LOST
        client = self.client
        if self.closed and (client is None or client.closed) and self in self.factory.relays:
            self.factory.relayEnded(self)
            if client is not None:
                # The pair is over: undo the links back to this side, so
                # that both are freed as soon as nothing holds them rather
                # than left to the cyclic garbage collector, which a busy
                # proxy would otherwise run several times as often.
                client.peer = self.peer = None

    def abort(self) -> None:
        """
        Drop both sides at once (used when the drain period is over).
        """
        self.end = self.end or END_ABORTED
        if self._dialling is not None:
            self._dialling.cancel()
        for side in (self, self.client):
            if side is not None and not side.closed:
                _abort(side.transport)

    @property
    def bytesIn(self) -> int:
        return self.received

    @property
    def bytesOut(self) -> int:
        return 0 if self.client is None else self.client.received
