"""
The proxy's TLS layer: TLS on pyOpenSSL memory BIOs between a TCP
transport and the protocol above it, for termination and origination
alike, with half-close.

Twisted's L{twisted.protocols.tls.TLSMemoryBIOProtocol} does the same job
but for one thing the relay needs: RFC 8446 section 6.1 makes
C{close_notify} close the I{sender's} write side only (Go's
C{tls.Conn.CloseWrite}, for one, sends it and waits for the answer), and
Twisted answers it with its own C{close_notify} and closes the connection,
while its C{loseWriteConnection} is broken (Twisted #5341).  Here:

  - A peer's C{close_notify} is C{readConnectionLost} for an
    L{IHalfCloseableProtocol} (as a TCP FIN is), and the protocol may go
    on writing; a protocol that is not half-closeable is closed, with
    C{close_notify} answered, as Twisted does.
  - C{loseWriteConnection} sends C{close_notify} once what was written is
    encrypted, calls C{writeConnectionLost}, and goes on reading.
  - C{loseConnection} sends C{close_notify} (if not sent yet) and closes
    the TCP connection once the peer's C{close_notify} has come (at once if
    it came before): a peer of the TLS 1.2 habit, which answers
    C{close_notify} with its own at once, closes cleanly; one that never
    answers is for the caller to abort (L{tcpproxy.tls.TLSCloser}).
  - C{abortConnection} resets the TCP connection without C{close_notify}:
    a reset must not pass for an orderly end.
  - A TCP FIN ends the TLS connection as a whole, as with Twisted (a TLS
    peer says it is done writing with C{close_notify}); a FIN without
    C{close_notify} first is a truncation, reported as L{ConnectionLost}.

The handling of OpenSSL's errors (C{WantReadError} for writes before the
handshake, an EOF in violation of the protocol squashed into
L{ConnectionLost}, alerts flushed before the close), and the producer
membrane, follow Twisted's C{TLSMemoryBIOProtocol}; its private names are
not used.
"""

from __future__ import annotations

from OpenSSL.SSL import Connection, Error, SysCallError, WantReadError, ZeroReturnError
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IHandshakeListener,
    ILoggingContext,
    INegotiated,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

READ_SIZE = 2**16
"""
Bytes asked of OpenSSL per read, plaintext or ciphertext (pyOpenSSL
allocates that much, unzeroed, per call).
"""


def representsEOF(error: Error) -> bool:
    """
    Whether an OpenSSL error is an end of file in violation of the protocol
    (the TCP connection ended without C{close_notify}); as Twisted tells it.
    """
    if isinstance(error, SysCallError):
        return str(error.args[-1]).casefold().startswith("unexpected eof")
    queue = error.args[0] if error.args else None
    if not queue:
        return True  # OpenSSL 4 reports it with an empty queue.
    return str(queue[-1][-1]).casefold().startswith("unexpected eof")


@implementer(IPushProducer)
class _Membrane:
    """
    The producer the TLS layer registers with the TCP transport for the
    protocol's own: pauses from the TCP transport (its buffer is full) and
    from the TLS layer (writes wait for the handshake) are passed on once,
    as Twisted's C{_ProducerMembrane} does.
    """

    __slots__ = ("producer", "paused")

    def __init__(self, producer: IPushProducer) -> None:
        self.producer = producer
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()


@implementer(ITCPTransport, ISSLTransport, ISystemHandle, INegotiated, IConsumer, IPushProducer)
class TLSLayer(Protocol):
    """
    TLS between a TCP transport (this protocol's C{transport}) and the
    protocol above (C{wrappedProtocol}, for which this is the transport).

    @ivar wrappedProtocol: the protocol above; it may be replaced (before
        the handshake completes: see L{tcpproxy.tls}), as what the next
        event goes to.
    @ivar disconnecting: C{loseConnection} or C{abortConnection} was called.
    """

    def __init__(self, factory: TLSLayerFactory, wrappedProtocol) -> None:
        self.factory = factory
        self.wrappedProtocol = wrappedProtocol
        self.disconnecting = False
        self._tls: Connection | None = None
        self._handshakeDone = False
        self._waiting: list[bytes] = []  # written before the handshake completed
        self._producer: _Membrane | None = None
        self._readClosed = False  # the peer's close_notify came
        self._writeClosing = False  # loseWriteConnection was called
        self._writeClosed = False  # our close_notify is sent
        self._lost = False  # the TLS connection is over (error, or closed)
        self._aborted = False
        self._reason: Failure | None = None

    # Events from the TCP transport

    def makeConnection(self, transport) -> None:
        creator = self.factory.creator
        if self.factory.isClient:
            tls = creator.clientConnectionForTLS(self)
            tls.set_connect_state()
        else:
            tls = creator.serverConnectionForTLS(self)
            tls.set_accept_state()
        tls.set_app_data(self)
        self._tls = tls
        Protocol.makeConnection(self, transport)
        self.wrappedProtocol.makeConnection(self)
        self._handshake()

    def _handshake(self) -> None:
        """
        Go on with the handshake (the first call sends a client's
        ClientHello); once complete, tell the protocol above, if it listens.
        """
        if self._aborted:
            return
        try:
            self._tls.do_handshake()
        except WantReadError:
            self._flush()
        except Error:
            self._failed(Failure())
        else:
            self._handshakeDone = True
            if IHandshakeListener.providedBy(self.wrappedProtocol):
                self.wrappedProtocol.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        if self._lost or self._aborted:
            return
        tls = self._tls
        tls.bio_write(data)
        if not self._handshakeDone:
            self._handshake()
            if not self._handshakeDone:
                return
        if self._waiting:
            # Written while the handshake (or a renegotiation) waited for
            # the peer: what just came may let it through.
            self._sendWaiting()
        self._receive()

    def _receive(self) -> None:
        """
        Deliver the plaintext the ciphertext received so far makes (one
        C{dataReceived} for all of it), then act on what ended the reading,
        if anything did, and send what OpenSSL has to send (session
        tickets, alerts, a C{close_notify} answered).
        """
        tls = self._tls
        chunks = []
        ended = None
        while True:
            try:
                chunks.append(tls.recv(READ_SIZE))
            except WantReadError:
                break
            except ZeroReturnError:
                ended = self._closeNotified
                break
            except Error:
                ended = Failure()
                break
        if chunks:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if self._aborted:
                return
        if ended is None:
            self._flush()
        elif isinstance(ended, Failure):
            self._failed(ended)
        elif not self._readClosed and not self._lost:
            ended()

    def _closeNotified(self) -> None:
        """
        The peer sent C{close_notify}: it will write no more (RFC 8446
        section 6.1).  A half-closeable protocol is told and may go on
        writing; any other is closed (C{close_notify} answered first), as is
        a connection being closed already.
        """
        self._readClosed = True
        protocol = self.wrappedProtocol
        if self.disconnecting:
            self._fullClose()
        elif IHalfCloseableProtocol.providedBy(protocol):
            self._flush()
            protocol.readConnectionLost()
        else:
            self.disconnecting = True
            self._fullClose()

    def connectionLost(self, reason: Failure) -> None:
        tls = self._tls
        if not self._lost and tls is not None:
            # No more is coming: what OpenSSL still holds is read (an EOF
            # without close_notify shows as an error there).
            self._lost = True
            if not self._readClosed:
                tls.bio_shutdown()
                try:
                    while True:
                        data = tls.recv(READ_SIZE)
                        if not self._aborted:
                            self.wrappedProtocol.dataReceived(data)
                except (WantReadError, ZeroReturnError):
                    pass
                except Error:
                    self._failed(Failure())
        reason = self._reason or reason
        self._reason = None
        self.connected = 0
        self._tls = None  # (its app data is this layer: no cycle left)
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        # (Dropped, as Twisted's transports drop theirs: the protocol refers
        # back to this layer, and the pair is freed by reference counting.)
        protocol.connectionLost(reason)

    # TLS errors and shutdown

    def _failed(self, reason: Failure) -> None:
        """
        TLS cannot go on (a handshake failure, a bad record, an EOF without
        C{close_notify}): send the alert OpenSSL has for it, and close the
        TCP connection; the protocol above gets C{reason} (the first, if
        several) from C{connectionLost}.
        """
        if representsEOF(reason.value):
            reason = Failure(ConnectionLost())
        if self._reason is None:
            self._reason = reason
        self._lost = True
        self._flush()
        self.transport.loseConnection()

    def _sendCloseNotify(self) -> None:
        """
        Send C{close_notify}, once.  (OpenSSL's C{SSL_shutdown} is called
        only this once: called again before the peer's C{close_notify}, it
        would read, and drop, what the peer still sends.)
        """
        if self._writeClosed:
            return
        self._writeClosed = True
        try:
            self._tls.shutdown()
        except Error:
            pass  # Mid-handshake: there is no TLS session to close.
        self._flush()

    def _fullClose(self) -> None:
        """
        The close C{loseConnection} asked for, once nothing waits to be
        sent: C{close_notify}, then the TCP connection is closed once the
        peer's C{close_notify} has come.
        """
        self._sendCloseNotify()
        if self._readClosed or not self._handshakeDone:
            self._flush()
            self.transport.loseConnection()

    def _flush(self) -> None:
        """
        Write what OpenSSL has to send to the TCP transport.
        """
        tls = self._tls
        while True:
            try:
                data = tls.bio_read(READ_SIZE)
            except WantReadError:
                return
            self.transport.write(data)
            if len(data) < READ_SIZE:
                return

    @property
    def heldBytes(self) -> int:
        """
        Plaintext written but not yet encrypted (it waits for the handshake
        to complete), in bytes.
        """
        return sum(map(len, self._waiting))

    # ITransport

    def write(self, data: bytes) -> None:
        """
        Encrypt C{data} and send it; before the handshake is complete it
        waits (and a producer is paused).  Bytes written once the write side
        is closed, or after C{loseConnection} without a producer, are
        dropped.
        """
        if self._lost or self._writeClosing or (self.disconnecting and self._producer is None) or not data:
            return
        if not self._handshakeDone or self._waiting:
            self._wait(data)
            return
        self._send(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def _wait(self, data: bytes) -> None:
        self._waiting.append(data)
        if self._producer is not None:
            self._producer.pauseProducing()

    def _send(self, data: bytes) -> None:
        tls = self._tls
        view = memoryview(data)
        while view:
            try:
                sent = tls.send(view)
            except WantReadError:
                self._wait(bytes(view))
                break
            except Error:
                self._failed(Failure())
                return
            view = view[sent:]
        self._flush()

    def _sendWaiting(self) -> None:
        """
        The handshake completed: send what waited for it, then resume the
        producer, or do the close asked for meanwhile.
        """
        waiting, self._waiting = self._waiting, []
        for data in waiting:
            self._send(data)
            if self._waiting or self._lost:
                return
        if self._producer is not None:
            self._producer.resumeProducing()
        elif self.disconnecting:
            self._fullClose()
        elif self._writeClosing:
            self._closeWrite()

    def loseWriteConnection(self) -> None:
        """
        Send C{close_notify} once what was written is sent, then call the
        protocol's C{writeConnectionLost} (in a later turn, as a TCP
        transport does); keep reading.
        """
        if self._writeClosing or self.disconnecting or self._lost:
            return
        self._writeClosing = True
        if not self._waiting:
            self._closeWrite()

    def _closeWrite(self) -> None:
        self._sendCloseNotify()
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.factory.clock.callLater(0, self._writeConnectionLost)

    def _writeConnectionLost(self) -> None:
        if self.connected and self.wrappedProtocol is not None:
            self.wrappedProtocol.writeConnectionLost()

    def loseConnection(self) -> None:
        """
        Send C{close_notify} once what was written is sent and the producer,
        if any, is unregistered; close the TCP connection once the peer has
        sent its own.  Before the handshake is complete, with nothing
        written, there is nothing to close cleanly: abort.
        """
        if self.disconnecting or not self.connected:
            return
        if not self._handshakeDone and not self._waiting:
            self.abortConnection()
            return
        self.disconnecting = True
        if self._lost:
            self.transport.loseConnection()
        elif not self._waiting and self._producer is None:
            self._fullClose()

    def abortConnection(self) -> None:
        """
        Reset the TCP connection at once, without C{close_notify}; nothing
        more is delivered to the protocol but C{connectionLost}.
        """
        self._aborted = True
        self.disconnecting = True
        self.transport.abortConnection()

    def failVerification(self, reason: Failure) -> None:
        """
        The peer's certificate was refused during the handshake (called by
        Twisted's verification callback of L{optionsForClientTLS}): abort,
        with C{reason} given to C{connectionLost}.
        """
        self._reason = reason
        self.abortConnection()

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    # ITCPTransport: the TCP options are the TCP transport's.

    def getTcpNoDelay(self) -> bool:
        return self.transport.getTcpNoDelay()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.transport.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    # ISystemHandle, ISSLTransport, INegotiated

    def getHandle(self) -> Connection | None:
        """
        The L{OpenSSL.SSL.Connection} (for its SNI name, ALPN protocol,
        version, cipher...); C{None} once the connection is lost.
        """
        return self._tls

    def getPeerCertificate(self):
        return self._tls.get_peer_certificate() if self._tls is not None else None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        protocol = self._tls.get_alpn_proto_negotiated() if self._tls is not None else None
        return protocol or None

    # IConsumer

    def registerProducer(self, producer, streaming: bool) -> None:
        """
        A streaming producer is registered with the TCP transport through a
        L{_Membrane} (so that the TLS layer may pause it too); a pull
        producer as it is (the TCP transport asks it for more whenever its
        buffer is empty, and what it writes passes through here).
        """
        if self._lost:
            producer.stopProducing()
            return
        if streaming:
            membrane = _Membrane(producer)
            self.transport.registerProducer(membrane, True)
            self._producer = membrane
            if self._waiting:
                membrane.pauseProducing()
        else:
            self.transport.registerProducer(producer, False)

    def unregisterProducer(self) -> None:
        self._producer = None
        self.transport.unregisterProducer()
        if self.disconnecting and not self._waiting and not self._lost:
            self._fullClose()

    # IPushProducer: reading is the TCP transport's.

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


@implementer(IProtocolFactory, ILoggingContext)
class TLSLayerFactory(Factory):
    """
    Puts a L{TLSLayer} between each TCP connection and the protocol
    C{wrappedFactory} builds for it.

    @ivar creator: makes each connection's L{OpenSSL.SSL.Connection}: an
        C{IOpenSSLServerConnectionCreator} (such as Twisted's
        L{CertificateOptions}) for a server, an
        C{IOpenSSLClientConnectionCreator} (such as
        L{optionsForClientTLS}'s) for a client; it is given the L{TLSLayer},
        which it may call back (C{failVerification}, C{abortConnection}).
    @ivar clock: what later turns are scheduled on.
    """

    noisy = False

    def __init__(
        self, creator, isClient: bool, wrappedFactory: IProtocolFactory, clock: IReactorTime
    ) -> None:
        self.creator = creator
        self.isClient = isClient
        self.wrappedFactory = wrappedFactory
        self.clock = clock

    def logPrefix(self) -> str:
        inner = self.wrappedFactory
        prefix = inner.logPrefix() if ILoggingContext.providedBy(inner) else type(inner).__name__
        return f"{prefix} (TLS)"

    def buildProtocol(self, addr) -> TLSLayer | None:
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return TLSLayer(self, protocol)
