"""
Tests for the fast engine (L{tcpproxy.transport}) on its own, without the
relay: that its objects provide the Twisted interfaces they claim, and that
L{SocketTransport} keeps the promises of Twisted's TCP transport on real
loopback sockets (writes, producers, half-close, close, abort, splice); the
L{Connector} that client endpoints dial through; and L{NameResolver}.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectBindError,
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IConnector,
    IConsumer,
    IHalfCloseableProtocol,
    IHostnameResolver,
    IPushProducer,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcpproxy.deadlines import Deadlines
from tcpproxy.demo import echoFactory
from tcpproxy.dialer import describeFailure
from tcpproxy.listening import bindTCP
from tcpproxy.resolve import NameResolver
from tcpproxy.tests.loopback import (
    Collector,
    captureEvents,
    connectClient,
    deadPort,
    eventually,
    listen,
    openSockets,
    unansweredPort,
)
from tcpproxy.transport import engine as engineModule
from tcpproxy.transport import tcp
from tcpproxy.transport.engine import Connector, FastEngine, IEngine, TwistedEngine
from tcpproxy.transport.poller import AVAILABLE, Poller
from tcpproxy.transport.tcp import ISpliceCounter, ISplicing, IWriteBuffer, SocketTransport

MiB = 1024 * 1024

if not AVAILABLE:
    skip = "no epoll here: the fast engine cannot run"




class _NoDNS:
    """
    A DNS resolver that fails the test if it is asked anything: no test
    may send a query off the machine.
    """

    def __init__(self, testCase) -> None:
        self.testCase = testCase

    def lookupAddress(self, name, timeout=None):
        self.testCase.fail(f"DNS asked for {name!r}")

    lookupIPV6Address = lookupAddress


class InterfaceTests(SynchronousTestCase):
    """
    Each object provides the Twisted interfaces its callers rely on.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = NameResolver(hostsResolver=_FakeResolver(), dnsResolver=_FakeResolver())

    def test_socketTransport(self) -> None:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        poller = Poller(self.reactor)
        self.addCleanup(poller.close)
        transport = SocketTransport(poller, a, Protocol(), ("127.0.0.1", 1))
        for interface in (ITCPTransport, IPushProducer, IConsumer, ISystemHandle, ISplicing, IWriteBuffer):
            self.assertTrue(verifyObject(interface, transport), interface)

    def test_peerOfAcceptedSockets(self) -> None:
        """
        An accepted socket's transport gives its peer as Twisted writes it,
        IPv4 or IPv6 (as C{accept} gave it), also once closed (for the log).
        """
        poller = Poller(self.reactor)
        self.addCleanup(poller.close)
        kinds = ((socket.AF_INET, "127.0.0.1", IPv4Address), (socket.AF_INET6, "::1", IPv6Address))
        for family, host, kind in kinds:
            listener = socket.socket(family)
            self.addCleanup(listener.close)
            try:
                listener.bind((host, 0))
            except OSError:
                raise SkipTest(f"no {host} here")
            listener.listen(1)
            client = socket.create_connection(listener.getsockname()[:2])
            self.addCleanup(client.close)
            accepted, address = listener.accept()
            transport = SocketTransport(poller, accepted, Protocol(), address)
            expected = kind("TCP", host, client.getsockname()[1])
            self.assertEqual(transport.getPeer(), expected)
            transport.abortConnection()
            self.reactor.advance(0)
            self.assertFalse(transport.connected)
            self.assertEqual(transport.getPeer(), expected)

    def test_fastEngine(self) -> None:
        engine = FastEngine(self.reactor, self.resolver)
        for interface in (IEngine, IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
            self.assertTrue(verifyObject(interface, engine), interface)
        self.assertIs(engine.reactor, engine)

    def test_twistedEngine(self) -> None:
        engine = TwistedEngine(self.reactor, self.resolver)
        for interface in (IEngine, IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
            self.assertTrue(verifyObject(interface, engine), interface)

    def test_connector(self) -> None:
        engine = FastEngine(self.reactor, self.resolver)
        connector = Connector(engine, "127.0.0.1", 1, Factory(), 30, None)
        self.assertTrue(verifyObject(IConnector, connector))
        self.assertEqual(connector.getDestination(), IPv4Address("TCP", "127.0.0.1", 1))
        six = Connector(engine, "::1", 2, Factory(), 30, None)
        self.assertEqual(six.getDestination(), IPv6Address("TCP", "::1", 2))

    def test_nameResolver(self) -> None:
        self.assertTrue(verifyObject(IHostnameResolver, self.resolver))

    def test_installNameResolver(self) -> None:
        """
        Endpoints resolve with the engine's resolver, which can be replaced.
        """
        engine = FastEngine(self.reactor, self.resolver)
        other = NameResolver(hostsResolver=_FakeResolver(), dnsResolver=_FakeResolver())
        self.assertIs(engine.installNameResolver(other), self.resolver)
        self.assertIs(engine.nameResolver, other)


class _AdoptingReactor(MemoryReactorClock):
    """
    A reactor whose C{adoptStreamConnection} fails with C{code}.
    """

    def __init__(self, code: int) -> None:
        MemoryReactorClock.__init__(self)
        self.code = code

    def adoptStreamConnection(self, fileDescriptor, addressFamily, factory):
        raise OSError(self.code, os.strerror(self.code))


class TwistedEngineAdoptTests(SynchronousTestCase):
    """
    L{TwistedEngine.adopt} when Twisted cannot take the socket.
    """

    def adopt(self, code: int) -> tuple[socket.socket, list[dict]]:
        events = captureEvents(self, "tcpproxy.transport")
        engine = TwistedEngine(_AdoptingReactor(code), NameResolver(_FakeResolver(), _FakeResolver()))
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        engine.adopt(a, ("127.0.0.1", 40000), Factory())
        self.assertEqual(a.fileno(), -1)
        return a, events

    def test_outOfDescriptors(self) -> None:
        """
        Out of descriptors (adopting duplicates the socket) the client is
        closed and that is logged, as the port logs a failed accept.
        """
        _, events = self.adopt(errno.EMFILE)
        [event] = events
        self.assertEqual((event["code"], event["client"]), ("EMFILE", "127.0.0.1:40000"))
        self.assertEqual(
            formatEvent(event),
            f"[{event['connectionId']}] cannot serve client 127.0.0.1:40000: EMFILE (Too many open files); "
            "closed it",
        )
        self.assertEqual(event["log_level"].name, "warn")

    def test_clientGone(self) -> None:
        """
        A client already gone is closed without a word.
        """
        _, events = self.adopt(errno.ENOTCONN)
        self.assertEqual(events, [])


@implementer(IHalfCloseableProtocol)
class _Probe(Protocol):
    """
    Records what its transport tells it.

    @ivar made: fires on C{connectionMade}.
    @ivar readLost: fires on C{readConnectionLost}.
    @ivar writeLost: fires on C{writeConnectionLost}.
    @ivar lost: fires on C{connectionLost}; C{reason} is the reason.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.made: Deferred = Deferred()
        self.readLost: Deferred = Deferred()
        self.writeLost: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.readLost.callback(None)

    def writeConnectionLost(self) -> None:
        self.writeLost.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IPushProducer)
class _Producer:
    """
    A streaming producer that records whether it is paused.
    """

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        self.stopped = True


class _TransportTestMixin:
    """
    A protocol on a L{SocketTransport} (a socket accepted and adopted by a
    started L{FastEngine}), its peer either a Twisted protocol or a bare
    socket.
    """

    timeout = 30

    def setUp(self) -> None:
        self.engine = FastEngine(reactor, NameResolver(dnsResolver=_NoDNS(self)))
        self.engine.start()
        self.addCleanup(self.engine.stop)
        self.listener = bindTCP("127.0.0.1", 0)
        self.addCleanup(self.listener.close)

    def adopt(self, protocol: Protocol, host=None) -> SocketTransport:
        sock, address = self.listener.accept()
        sock.setblocking(False)
        self.engine.adopt(sock, address, Factory.forProtocol(lambda: protocol), host)
        self.assertIsInstance(protocol.transport, SocketTransport)

        def close() -> Deferred:
            # Whatever the test did, the transport is closed before the engine.
            if protocol.transport.connected:
                protocol.transport.abortConnection()
            return protocol.lost

        self.addCleanup(close)
        return protocol.transport

    @inlineCallbacks
    def withPeer(self, protocol: Protocol, peer: Protocol | None = None):
        """
        Connect C{peer} (a L{Collector} by default), on Twisted's own
        transport, to C{protocol} on ours; return the peer.
        """
        peer = yield connectClient(self.listener.getsockname()[1], peer or Collector())
        self.adopt(protocol)
        yield protocol.made
        self.addCleanup(lambda: peer.transport.connected and peer.transport.abortConnection())
        return peer

    def withSocketPeer(self, protocol: Protocol, host=None) -> socket.socket:
        """
        Connect a bare non-blocking socket to C{protocol} on our transport
        (told C{host} as its listener's address).
        """
        peer = socket.create_connection(self.listener.getsockname(), timeout=5)
        self.addCleanup(peer.close)
        peer.setblocking(False)
        self.adopt(protocol, host)
        return peer


class SocketTransportTests(_TransportTestMixin, TestCase):
    @inlineCallbacks
    def test_writeSendsAtOnce(self):
        """
        What the kernel takes is sent from C{write} itself: nothing is left
        waiting, and a registered producer is not paused.
        """
        probe = _Probe()
        peer = yield self.withPeer(probe)
        producer = _Producer()
        probe.transport.registerProducer(producer, True)
        probe.transport.write(b"hello")
        self.assertEqual(probe.transport.bufferedBytes, 0)
        self.assertEqual(producer.pauses, 0)
        yield eventually(lambda: bytes(peer.data) == b"hello")

    @inlineCallbacks
    def test_producerPausedWhileBytesWait(self):
        """
        A registered producer is paused exactly while written bytes wait for
        the kernel (the peer reads nothing), and resumed once they are sent;
        every byte arrives, in order.
        """
        probe = _Probe()
        peer = yield self.withPeer(probe)
        peer.transport.pauseProducing()
        producer = _Producer()
        transport = probe.transport
        transport.registerProducer(producer, True)
        chunk = os.urandom(64 * 1024)
        sent = bytearray()
        while transport.bufferedBytes == 0:
            self.assertFalse(producer.paused)
            transport.write(chunk)
            sent += chunk
            self.assertLess(len(sent), 256 * MiB, "the kernel took everything")
        self.assertTrue(producer.paused)
        self.assertEqual(producer.pauses, 1)
        # Still paused as more waits.
        transport.write(b"tail")
        sent += b"tail"
        self.assertEqual(producer.pauses, 1)
        peer.transport.resumeProducing()

        def resumed() -> bool:
            """the producer resumed"""
            return not producer.paused

        yield eventually(resumed)
        self.assertEqual(transport.bufferedBytes, 0)
        self.assertEqual(producer.resumes, 1)
        yield eventually(lambda: len(peer.data) == len(sent))
        self.assertTrue(bytes(peer.data) == bytes(sent), "bytes differ from those written")

    @inlineCallbacks
    def test_registeredWhileBytesWait(self):
        """
        A producer registered while bytes wait is paused at once; an
        unregistered one is no longer resumed.
        """
        probe = _Probe()
        peer = yield self.withPeer(probe)
        peer.transport.pauseProducing()
        transport = probe.transport
        while transport.bufferedBytes == 0:
            transport.write(b"x" * 65536)
        producer = _Producer()
        transport.registerProducer(producer, True)
        self.assertTrue(producer.paused)
        self.assertRaises(RuntimeError, transport.registerProducer, _Producer(), True)
        transport.unregisterProducer()
        peer.transport.resumeProducing()
        yield eventually(lambda: transport.bufferedBytes == 0)
        self.assertEqual(producer.resumes, 0)

    @inlineCallbacks
    def test_peerHalfCloses(self):
        """
        The peer's EOF is C{readConnectionLost}; the protocol still writes,
        and its own C{loseWriteConnection} gives the peer EOF and the
        protocol C{writeConnectionLost}, not C{connectionLost}.
        """
        probe = _Probe()
        peer = yield self.withPeer(probe)
        peer.transport.write(b"question")
        peer.transport.loseWriteConnection()
        yield probe.readLost
        self.assertEqual(bytes(probe.data), b"question")
        self.assertFalse(probe.lost.called)
        probe.transport.write(b"answer after EOF")
        probe.transport.loseWriteConnection()
        self.assertFalse(probe.writeLost.called, "writeConnectionLost from inside loseWriteConnection")
        yield probe.writeLost
        self.assertEqual((yield peer.readDone), b"answer after EOF")
        self.assertFalse(probe.lost.called)
        probe.transport.loseConnection()
        yield probe.lost
        reason = probe.reason
        self.assertTrue(reason.check(ConnectionDone))
        yield peer.lost

    @inlineCallbacks
    def test_loseWriteConnectionFlushesFirst(self):
        """
        EOF is sent once what was written has been sent, not before; the
        peer may go on sending meanwhile.
        """
        probe = _Probe()
        peer = yield self.withPeer(probe)
        peer.transport.pauseProducing()
        sent = os.urandom(8 * MiB)
        probe.transport.write(sent)
        self.assertGreater(probe.transport.bufferedBytes, 0)
        probe.transport.loseWriteConnection()
        probe.transport.write(b"ignored: written after loseWriteConnection")
        peer.transport.write(b"still talking")
        yield eventually(lambda: bytes(probe.data) == b"still talking")
        self.assertFalse(probe.writeLost.called)
        peer.transport.resumeProducing()
        received = yield peer.readDone
        self.assertEqual(len(received), len(sent))
        self.assertTrue(received == sent, "bytes differ from those written")
        yield probe.writeLost

    @inlineCallbacks
    def test_loseConnectionFlushesThenCloses(self):
        """
        C{loseConnection} sends what was written, then closes:
        C{connectionLost} with L{ConnectionDone}, never from inside the call.
        """
        probe = _Probe()
        peer = yield self.withPeer(probe)
        peer.transport.pauseProducing()
        sent = os.urandom(8 * MiB)
        probe.transport.write(sent)
        probe.transport.loseConnection()
        self.assertFalse(probe.lost.called)
        self.assertTrue(probe.transport.connected)
        peer.transport.resumeProducing()
        received = yield peer.readDone
        self.assertTrue(received == sent, "bytes differ from those written")
        yield probe.lost
        reason = probe.reason
        self.assertTrue(reason.check(ConnectionDone))
        self.assertFalse(probe.transport.connected)

    @inlineCallbacks
    def test_loseConnectionWithNothingWaiting(self):
        """
        With nothing to send, the close still comes from the loop, not from
        inside C{loseConnection}; a second call changes nothing.
        """
        probe = _Probe()
        peer = yield self.withPeer(probe)
        probe.transport.loseConnection()
        probe.transport.loseConnection()
        self.assertFalse(probe.lost.called)
        yield probe.lost
        reason = probe.reason
        self.assertTrue(reason.check(ConnectionDone))
        self.assertEqual((yield peer.readDone), b"")

    @inlineCallbacks
    def test_loseConnectionWithUnreadBytes(self):
        """
        A close with bytes from the peer still unread (a client the proxy
        closes before reading what it sent) is an orderly end for the peer:
        EOF, not a reset, as with Twisted's own transport.
        """
        probe = _Probe()
        peer = self.withSocketPeer(probe)
        yield probe.made
        probe.transport.pauseProducing()
        peer.send(b"never read")
        handle = probe.transport.getHandle()

        def arrived() -> bool:
            """the peer's bytes wait in the transport's socket"""
            try:
                return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                return False

        yield eventually(arrived)
        probe.transport.loseConnection()
        yield probe.lost
        self.assertTrue(probe.reason.check(ConnectionDone))
        self.assertEqual(bytes(probe.data), b"")
        outcome: list[object] = []

        def ended() -> bool:
            """the peer read an end of the connection"""
            try:
                outcome.append(peer.recv(1))
            except BlockingIOError:
                return False
            except ConnectionResetError:
                outcome.append("reset")
            return True

        yield eventually(ended)
        self.assertEqual(outcome, [b""])

    @inlineCallbacks
    def test_abortConnectionResets(self):
        """
        C{abortConnection} drops what waits and sends a reset: the peer
        sees C{ECONNRESET}, not EOF; the protocol gets L{ConnectionAborted},
        never from inside the call.
        """
        probe = _Probe()
        peer = self.withSocketPeer(probe)
        yield probe.made
        producer = _Producer()
        probe.transport.registerProducer(producer, True)
        while probe.transport.bufferedBytes == 0:
            probe.transport.write(b"x" * 65536)
        probe.transport.abortConnection()
        self.assertFalse(probe.lost.called)
        probe.transport.loseWriteConnection()
        probe.transport.loseConnection()
        yield probe.lost
        reason = probe.reason
        self.assertTrue(reason.check(ConnectionAborted))
        self.assertTrue(producer.stopped)
        outcome: list[str] = []

        def ended() -> bool:
            """the peer read an end of the connection"""
            try:
                while True:
                    data = peer.recv(MiB)
                    if not data:
                        outcome.append("EOF")
                        return True
            except BlockingIOError:
                return False
            except ConnectionResetError:
                outcome.append("reset")
                return True

        yield eventually(ended)
        self.assertEqual(outcome, ["reset"])

    @inlineCallbacks
    def test_nothingSentAfterAbort(self):
        """
        Once aborted, a transport sends nothing more before its reset: no
        EOF from C{loseWriteConnection} (the relay closing the other side
        asks for one), which the peer would take for an orderly end.
        """
        probe = _Probe()
        peer = self.withSocketPeer(probe)
        yield probe.made
        probe.transport.abortConnection()
        probe.transport.loseWriteConnection()
        probe.transport.write(b"late")
        self.assertRaises(BlockingIOError, peer.recv, 1)
        yield probe.lost
        self.assertTrue(probe.reason.check(ConnectionAborted))

        def reset() -> bool:
            """the peer saw the reset"""
            try:
                peer.recv(1)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            self.fail("the peer read something other than a reset")

        yield eventually(reset)

    @inlineCallbacks
    def test_abortedThenEngineStopped(self):
        """
        A connection aborted just before the engine stops (a TLS client
        whose handshake failed, as the service stops) is still closed: its
        protocol is told and its peer reset, as Twisted's reactor does for
        its own transports.
        """
        probe = _Probe()
        peer = self.withSocketPeer(probe)
        yield probe.made
        probe.transport.abortConnection()
        self.engine.stop()
        self.assertTrue(probe.lost.called)
        self.assertTrue(probe.reason.check(ConnectionAborted))
        self.assertRaises(ConnectionResetError, peer.recv, 1)

    @inlineCallbacks
    def test_peerResetIsConnectionLost(self):
        """
        A peer that resets ends the connection with an error, not with
        L{ConnectionDone}.
        """
        probe = _Probe()
        peer = self.withSocketPeer(probe)
        yield probe.made
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, tcp._RESET)
        peer.close()
        yield probe.lost
        reason = probe.reason
        self.assertFalse(reason.check(ConnectionDone))

    @inlineCallbacks
    def test_pauseStopsReading(self):
        """
        A paused transport reads nothing until resumed.
        """
        probe = _Probe()
        peer = self.withSocketPeer(probe)
        yield probe.made
        probe.transport.pauseProducing()
        peer.send(b"held")
        # The loop turns (the probe is not read) until the transport is resumed.
        turns = [0]

        def turned() -> bool:
            """a few turns of the loop"""
            turns[0] += 1
            return turns[0] > 20

        yield eventually(turned)
        self.assertEqual(bytes(probe.data), b"")
        probe.transport.resumeProducing()
        yield eventually(lambda: bytes(probe.data) == b"held")

    @inlineCallbacks
    def test_addresses(self):
        """
        C{getPeer} and C{getHost} give the two ends, as Twisted writes them;
        C{getHandle} the socket; C{TCP_NODELAY} is on (inherited from the
        listening socket) and can be turned off.
        """
        probe = _Probe()
        peer = self.withSocketPeer(probe)
        yield probe.made
        transport = probe.transport
        self.assertEqual(transport.getPeer(), IPv4Address("TCP", *peer.getsockname()))
        self.assertEqual(transport.getHost(), IPv4Address("TCP", *peer.getpeername()))
        self.assertIsInstance(transport.getHandle(), socket.socket)
        self.assertTrue(transport.getTcpNoDelay())
        transport.setTcpNoDelay(False)
        self.assertFalse(transport.getTcpNoDelay())
        transport.setTcpKeepAlive(True)
        self.assertTrue(transport.getTcpKeepAlive())

    @inlineCallbacks
    def test_hostOfItsListener(self):
        """
        C{getHost} is the listener's address, given by whoever accepted the
        socket (one object for all its connections); for a listener on
        every address (C{0.0.0.0}), it is the address the client dialled,
        with the listener's port (the same int object: a relay keeps it).
        """
        listening = self.listener.getsockname()
        specific = IPv4Address("TCP", *listening)
        probe = _Probe()
        self.withSocketPeer(probe, specific)
        yield probe.made
        self.assertIs(probe.transport.getHost(), specific)
        wildcard = IPv4Address("TCP", "0.0.0.0", int(str(listening[1])))
        probe = _Probe()
        peer = self.withSocketPeer(probe, wildcard)
        yield probe.made
        host = probe.transport.getHost()
        self.assertEqual(host, IPv4Address("TCP", *peer.getpeername()))
        self.assertIs(host.port, wildcard.port)


@implementer(IHalfCloseableProtocol)
class _Forward(_Probe):
    """
    Copies what it reads to C{other}'s transport, and passes EOF on.
    """

    other: _Forward

    def dataReceived(self, data: bytes) -> None:
        _Probe.dataReceived(self, data)
        self.other.transport.write(data)

    def readConnectionLost(self) -> None:
        _Probe.readConnectionLost(self)
        self.other.transport.loseWriteConnection()


class _Sender(Protocol):
    """
    Sends C{payload} at once, then EOF.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()


@implementer(ISpliceCounter)
class _SpliceCounter:
    """
    Records the sizes a spliced direction reports.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def spliced(self, size: int) -> None:
        self.sizes.append(size)


class SpliceTests(_TransportTestMixin, TestCase):
    @inlineCallbacks
    def test_bulkIsSplicedByteExact(self):
        """
        Between two of our transports, a multi-MiB stream arrives
        byte-exact; what went through splice is reported to the counter, and
        with what the protocol read, sums to the bytes sent; EOF passes.
        """
        if not tcp.SPLICE:
            raise self.skipTest("no splice(2) here")
        payload = os.urandom(16 * MiB)
        inbound, outbound = _Forward(), _Forward()
        inbound.other, outbound.other = outbound, inbound
        yield self.withPeer(inbound, _Sender(payload))
        # Nothing is read before there is somewhere to copy it to.
        inbound.transport.pauseProducing()
        receiver = yield self.withPeer(outbound)
        counter = _SpliceCounter()
        verifyObject(ISpliceCounter, counter)
        counted = counter.sizes
        self.assertTrue(inbound.transport.spliceTo(outbound.transport, counter))
        inbound.transport.resumeProducing()
        received = yield receiver.readDone
        self.assertEqual(len(received), len(payload))
        self.assertTrue(received == payload, "spliced bytes differ from those sent")
        self.assertGreater(sum(counted), 0, "nothing was spliced")
        self.assertEqual(sum(counted) + len(inbound.data), len(payload))
        yield inbound.readLost

    def test_onlyBetweenOurTransports(self) -> None:
        """
        A transport splices only to another of its kind.
        """
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        transport = SocketTransport(self.engine.poller, a, Protocol(), ("127.0.0.1", 1))
        self.assertFalse(transport.spliceTo(object(), _SpliceCounter()))


class _Recorder(ClientFactory):
    """
    A client factory that records how its connector reports.
    """

    noisy = False
    protocol = _Probe

    def __init__(self) -> None:
        self.failed: list[Failure] = []
        self.lostReasons: list[Failure] = []

    def clientConnectionFailed(self, connector, reason) -> None:
        self.failed.append(reason)

    def clientConnectionLost(self, connector, reason) -> None:
        self.lostReasons.append(reason)


class ConnectorTests(_TransportTestMixin, TestCase):
    """
    Dialling through the fast engine's L{IReactorTCP}, as endpoints do.
    """

    @inlineCallbacks
    def test_connects(self):
        """
        A dial gets a protocol on our transport, whose peer is the address
        dialled; its factory hears of the end.
        """
        port = listen(self, echoFactory())
        factory = _Recorder()
        connector = self.engine.connectTCP("127.0.0.1", port, factory)
        self.assertEqual(connector.state, "connecting")
        yield eventually(lambda: connector.state == "connected")
        protocol = connector.transport.protocol
        yield protocol.made
        self.assertIsInstance(protocol.transport, SocketTransport)
        self.assertEqual(protocol.transport.getPeer(), IPv4Address("TCP", "127.0.0.1", port))
        protocol.transport.write(b"echo")
        yield eventually(lambda: bytes(protocol.data) == b"echo")
        self.assertEqual(len(self.engine.deadlines), 0)
        connector.disconnect()
        yield protocol.lost
        # The factory is told after the protocol, as Twisted's connectors do.
        yield eventually(lambda: connector.state == "disconnected")
        self.assertEqual(len(factory.lostReasons), 1)
        self.assertTrue(factory.lostReasons[0].check(ConnectionDone))

    @inlineCallbacks
    def test_refused(self):
        endpoint = TCP4ClientEndpoint(self.engine, "127.0.0.1", deadPort())
        failure = yield self.assertFailure(connectProtocol(endpoint, _Probe()), ConnectionRefusedError)
        self.assertIsInstance(failure, ConnectionRefusedError)
        self.assertEqual(len(self.engine.poller), 0)
        self.assertEqual(len(self.engine.deadlines), 0)

    def test_timeout(self):
        """
        A target that never answers fails with L{TimeoutError} once the
        connect timeout has passed on the engine's L{Deadlines}, and its
        socket is closed.
        """
        clock = Clock()
        self.engine.deadlines = Deadlines(clock)
        port = unansweredPort(self)
        before = openSockets()
        endpoint = TCP4ClientEndpoint(self.engine, "127.0.0.1", port, timeout=3)
        d = connectProtocol(endpoint, _Probe())
        self.assertEqual(openSockets(), before + 1)
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(openSockets(), before)
        self.assertEqual(len(self.engine.poller), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self):
        """
        Cancelling an endpoint's connect fails it with
        L{ConnectingCancelledError} and closes the socket, leaving no
        deadline.
        """
        port = unansweredPort(self)
        before = openSockets()
        d = connectProtocol(TCP4ClientEndpoint(self.engine, "127.0.0.1", port), _Probe())
        self.assertEqual(openSockets(), before + 1)
        self.assertEqual(len(self.engine.deadlines), 1)
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertEqual(openSockets(), before)
        self.assertEqual(len(self.engine.poller), 0)
        self.assertEqual(len(self.engine.deadlines), 0)

    def test_noSocket(self):
        """
        When no socket can be made (out of descriptors), the connect fails
        with L{ConnectBindError}, which the dialer describes as the proxy's
        own trouble.
        """

        def exhausted(*args, **kwargs):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        endpoint = TCP4ClientEndpoint(self.engine, "127.0.0.1", 1)
        original = engineModule.socket.socket
        engineModule.socket.socket = exhausted
        try:
            d = connectProtocol(endpoint, _Probe())
        finally:
            engineModule.socket.socket = original
        failure = self.failureResultOf(d, ConnectBindError)
        self.assertEqual(failure.value.osError, errno.EMFILE)
        self.assertEqual(describeFailure(failure, 5), "the proxy is out of file descriptors")

    def test_hostnameNotAddress(self):
        """
        The connector is given addresses (endpoints resolve first): a name
        fails as a lookup error, without a socket.
        """
        factory = _Recorder()
        self.engine.connectTCP("localhost", 1, factory)
        [reason] = factory.failed
        self.assertEqual(reason.type.__name__, "DNSLookupError")

    @inlineCallbacks
    def test_hostnameEndpoint(self):
        """
        A L{HostnameEndpoint} on the fast engine resolves C{localhost} from
        C{/etc/hosts} (the name servers are never asked) and connects on our
        transport.
        """
        port = listen(self, echoFactory())
        endpoint = HostnameEndpoint(self.engine, b"localhost", port)
        protocol = yield connectProtocol(endpoint, _Probe())
        self.assertIsInstance(protocol.transport, SocketTransport)
        protocol.transport.write(b"by name")
        yield eventually(lambda: bytes(protocol.data) == b"by name")
        protocol.transport.loseConnection()
        yield protocol.lost


def _record(name: str, kind: int, payload) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), kind, payload=payload)


class _FakeResolver:
    """
    Answers address lookups from a table of C{(name, kind) -> records}, or
    fails them; records the questions.
    """

    def __init__(self, answers: dict | None = None, failing: bool = False) -> None:
        self.answers = answers or {}
        self.failing = failing
        self.asked: list[tuple[str, int]] = []

    def _lookup(self, name: str, kind: int):
        self.asked.append((name, kind))
        if self.failing:
            return fail(DNSServerError(name))
        records = self.answers.get((name, kind))
        if records is None:
            return fail(dns.DomainError(name))
        return succeed((records, [], []))

    def lookupAddress(self, name, timeout=None):
        return self._lookup(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._lookup(name, dns.AAAA)


@implementer(IResolutionReceiver)
class _Receiver:
    def __init__(self) -> None:
        self.began = None
        self.addresses: list = []
        self.completed = 0

    def resolutionBegan(self, resolution) -> None:
        self.began = resolution

    def addressResolved(self, address) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.completed += 1


class NameResolverTests(SynchronousTestCase):
    """
    L{NameResolver}: the hosts file first, the name servers only for what
    it does not know.
    """

    def resolve(self, hostsResolver, dnsResolver, name="backend.test", types=None) -> _Receiver:
        receiver = _Receiver()
        resolver = NameResolver(hostsResolver=hostsResolver, dnsResolver=dnsResolver)
        resolution = resolver.resolveHostName(receiver, name, 443, types)
        self.assertIs(receiver.began, resolution)
        self.assertEqual(resolution.name, name)
        return receiver

    def test_hostsAlone(self):
        """
        A name the hosts file knows is answered from it alone (in the
        families it has), and DNS is not asked.
        """
        hosts = _FakeResolver(
            {("backend.test", dns.A): [_record("backend.test", dns.A, dns.Record_A("10.0.0.1"))]}
        )
        names = _FakeResolver()
        receiver = self.resolve(hosts, names)
        self.assertEqual(receiver.addresses, [IPv4Address("TCP", "10.0.0.1", 443)])
        self.assertEqual(receiver.completed, 1)
        self.assertEqual(names.asked, [])

    def test_dnsOtherwise(self):
        """
        A name the hosts file does not know is asked of the name servers,
        A and AAAA; CNAME records on the way are skipped.
        """
        names = _FakeResolver(
            {
                ("backend.test", dns.A): [
                    _record("backend.test", dns.CNAME, dns.Record_CNAME(b"real.test")),
                    _record("real.test", dns.A, dns.Record_A("10.0.0.2")),
                ],
                ("backend.test", dns.AAAA): [_record("real.test", dns.AAAA, dns.Record_AAAA("2001:db8::2"))],
            }
        )
        receiver = self.resolve(_FakeResolver(), names)
        self.assertEqual(
            receiver.addresses,
            [IPv4Address("TCP", "10.0.0.2", 443), IPv6Address("TCP", "2001:db8::2", 443)],
        )
        self.assertEqual(sorted(kind for _, kind in names.asked), sorted([dns.A, dns.AAAA]))
        self.assertEqual(receiver.completed, 1)

    def test_onlyTheFamiliesAsked(self):
        """
        With address types given, only those records are looked up.
        """
        names = _FakeResolver(
            {("backend.test", dns.A): [_record("backend.test", dns.A, dns.Record_A("10.0.0.3"))]}
        )
        receiver = self.resolve(_FakeResolver(), names, types=[IPv4Address])
        self.assertEqual(receiver.addresses, [IPv4Address("TCP", "10.0.0.3", 443)])
        self.assertEqual(names.asked, [("backend.test", dns.A)])

    def test_failures(self):
        """
        Failed lookups give no address, and the resolution still completes
        (the endpoint then fails its connect).
        """
        receiver = self.resolve(_FakeResolver(failing=True), _FakeResolver(failing=True))
        self.assertEqual(receiver.addresses, [])
        self.assertEqual(receiver.completed, 1)
        receiver = self.resolve(_FakeResolver(), _FakeResolver())
        self.assertEqual(receiver.addresses, [])
        self.assertEqual(receiver.completed, 1)
