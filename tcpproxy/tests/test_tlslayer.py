"""
L{tcpproxy.tlslayer} in memory: two layers (a client's and a server's)
over L{twisted.test.iosim}'s fake transports, each under a protocol that
records what it is told.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import Clock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcpproxy.tests.certs import ALPHA, pki
from tcpproxy.tlslayer import TLSLayer, TLSLayerFactory, representsEOF


class _Closer(Protocol):
    """
    Records what it is told, as C{events}; not half-closeable.
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = b""
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.events.append("data")

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.events.append("lost")


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class _Recorder(_Closer):
    """
    A half-closeable L{_Closer} that listens for the handshake.
    """

    def handshakeCompleted(self) -> None:
        self.events.append("handshake")

    def readConnectionLost(self) -> None:
        self.events.append("readLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeLost")


@implementer(IPushProducer)
class _Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def _serverOptions() -> CertificateOptions:
    files = pki()
    pair = PrivateCertificate.loadPEM(files["alpha.pem"] + files["alpha.key"])
    return CertificateOptions(privateKey=pair.privateKey.original, certificate=pair.original)


def _clientCreator(name: str = ALPHA):
    return optionsForClientTLS(name, trustRoot=Certificate.loadPEM(pki()["ca.pem"]))


class TLSLayerTests(SynchronousTestCase):
    """
    Half-close, full close, abort, writes before the handshake, and errors,
    between a client's layer and a server's.
    """

    def connect(self, server=None, client=None, clientName: str = ALPHA, greet: bool = True):
        """
        A client's layer and a server's, over fake transports, each under
        a L{_Recorder} (or the protocol given); C{self.pump} moves bytes.
        """
        self.clock = Clock()
        self.server = server if server is not None else _Recorder()
        self.client = client if client is not None else _Recorder()
        serverFactory = TLSLayerFactory(
            _serverOptions(), False, Factory.forProtocol(lambda: self.server), self.clock
        )
        clientFactory = TLSLayerFactory(
            _clientCreator(clientName), True, Factory.forProtocol(lambda: self.client), self.clock
        )
        self.serverLayer = serverFactory.buildProtocol(None)
        self.clientLayer = clientFactory.buildProtocol(None)
        self.serverIO = FakeTransport(self.serverLayer, True)
        self.clientIO = FakeTransport(self.clientLayer, False)
        self.pump = connect(
            self.serverLayer, self.serverIO, self.clientLayer, self.clientIO, greet=greet, clock=self.clock
        )

    def test_interfaces(self) -> None:
        """
        The layer is a TCP-like transport with TLS's own interfaces, and
        gives the L{SSL.Connection} as its handle (for the SNI name, ALPN,
        version...).
        """
        self.connect()
        for interface in (ITCPTransport, ISSLTransport, ISystemHandle, INegotiated, IConsumer, IPushProducer):
            self.assertTrue(verifyObject(interface, self.serverLayer))
        handle = self.serverLayer.getHandle()
        self.assertIsInstance(handle, SSL.Connection)
        self.assertEqual(handle.get_servername(), ALPHA.encode("ascii"))
        self.assertIsNone(self.serverLayer.negotiatedProtocol)
        self.assertEqual(self.serverLayer.getPeer(), self.serverIO.getPeer())
        self.assertEqual(self.server.events, ["made", "handshake"])

    def test_closeNotifyIsReadConnectionLost(self) -> None:
        """
        A peer's C{close_notify} is C{readConnectionLost}, and what is
        written after it still reaches the peer (RFC 8446 section 6.1).
        """
        self.connect()
        self.clientLayer.write(b"request")
        self.clientLayer.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(self.server.events, ["made", "handshake", "data", "readLost"])
        self.assertEqual(self.client.events[-1], "writeLost")
        self.serverLayer.write(b"answer")
        self.pump.flush()
        self.assertEqual(self.client.data, b"answer")
        self.assertFalse(self.serverIO.disconnecting)

    def test_bothHalvesThenClose(self) -> None:
        """
        Once both have sent C{close_notify}, C{loseConnection} closes the
        TCP connection at once, cleanly on both sides.
        """
        self.connect()
        self.clientLayer.loseWriteConnection()
        self.pump.flush()
        self.serverLayer.write(b"answer")
        self.serverLayer.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(self.client.events[-2:], ["data", "readLost"])
        self.assertEqual(self.server.events[-2:], ["readLost", "writeLost"])
        self.serverLayer.loseConnection()
        self.pump.flush()
        self.assertEqual(self.server.events[-1], "lost")
        self.assertEqual(self.client.events[-1], "lost")
        self.server.reason.trap(ConnectionDone)
        self.client.reason.trap(ConnectionDone)

    def test_notHalfCloseableIsClosed(self) -> None:
        """
        A protocol that is not half-closeable has its peer's
        C{close_notify} answered, and the connection closed (Twisted's
        behaviour); the peer sees its own C{close_notify} answered.
        """
        self.connect(server=_Closer())
        self.clientLayer.write(b"request")
        self.clientLayer.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(self.server.events, ["made", "data", "lost"])
        self.server.reason.trap(ConnectionDone)
        self.assertIn("readLost", self.client.events)

    def test_loseConnectionWaitsForTheAnswer(self) -> None:
        """
        C{loseConnection} sends C{close_notify} and closes the TCP
        connection only once the peer has answered with its own; what the
        peer sends meanwhile is still delivered.
        """
        self.connect()
        self.serverLayer.loseConnection()
        self.pump.flush()
        self.assertEqual(self.client.events[-1], "readLost")
        self.assertFalse(self.serverIO.disconnecting)
        self.clientLayer.write(b"late")
        self.pump.flush()
        self.assertEqual(self.server.data, b"late")
        self.clientLayer.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(self.server.events[-1], "lost")
        self.server.reason.trap(ConnectionDone)

    def test_abortSendsNoCloseNotify(self) -> None:
        """
        C{abortConnection} aborts the TCP connection and sends nothing
        first: a C{close_notify} would pass for an orderly end.
        """
        self.connect()
        self.serverLayer.abortConnection()
        self.assertFalse(self.serverIO.getOutBuffer())
        self.assertTrue(self.serverIO.disconnecting)

    def test_writesWaitForTheHandshake(self) -> None:
        """
        What is written before the handshake completes is held (a producer
        is paused meanwhile), then sent, and the producer resumed.
        """
        self.connect(greet=False)
        producer = _Producer()
        self.clientLayer.registerProducer(producer, True)
        self.clientLayer.write(b"early")
        self.assertEqual(self.clientLayer.heldBytes, 5)
        self.assertEqual(producer.calls, ["pause"])
        self.pump.flush()
        self.assertEqual(self.clientLayer.heldBytes, 0)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertEqual(self.server.data, b"early")

    def test_loseConnectionBeforeTheHandshakeAborts(self) -> None:
        """
        Before the handshake, with nothing written, there is no TLS session
        to close: C{loseConnection} aborts.
        """
        self.connect(greet=False)
        self.serverLayer.loseConnection()
        self.assertTrue(self.serverIO.disconnecting)
        self.assertFalse(self.serverIO.getOutBuffer())

    def test_verificationFailure(self) -> None:
        """
        A certificate that is not for the name asked for fails the
        handshake; the reason (service-identity's) reaches the protocol.
        """
        self.connect(clientName="not-alpha.test")
        self.assertEqual(self.client.events, ["made", "lost"])
        from service_identity import VerificationError

        self.client.reason.trap(VerificationError)

    def test_truncation(self) -> None:
        """
        The TCP connection ending without C{close_notify} is a truncation,
        reported as L{ConnectionLost}.
        """
        self.connect()
        self.clientLayer.connectionLost(Failure(ConnectionDone()))
        self.client.reason.trap(ConnectionLost)

    def test_eofAfterCloseNotifyIsClean(self) -> None:
        """
        The TCP connection ending after the peer's C{close_notify} is a
        clean end.
        """
        self.connect()
        self.serverLayer.loseWriteConnection()
        self.pump.flush()
        self.clientLayer.connectionLost(Failure(ConnectionDone()))
        self.client.reason.trap(ConnectionDone)

    def test_representsEOF(self) -> None:
        self.assertTrue(representsEOF(SSL.SysCallError(-1, "Unexpected EOF")))
        self.assertTrue(representsEOF(SSL.Error([("SSL routines", "", "unexpected eof while reading")])))
        self.assertTrue(representsEOF(SSL.Error([])))
        self.assertFalse(representsEOF(SSL.Error([("SSL routines", "", "bad record mac")])))

    def test_factory(self) -> None:
        """
        The factory builds nothing for a protocol its factory refuses.
        """
        factory = TLSLayerFactory(_serverOptions(), False, Factory.forProtocol(lambda: None), Clock())
        factory.wrappedFactory.buildProtocol = lambda addr: None
        self.assertIsNone(factory.buildProtocol(None))
        built = TLSLayerFactory(_serverOptions(), False, Factory.forProtocol(_Recorder), Clock())
        self.assertIsInstance(built.buildProtocol(None), TLSLayer)


class PendingMemoryTests(SynchronousTestCase):
    """
    What a handshake under way costs in Python objects (OpenSSL's own
    state, some 55 KiB, is the same for any layer on memory BIOs): no more
    than with Twisted's C{TLSMemoryBIOProtocol}, which the layer replaced.
    """

    def pending(self, factory, hello: bytes, count: int = 100) -> float:
        """
        Bytes allocated by Python per server connection that has answered
        C{hello}, over C{count} of them (measured with L{tracemalloc}).
        """
        import gc
        import tracemalloc

        kept = []
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(count):
                layer = factory.buildProtocol(None)
                transport = StringTransport()
                layer.makeConnection(transport)
                layer.dataReceived(hello)
                self.assertTrue(transport.value(), "the ClientHello was not answered")
                kept.append((layer, transport))
            gc.collect()
            return (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()

    def test_notMoreThanTwisted(self) -> None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_connect_state()
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        hello = client.bio_read(65536)
        options, protocols = _serverOptions(), Factory.forProtocol(_Recorder)
        ours = self.pending(TLSLayerFactory(options, False, protocols, Clock()), hello)
        theirs = self.pending(TLSMemoryBIOFactory(options, False, protocols, Clock()), hello)
        self.assertLessEqual(ours, theirs, f"{ours:.0f} bytes per handshake, Twisted's {theirs:.0f}")
