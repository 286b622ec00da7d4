"""
The fast engine's TCP transport: L{ITCPTransport}, L{IPushProducer} and
L{IConsumer} on a bare non-blocking socket, dispatched from the engine's
epoll set (L{tcpproxy.transport.poller}).

It keeps the promises of Twisted's own TCP transport that the relay and
the TLS layer (L{tcpproxy.tlslayer}) rely on -- C{dataReceived}
per chunk read, half-close for an L{IHalfCloseableProtocol}
(C{readConnectionLost}, C{loseWriteConnection} and C{writeConnectionLost}),
a registered producer paused while written bytes wait, C{connectionLost}
once, never from inside a call the protocol made -- and does less work for
them:

  - C{write} sends at once when nothing is waiting (no loop turn and no two
    C{epoll_ctl} calls per chunk, as a buffering transport pays); what the
    kernel does not take waits, and the producer is paused until it is
    sent, so a direction holds one chunk at most.
  - Interest is changed only when it really changes, on the engine's own
    epoll set, without the reactor's per-event logging context.
  - L{ISplicing}: two of these transports can move a direction's bytes
    socket to socket inside the kernel (C{splice(2)} through a pipe) once
    the direction carries bulk data, with the byte counts still reported.

Errors are Twisted's: a reset ends in L{ConnectionLost}, an orderly close
in L{ConnectionDone}, C{abortConnection} in L{ConnectionAborted} and a
reset sent to the peer.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ISystemHandle,
    ITCPTransport,
)
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from tcpproxy.transport.poller import AVAILABLE, GONE, READ, WRITE, Poller

CHUNK = 64 * 1024
"""
Bytes read at once unless told otherwise (C{bufferSize}): Twisted's own
read size.  A read that fills it is the sign of bulk data that starts
splicing (L{ISplicing}).
"""

SPLICE = AVAILABLE and hasattr(os, "splice")
"""
Whether this platform can splice (Linux).
"""

PIPE_SIZE = 256 * 1024
"""
The pipe a spliced direction asks for (the kernel may give less); it bounds
what that direction holds, in the kernel, when the receiver is slow.
"""

_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_WOULD_BLOCK = (BlockingIOError, InterruptedError)
_SHUT_ASKED = 1
_SHUT_DONE = 2
_ABORTED = 3
"""
C{_shutRequested} of a transport whose write side is to be shut once
flushed, of one whose write side is shut, and of one aborted (else
C{False}): each says that nothing more is written.
"""

_READ_DONE = 2
"""
C{_paused} of a transport whose peer's EOF was read: nothing more is read,
whatever C{resumeProducing} says (else C{True} while paused, or C{False}).
"""

_HALF_CLOSE = 1
_NODELAY_ON = 2
_NODELAY_OFF = 4
"""
Bits of a transport's C{_traits}: its protocol is half-closeable;
C{TCP_NODELAY} is known to be on, or off (neither: not known).
"""

_RESET = struct.pack("ii", 1, 0)
"""
C{SO_LINGER} on, with no time to linger: the close sends a reset.
"""


class ISplicing(Interface):
    """
    A transport whose bytes can go to another such transport without
    passing through user space.
    """

    def spliceTo(consumer: ISplicing, counter: ISpliceCounter) -> bool:
        """
        Allow this transport to move what it reads straight to C{consumer},
        once the direction carries bulk data (a full chunk read at once).
        From then on its protocol's C{dataReceived} is not called for those
        bytes: C{counter.spliced(n)} is, for every C{n} bytes moved, and EOF
        and errors arrive as before.  It ends when either transport closes.

        @param counter: told of the bytes moved.  An object, not a bound
            method: it is kept for the life of the connection, and a bound
            method would be 64 more bytes for every idle one.
        @return: whether splicing is possible between the two.
        """


class ISpliceCounter(Interface):
    """
    What is told of the bytes a spliced direction moves (L{ISplicing}).
    """

    def spliced(size: int) -> None:
        """
        C{size} bytes went to the consumer inside the kernel.
        """


class IClosedListener(Interface):
    """
    What a transport tells once its protocol has been told the connection
    is gone (a client connector, which tells its factory).
    """

    def transportClosed(reason: Failure) -> None:
        """
        The transport's connection is gone, for C{reason}.
        """


class IWriteBuffer(Interface):
    """
    A transport that says how much it still has to send.
    """

    bufferedBytes = Attribute("Bytes written to the transport and not yet taken by the kernel.")


_WILDCARDS = frozenset({"0.0.0.0", "::"})
"""
The addresses a listening socket bound to every address of the host has.
"""

_DONE = Failure(ConnectionDone())
"""
The reason of every orderly close, made once: a L{Failure} costs a few
microseconds to make, twice per relayed connection.
"""

_ABORTED_REASON = Failure(ConnectionAborted())
"""
The reason of every close by C{abortConnection}, made once too.
"""


def peerAddress(address: tuple) -> IPv4Address | IPv6Address:
    """
    A socket address as C{accept} gives it (an IPv6 one is a 4-tuple), as
    Twisted writes it.
    """
    return _address(address[0], address[1])


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    """
    An IP address (IPv6 ones have colons, IPv4 ones none) and port, as
    Twisted writes them.
    """
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def _lostReason(error: OSError | None) -> Failure:
    if error is None:
        return _DONE
    return Failure(ConnectionLost(error.strerror or str(error)))


@implementer(ITCPTransport, ISystemHandle, IPushProducer, IConsumer, ISplicing, IWriteBuffer)
class SocketTransport:
    """
    A connected socket, relayed by the fast engine.

    @ivar protocol: the protocol it delivers to.
    @ivar connected: true until the socket is closed.
    @ivar disconnecting: C{loseConnection} was called.
    @ivar bufferSize: bytes read at once (L{CHUNK} unless set), as on
        Twisted's own transports.
    """

    __slots__ = (
        "_poller",
        "socket",
        "protocol",
        "_traits",
        "_host",
        "_peer",
        "_peerPort",
        "_mask",
        "_buffer",
        "_producer",
        "_producerPaused",
        "_paused",
        "_shutRequested",
        "disconnecting",
        "connected",
        "_spliceOut",
        "_spliceIn",
        "_spliceConsumer",
        "_spliceCounter",
        "bufferSize",
    )

    def __init__(
        self,
        poller: Poller,
        sock: socket.socket,
        protocol: IProtocol,
        peer: tuple | None,
        host: IPv4Address | IPv6Address | None = None,
        connector: IClosedListener | None = None,
        watched: int = 0,
        noDelay: bool | None = None,
    ) -> None:
        """
        @param peer: the remote address as C{accept} gave it (a tuple);
            C{None} for a dialled socket, whose C{connector} gives it when
            asked.  Only its host and port are kept: not an address object,
            nor the tuple (for the life of the connection, 150 and 56 bytes
            more per idle one), for what is rarely asked for.
        @param host: for an accepted socket, the address of the listening
            socket it came from (one object for all its connections): its
            own address (L{getHost}, no system call), or on a wildcard
            listener (C{0.0.0.0}, C{::}) its port.
        @param connector: for a dialled socket: the L{IConnector} that
            dialled it, which gives the peer's address when asked, and is
            told with the reason after the protocol's C{connectionLost} (a
            client connector tells its factory).
        @param watched: the interest C{sock} is registered with in C{poller}
            already (by the connector that dialled it), whose handler this
            transport takes over.
        @param noDelay: whether C{TCP_NODELAY} is known to be set (an
            accepted socket inherits the listening socket's), or C{None}.
        """
        self._poller = poller
        self.socket = sock
        self.protocol = protocol
        # What is asked once or twice per connection, in one slot (8 bytes
        # per socket less for every idle connection): whether the protocol
        # is half-closeable, and what TCP_NODELAY is known to be.
        traits = _HALF_CLOSE if IHalfCloseableProtocol.providedBy(protocol) else 0
        if noDelay is not None:
            traits |= _NODELAY_ON if noDelay else _NODELAY_OFF
        self._traits = traits
        # One pair of slots for the two kinds (8 bytes per socket less for
        # every idle connection): an accepted socket's peer host and port,
        # or a dialled socket's connector and None.
        if connector is None:
            self._peer: str | IClosedListener = peer[0]
            self._peerPort: int | None = peer[1]
        else:
            self._peer = connector
            self._peerPort = None
        self._host = host
        self._mask = 0
        self._buffer: list | None = None  # made when something waits (memory per idle connection)
        self._producer: IPushProducer | None = None
        self._producerPaused = False
        # True while paused, _READ_DONE once EOF was read: one slot.
        self._paused: bool | int = False
        # _SHUT_ASKED, then _SHUT_DONE, once loseWriteConnection was called;
        # _ABORTED once abortConnection was: one slot for what stops writes.
        self._shutRequested: int | bool = False
        self.disconnecting = False
        self.connected = True
        self._spliceOut: _Splice | None = None
        self._spliceIn: _Splice | None = None
        self._spliceConsumer: SocketTransport | None = None
        self._spliceCounter = None
        self.bufferSize = CHUNK
        if watched:
            poller.handOver(sock.fileno(), self)
            self._mask = watched

    def startReading(self) -> None:
        """
        Connect the protocol and start reading (called once, by the engine).
        """
        self.protocol.makeConnection(self)
        if self.connected:
            self._update()

    # Readiness

    def __call__(self, events: int) -> None:
        """
        The poller's handler for this socket: the transport itself, not a
        bound method of it (64 bytes less for every idle connection).

        The read is done here, not in a method of its own: it is the
        commonest event of all, and a call less for each.
        """
        mask = self._mask
        if self.disconnecting and not mask & WRITE:
            return  # closing, with nothing left to send (see _update)
        wrote = False
        if events & WRITE and mask & WRITE:
            wrote = True
            self._doWrite()
        if self.connected and events & ~WRITE and mask & READ and self._mask & READ:
            # Readable, or in error or hung up: the read says which.
            splice = self._spliceOut
            if splice is not None:
                splice.pull()
            else:
                try:
                    data = self.socket.recv(self.bufferSize)
                except _WOULD_BLOCK:
                    data = None
                except OSError as e:
                    self._lost(e)
                    return
                if data is None:
                    if not wrote:
                        return
                elif not data:
                    self._readEOF()
                else:
                    self.protocol.dataReceived(data)
                    if len(data) == CHUNK and self._spliceConsumer is not None and self.connected:
                        self._startSplice()
                    elif not wrote:
                        # Data, delivered: whatever that changed (a pause, a
                        # close, bytes left to send) asked for its own
                        # interest.  The common case, without a look at it.
                        return
        elif not wrote and events & GONE and self.connected:
            # Error or hang-up on a socket that is neither read nor written now.
            error = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._lost(OSError(error, os.strerror(error)) if error else None)
            return
        if self.connected:
            self._update()

    def _update(self) -> None:
        """
        Ask the epoll set for the events this socket needs now.
        """
        mask = 0
        if not (self._paused or self.disconnecting):
            splice = self._spliceOut
            if splice is None or not splice.inPipe:
                mask = READ
        if self._buffer or (self._spliceIn is not None and self._spliceIn.inPipe):
            mask |= WRITE
        old = self._mask
        if mask == old:
            return
        if not mask and self.disconnecting:
            # Nothing left to send: the close is on its way (asked for by
            # L{loseConnection} or L{abortConnection}, once the events being
            # handled are), and closing takes the socket out of the epoll
            # set.  No system call to take it out first (one per
            # connection); until the close, its events are ignored
            # (L{__call__}).
            return
        self._mask = mask
        # The descriptor's number is asked of the socket, not kept: kept, it
        # is an int object of 32 bytes per socket for the life of every
        # connection, and it is needed only here, beside a system call.
        if not mask:
            # Hang-up would be reported for ever: stop watching instead.
            self._poller.unregister(self.socket.fileno())
        elif not old:
            self._poller.register(self.socket.fileno(), mask, self)
        else:
            self._poller.modify(self.socket.fileno(), mask)

    def _readEOF(self) -> None:
        """
        The peer sent EOF: a half-closeable protocol is told and may go on
        writing; any other is closed, as Twisted does.
        """
        if not self._traits & _HALF_CLOSE:
            self._lost(None)
            return
        self._paused = _READ_DONE
        self.protocol.readConnectionLost()

    def _doWrite(self) -> None:
        splice = self._spliceIn
        if splice is not None and splice.inPipe:
            splice.push()
            if not self.connected or splice.inPipe:
                return
        if self._buffer:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            try:
                sent = self.socket.send(data)
            except _WOULD_BLOCK:
                return
            except OSError as e:
                self._lost(e)
                return
            if sent < len(data):
                self._buffer = [memoryview(data)[sent:]]
                return
            self._buffer = None
        self._flushed()

    def _flushed(self) -> None:
        """
        Nothing is left to send: resume the producer, and do the close or
        the shutdown asked for meanwhile.
        """
        if self._producer is not None and self._producerPaused:
            self._producerPaused = False
            self._producer.resumeProducing()
            if not self.connected or self._buffer:
                return
        if self._shutRequested == _SHUT_ASKED:
            self._shutWrite()
        if self.disconnecting and self._shutRequested != _ABORTED:
            self._close(None)

    def _shutWrite(self) -> None:
        self._shutRequested = _SHUT_DONE
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._lost(e)
            return
        if self._traits & _HALF_CLOSE:
            self._poller.soon(self._writeConnectionLost)

    def _writeConnectionLost(self) -> None:
        if self.connected:
            self.protocol.writeConnectionLost()

    # ITransport

    def write(self, data: bytes) -> None:
        if not self.connected or self._shutRequested or not data:
            return
        buffer = self._buffer
        if buffer is None:
            if self._spliceIn is None or not self._spliceIn.inPipe:
                try:
                    sent = self.socket.send(data)
                except _WOULD_BLOCK:
                    sent = 0
                except OSError:
                    # The error is met again, and handled, when the socket is
                    # written next (from the event loop, not from the caller).
                    sent = 0
                if sent == len(data):
                    return
                if sent:
                    data = memoryview(data)[sent:]
            buffer = self._buffer = []
        buffer.append(data)
        producer = self._producer
        if producer is not None and not self._producerPaused:
            self._producerPaused = True
            producer.pauseProducing()
        if self.connected and not self._mask & WRITE:
            self._update()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """
        Close once what was written has been sent.
        """
        if not self.connected or self.disconnecting:
            return
        self.disconnecting = True
        if not self._buffer and (self._spliceIn is None or not self._spliceIn.inPipe):
            self._poller.soon(self._closeIfConnected, None)
        else:
            self._update()

    def loseWriteConnection(self) -> None:
        """
        Send EOF once what was written has been sent; the peer may go on
        sending.
        """
        if not self.connected or self._shutRequested:
            return  # (after abortConnection, a FIN would pass for an orderly end)
        self._shutRequested = _SHUT_ASKED
        if not self._buffer and (self._spliceIn is None or not self._spliceIn.inPipe):
            self._shutWrite()

    def abortConnection(self) -> None:
        """
        Close at once with a reset, dropping what is not sent: a peer cut off
        mid-stream must not take the close for an orderly end.
        """
        if not self.connected or self._shutRequested == _ABORTED:
            return
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
        self._buffer = None
        self._shutRequested = _ABORTED
        # Nothing more is read or written; the close comes from the loop.
        self.disconnecting = True
        self._update()
        self._poller.soon(self._closeIfConnected, _ABORTED_REASON)

    def _closeIfConnected(self, reason: Failure | None) -> None:
        if self.connected:
            self._close(reason)

    def _lost(self, error: OSError | None) -> None:
        self._close(_lostReason(error))

    def _close(self, reason: Failure | None) -> None:
        """
        Close the socket and tell the protocol (and the producer, as a
        Twisted transport does) that the connection is gone.
        """
        if not self.connected:
            return
        self.connected = False
        aborted = self._shutRequested == _ABORTED
        orderly = reason is None and not aborted
        if reason is None:
            reason = _ABORTED_REASON if aborted else _DONE
        if self._mask:
            self._poller.forget(self.socket.fileno())
            self._mask = 0
        if self._spliceIn is not None:
            self._spliceIn.close()
        splice = self._spliceOut
        if splice is not None and not (splice.inPipe and splice.dst.connected):
            splice.close()
        # Else the pipe holds bytes read from this socket (and counted):
        # the consumer still sends them, then closes the pipe (L{_Splice.push}).
        self._buffer = None
        if orderly and self._shutRequested != _SHUT_DONE and self._paused != _READ_DONE:
            # EOF first, as Twisted's transport does: a peer whose last bytes
            # were not read then sees an orderly end, not only the reset
            # that closing with unread bytes sends.  (After the peer's EOF
            # nothing is left unread, and the close alone sends EOF.)
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.socket.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        # Drop the links that make cycles (to the protocol, which refers
        # back here, and to the splice consumer, which may refer back too),
        # as Twisted's transports do: a closed connection is then freed as
        # soon as nobody holds it, not left to the cyclic garbage collector.
        self._spliceConsumer = self._spliceCounter = None
        protocol, self.protocol = self.protocol, None
        try:
            protocol.connectionLost(reason)
        finally:
            if self._peerPort is None:
                self._peer.transportClosed(reason)

    def getPeer(self) -> IPv4Address | IPv6Address:
        if self._peerPort is None:
            return self._peer.getDestination()
        return _address(self._peer, self._peerPort)

    def getHost(self) -> IPv4Address | IPv6Address:
        listening = self._host
        if listening is not None and listening.host not in _WILDCARDS:
            return listening
        # Not kept: asked once per connection, if at all.  On a wildcard
        # listener only the socket knows which of the host's addresses the
        # client dialled (a PROXY header's destination); the port is the
        # listener's, one int object for all its connections (a relay keeps
        # it for the life of each).
        address = self.socket.getsockname()
        kind = IPv6Address if self.socket.family == socket.AF_INET6 else IPv4Address
        return kind("TCP", address[0], address[1] if listening is None else listening.port)

    # ITCPTransport

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled: bool) -> None:
        # A system call saved per connection where the state is known.
        known = _NODELAY_ON if enabled else _NODELAY_OFF
        if not self._traits & known:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)
            self._traits = (self._traits & ~(_NODELAY_ON | _NODELAY_OFF)) | known

    def getTcpKeepAlive(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)

    # ISystemHandle

    def getHandle(self) -> socket.socket:
        return self.socket

    # IPushProducer

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            if self.connected and self._mask & READ:
                self._update()

    def resumeProducing(self) -> None:
        if self._paused is True:
            self._paused = False
            if self.connected:
                self._update()

    def stopProducing(self) -> None:
        self.loseConnection()

    # IConsumer

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"Cannot register producer {producer!r}: {self._producer!r} is registered")
        if not self.connected:
            producer.stopProducing()
            return
        self._producer = producer
        self._producerPaused = bool(self._buffer)
        if self._producerPaused:
            producer.pauseProducing()
        elif not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producerPaused = False

    # IWriteBuffer

    @property
    def bufferedBytes(self) -> int:
        splice = self._spliceIn
        # Counted when asked (rarely: closing a side), not on every write.
        buffered = sum(map(len, self._buffer)) if self._buffer else 0
        return buffered + (splice.inPipe if splice is not None else 0)

    # ISplicing

    def spliceTo(self, consumer: ISplicing, counter: ISpliceCounter) -> bool:
        if not SPLICE or not isinstance(consumer, SocketTransport):
            return False
        self._spliceConsumer = consumer
        self._spliceCounter = counter
        return True

    def _startSplice(self) -> None:
        """
        Bulk: from now on, move this direction's bytes with C{splice}, if
        the consumer is still there and has nothing of ours waiting.
        """
        consumer = self._spliceConsumer
        if not consumer.connected or consumer._shutRequested:
            self._spliceConsumer = self._spliceCounter = None
            return
        if consumer._buffer:
            return  # bytes of ours wait there: the next full chunk may find it empty
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors: copying works as well
        try:
            fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the user's pipe budget: the default size works too
        self._spliceOut = consumer._spliceIn = _Splice(self, consumer, pipe, self._spliceCounter)
        self._spliceConsumer = self._spliceCounter = None

    def logPrefix(self) -> str:
        return "tcpproxy"


class _Splice:
    """
    One direction moved by C{splice(2)}: from C{src}'s socket into a pipe,
    from the pipe to C{dst}'s socket.

    @ivar inPipe: bytes in the pipe not yet sent to C{dst}.
    """

    __slots__ = ("src", "dst", "pipe", "inPipe", "counter")

    def __init__(self, src: SocketTransport, dst: SocketTransport, pipe: tuple[int, int], counter) -> None:
        self.src = src
        self.dst = dst
        self.pipe = pipe
        self.inPipe = 0
        self.counter = counter

    def pull(self) -> None:
        """
        C{src} is readable: move what it has into the pipe, then on.
        """
        src = self.src
        try:
            size = os.splice(src.socket.fileno(), self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except _WOULD_BLOCK:
            return
        except OSError as e:
            src._lost(e)
            return
        if not size:
            src._readEOF()
            return
        self.inPipe = size
        self.counter.spliced(size)
        self.push()
        dst = self.dst
        if not dst.connected:
            return
        if self.inPipe:
            dst._update()
        elif not dst._buffer:
            # A shutdown or close asked for while the pipe held bytes.
            dst._flushed()

    def push(self) -> None:
        """
        Send what the pipe holds to C{dst}.
        """
        dst = self.dst
        fd = dst.socket.fileno()
        try:
            while self.inPipe:
                self.inPipe -= os.splice(self.pipe[0], fd, self.inPipe, flags=_SPLICE_FLAGS)
        except _WOULD_BLOCK:
            return
        except OSError as e:
            dst._lost(e)
            return
        src = self.src
        if src.connected:
            src._update()
        else:
            # The last bytes of a source that is gone have been sent.
            self.close()

    def close(self) -> None:
        """
        Either side is gone: whatever the pipe still held is lost with it.
        """
        if self.pipe is None:
            return
        os.close(self.pipe[0])
        os.close(self.pipe[1])
        self.pipe = None
        self.inPipe = 0
        self.src._spliceOut = None
        self.dst._spliceIn = None
        for side in (self.src, self.dst):
            if side.connected:
                side._update()
