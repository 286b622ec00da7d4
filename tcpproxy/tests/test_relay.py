"""
The connection lifecycle, unit-tested once, in memory: the relay's dial and
pairing logic with a fake dialer, L{StringTransport}s and a L{Clock}
(dial-then-pair, EOF while dialling, the client leaving while dialling, no
target, idle close, abort), and the whole of it with the real dialer on
client endpoints whose connections L{iosim} completes.  Backpressure and
half-close on real sockets, on both engines, are in
L{tcpproxy.tests.test_relay_loopback}.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import Clock, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides, implementer, providedBy

from tcpproxy.access import END_ABORTED, END_CLIENT_LEFT, END_CLIENT_LOST, END_DONE, END_IDLE, END_NO_TARGET
from tcpproxy.app import ProxyServerFactory
from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, parseTarget
from tcpproxy.dialer import Dialled, FailoverDialer, IDialer, NoTargetAvailable
from tcpproxy.limits import MIN_READ
from tcpproxy.relay import BULK_READ, LINGER, PREDIAL_BUFFER, RESET_POLL, ProxyClientProtocol
from tcpproxy.tests.loopback import Collector, captureEvents
from tcpproxy.transport.tcp import CHUNK, ISplicing

A, B = parseTarget("127.0.0.1:7001"), parseTarget("127.0.0.1:7002")


class _HalfCloseableTransport(StringTransport):
    """
    A L{StringTransport} that can be shut for writing, as a TCP one can.
    """

    writeShut = False

    def loseWriteConnection(self) -> None:
        self.writeShut = True

    def resumeProducing(self) -> None:
        # Twisted's TCP transports (and ours) ignore this once closing; a
        # StringTransport raises.
        if not self.disconnecting:
            StringTransport.resumeProducing(self)


@implementer(ISplicing)
class _SplicingTransport(_HalfCloseableTransport):
    """
    A transport that can splice: it records to what.
    """

    def __init__(self, *args, **kwargs) -> None:
        _HalfCloseableTransport.__init__(self, *args, **kwargs)
        self.splicedTo: list = []
        self.bufferSize = CHUNK

    def spliceTo(self, consumer, counter) -> bool:
        if not isinstance(consumer, _SplicingTransport):
            return False
        self.splicedTo.append(consumer)
        return True


class _WrappingTransport(_HalfCloseableTransport):
    """
    A transport over a L{_SplicingTransport} that, as Twisted's protocol
    wrappers (TLS) do, provides every interface of the one under it.
    """

    def __init__(self, *args, **kwargs) -> None:
        _HalfCloseableTransport.__init__(self, *args, **kwargs)
        self.under = _SplicingTransport()
        directlyProvides(self, providedBy(self.under))

    def spliceTo(self, consumer, counter) -> bool:
        return self.under.spliceTo(consumer, counter)


@implementer(ISSLTransport)
class _TLSTransport(_WrappingTransport):
    """
    A TLS transport over a L{_SplicingTransport} (its C{transport}).
    """

    def __init__(self, *args, **kwargs) -> None:
        _WrappingTransport.__init__(self, *args, **kwargs)
        self.transport = self.under
        directlyProvides(self, providedBy(self.under), ISSLTransport)


class _MemoryBackend(Factory):
    """
    A backend of L{Collector}s, for connections made by L{iosim}.
    """

    noisy = False

    def __init__(self) -> None:
        self.protocols: list[Collector] = []

    def buildProtocol(self, addr) -> Protocol:
        protocol = Collector()
        self.protocols.append(protocol)
        return protocol


@implementer(IDialer)
class FakeDialer:
    """
    Records each dial; the test fires the Deferreds.
    """

    def __init__(self):
        self.calls = []

    def dial(self, protocolFactory, targets):
        d = Deferred(lambda d: self.cancelled.append(d))
        self.calls.append((list(targets), d))
        return d

    cancelled: list


class _ClientMixin:
    """
    A client of C{self.factory}'s app, on a L{StringTransport} of C{kind}.
    """

    def connectClient(self, kind=_HalfCloseableTransport):
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = kind(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5001),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        server.makeConnection(transport)
        return server, transport


class RelayTests(_ClientMixin, SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(100)
        self.dialer = FakeDialer()
        self.dialer.cancelled = []
        app = AppConfig("web", (5001,), (A, B))
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)
        self.events = captureEvents(self)

    def targetAnswers(self, index=0, target=A, failures=(), transport=_HalfCloseableTransport):
        client = ProxyClientProtocol()
        transport = transport()
        client.makeConnection(transport)
        self.dialer.calls[index][1].callback(Dialled(target, client, list(failures)))
        return client, transport

    def test_dialsInBalancerOrder(self):
        """
        Each client dials the app's targets in the balancer's order.
        """
        self.connectClient()
        self.connectClient()
        self.assertEqual([targets for targets, _ in self.dialer.calls], [[A, B], [B, A]])

    def test_clientHeldUntilTargetConnected(self):
        """
        What a client sends before its target answers is kept (and the
        client paused once it reaches the pre-dial buffer), then written to
        the target first, in order; the client is then resumed.
        """
        server, clientTransport = self.connectClient()
        server.dataReceived(b"a" * (PREDIAL_BUFFER // 2))
        self.assertEqual(clientTransport.producerState, "producing")
        server.dataReceived(b"b" * (PREDIAL_BUFFER // 2))
        self.assertEqual(clientTransport.producerState, "paused")
        target, targetTransport = self.targetAnswers()
        self.assertEqual(targetTransport.value(), b"a" * (PREDIAL_BUFFER // 2) + b"b" * (PREDIAL_BUFFER // 2))
        self.assertEqual(clientTransport.producerState, "producing")
        server.dataReceived(b"after")
        self.assertTrue(targetTransport.value().endswith(b"after"))
        target.dataReceived(b"reply")
        self.assertEqual(clientTransport.value(), b"reply")

    def test_transportsAreEachOthersProducers(self):
        """
        Each transport is the other's streaming producer (pausing one pauses
        the other), but its loss does not stop the other: the relay closes
        that itself.
        """
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers()
        self.assertTrue(targetTransport.streaming and clientTransport.streaming)
        targetTransport.producer.pauseProducing()
        self.assertEqual(clientTransport.producerState, "paused")
        targetTransport.producer.resumeProducing()
        self.assertEqual(clientTransport.producerState, "producing")
        clientTransport.producer.pauseProducing()
        self.assertEqual(targetTransport.producerState, "paused")
        clientTransport.producer.stopProducing()
        self.assertEqual(targetTransport.producerState, "paused")
        self.assertFalse(targetTransport.disconnecting)

    def test_clientLeavesWhileDialling(self):
        """
        A client that disconnects while its target is dialled cancels the
        dial, and the connection is logged as such.
        """
        server, clientTransport = self.connectClient()
        self.clock.advance(2)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.dialer.cancelled), 1)
        self.assertEqual(self.factory.relays, set())
        [event] = self.events
        self.assertEqual((event["end"], event["target"], event["duration"]), (END_CLIENT_LEFT, None, 2))
        self.assertEqual(event["client"], "127.0.0.1:40000")

    def test_noTarget(self):
        """
        When no target answers, the client is closed, and the access log
        warns with every target's reason.
        """
        server, clientTransport = self.connectClient()
        failures = [(A, "connection refused"), (B, "no answer within 5s")]
        self.dialer.calls[0][1].errback(NoTargetAvailable(failures))
        self.assertTrue(clientTransport.disconnecting)
        server.connectionLost(Failure(ConnectionDone()))
        [event] = self.events
        self.assertEqual(event["end"], END_NO_TARGET)
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(
            event["failures"], ["127.0.0.1:7001: connection refused", "127.0.0.1:7002: no answer within 5s"]
        )

    def test_clientResetResetsTarget(self):
        """
        A client that resets makes the proxy reset the target side too, so
        that the target cannot take a cut-off stream for a complete one: no
        EOF is sent, nothing more is read from the target, producers are
        unregistered first (so nothing hangs on a paused producer), and the
        target is aborted once what it was sent has been taken.
        """
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers(failures=[(B, "connection refused")])
        server.dataReceived(b"12345")
        target.dataReceived(b"abc")
        server.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(targetTransport.writeShut)
        self.assertFalse(targetTransport.disconnecting)
        self.assertIsNone(targetTransport.producer)
        self.assertEqual(targetTransport.producerState, "paused")
        self.assertEqual(targetTransport.value(), b"12345")
        # Nothing is left unsent on a StringTransport: the reset follows at
        # the second look.
        self.clock.advance(0)
        self.assertFalse(targetTransport.disconnecting)
        self.clock.advance(RESET_POLL)
        self.assertTrue(targetTransport.disconnected)  # what StringTransport.abortConnection sets
        target.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [event] = self.events
        self.assertEqual(
            {k: event[k] for k in ("end", "target", "bytesIn", "bytesOut", "port", "app", "failures")},
            {
                "end": END_CLIENT_LOST,
                "target": "127.0.0.1:7001",
                "bytesIn": 5,
                "bytesOut": 3,
                "port": 5001,
                "app": "web",
                "failures": ["127.0.0.1:7002: connection refused"],
            },
        )
        self.assertEqual(self.factory.relays, set())

    def test_cleanCloseLingers(self):
        """
        A client that closes cleanly without a half-close (as a TLS client's
        C{close_notify} arrives) makes the proxy close the target side with
        EOF first (after what was already sent to it is flushed), then drop
        what the target still sends until its own EOF (a lingering close, so
        that closing with unread bytes does not reset what the target was
        sent).
        """
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers()
        server.dataReceived(b"12345")
        server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(targetTransport.writeShut)
        self.assertFalse(targetTransport.disconnecting)
        self.assertIsNone(targetTransport.producer)
        target.dataReceived(b"dropped")
        target.readConnectionLost()
        self.assertTrue(targetTransport.disconnecting)
        target.connectionLost(Failure(ConnectionDone()))
        [event] = self.events
        self.assertEqual((event["end"], event["bytesIn"], event["bytesOut"]), (END_DONE, 5, 0))
        self.assertEqual(self.factory.relays, set())

    def test_lastEOFCloses(self):
        """
        Once one direction is done (the client's EOF passed on, the target's
        write side shut), the target's EOF closes the client after what it
        was sent, rather than shutting the client's write side first and
        closing it next: the client sees the same end (the reply, then EOF),
        one system call sooner.
        """
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers()
        server.dataReceived(b"request")
        server.readConnectionLost()
        self.assertTrue(targetTransport.writeShut)
        self.assertFalse(targetTransport.disconnecting)
        target.writeConnectionLost()
        target.dataReceived(b"reply")
        target.readConnectionLost()
        self.assertEqual(clientTransport.value(), b"reply")
        self.assertFalse(clientTransport.writeShut)
        self.assertTrue(clientTransport.disconnecting)
        self.assertTrue(targetTransport.disconnecting)
        server.connectionLost(Failure(ConnectionDone()))
        target.connectionLost(Failure(ConnectionDone()))
        [event] = self.events
        self.assertEqual((event["end"], event["bytesIn"], event["bytesOut"]), (END_DONE, 7, 5))
        self.assertEqual(self.factory.relays, set())

    def test_lingerBounded(self):
        """
        A target that never sends its EOF after the client left is reset
        once the lingering close has lasted LINGER seconds.
        """
        server, _ = self.connectClient()
        target, targetTransport = self.targetAnswers()
        server.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(LINGER - 1)
        self.assertFalse(targetTransport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(targetTransport.disconnected)
        target.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.relays, set())

    def test_accessLogOff(self):
        """
        With C{AccessLog} off an app logs no line per connection, but still
        warns of a client no target could serve.
        """
        app = AppConfig("quiet", (5001,), (A, B), accessLog=False)
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)
        server, _ = self.connectClient()
        self.targetAnswers()
        server.connectionLost(Failure(ConnectionLost()))
        server.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.events, [])
        self.assertEqual(self.factory.relays, set())
        server, _ = self.connectClient()
        self.dialer.calls[1][1].errback(NoTargetAvailable([(A, "connection refused")]))
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([e["end"] for e in self.events], [END_NO_TARGET])

    def test_whenIdle(self):
        """
        L{ProxyServerFactory.whenIdle} fires once the last relay has ended.
        """
        self.successResultOf(self.factory.whenIdle())
        server, _ = self.connectClient()
        idle = self.factory.whenIdle()
        self.assertNoResult(idle)
        server.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(idle)

    def test_abortAll(self):
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers()
        self.factory.abortAll()
        self.assertTrue(clientTransport.disconnecting)
        self.assertTrue(targetTransport.disconnecting)

    def test_eofWhileDialling(self):
        """
        A client that sends bytes and EOF while its target is dialled: once
        the target answers, it gets the bytes then EOF; the client is not
        resumed (it has nothing more to send) and the target's reply still
        reaches it.
        """
        server, clientTransport = self.connectClient()
        server.dataReceived(b"request")
        server.readConnectionLost()
        self.assertFalse(self.dialer.cancelled)
        target, targetTransport = self.targetAnswers()
        self.assertEqual(targetTransport.value(), b"request")
        self.assertTrue(targetTransport.writeShut)
        self.assertIsNone(targetTransport.producer)
        target.dataReceived(b"reply")
        self.assertEqual(clientTransport.value(), b"reply")
        self.assertFalse(clientTransport.disconnecting)

    def test_abortWhileDialling(self):
        """
        Aborting (the drain period is over) a client whose target is still
        dialled cancels the dial and drops the client; the access log says
        aborted.
        """
        server, clientTransport = self.connectClient()
        self.factory.abortAll()
        self.assertEqual(len(self.dialer.cancelled), 1)
        self.assertTrue(clientTransport.disconnected)
        server.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.factory.relays, set())
        [event] = self.events
        self.assertEqual((event["end"], event["target"]), (END_ABORTED, None))

    def passTime(self, seconds: float) -> None:
        """
        Let C{seconds} pass as the real clock would, a quarter second at a
        time (L{Clock.advance} runs a timer set from a timer only once).
        """
        for _ in range(round(seconds * 4)):
            self.clock.advance(0.25)

    def test_idleClose(self):
        """
        A pair with no byte either way for IdleTimeout is closed (both
        sides, producers first unregistered) within a quarter period more;
        traffic keeps it open; the log says idle.
        """
        app = AppConfig("web", (5001,), (A, B), idleTimeout=8.0)
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers()
        for _ in range(4):
            self.passTime(6)
            server.dataReceived(b"ping")
        self.assertFalse(clientTransport.disconnecting or targetTransport.disconnecting)
        self.passTime(8)
        self.assertFalse(clientTransport.disconnecting)
        self.passTime(2)
        self.assertTrue(clientTransport.disconnecting and targetTransport.disconnecting)
        self.assertIsNone(clientTransport.producer)
        self.assertIsNone(targetTransport.producer)
        server.connectionLost(Failure(ConnectionDone()))
        target.connectionLost(Failure(ConnectionDone()))
        [event] = self.events
        self.assertEqual((event["end"], event["bytesIn"]), (END_IDLE, 16))
        self.assertEqual(self.factory.relays, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleUnableToFlushIsAborted(self):
        """
        A pair still open one idle period after it was closed for idleness
        (it cannot flush) is aborted.
        """
        app = AppConfig("web", (5001,), (A, B), idleTimeout=4.0)
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers()
        self.passTime(4)
        self.assertTrue(clientTransport.disconnecting)
        self.assertFalse(clientTransport.disconnected)
        self.passTime(3.75)
        self.assertFalse(clientTransport.disconnected)
        self.passTime(0.25)
        self.assertTrue(clientTransport.disconnected and targetTransport.disconnected)

    def test_noSpliceThroughAWrapper(self):
        """
        Two transports that can splice (L{ISplicing}) are offered to splice
        to each other; one that only claims it because it wraps one (a TLS
        transport: Twisted's wrappers provide their transport's interfaces)
        is not, or its raw bytes would pass the TLS layer.
        """
        server, clientTransport = self.connectClient(_SplicingTransport)
        target, targetTransport = self.targetAnswers(transport=_SplicingTransport)
        self.assertEqual(clientTransport.splicedTo, [targetTransport])
        self.assertEqual(targetTransport.splicedTo, [clientTransport])
        server, wrapper = self.connectClient(_WrappingTransport)
        target, targetTransport = self.targetAnswers(index=1, transport=_SplicingTransport)
        self.assertTrue(ISplicing.providedBy(wrapper))
        self.assertEqual(wrapper.under.splicedTo, [])
        self.assertEqual(targetTransport.splicedTo, [])

    def test_readInBulkWhenNotSplicing(self):
        """
        The TCP transports of a pair that cannot splice (TLS on a side) read
        up to L{BULK_READ} bytes at once (their C{bufferSize}, the TCP one
        under the TLS one); those of a pair that splices keep their size,
        whose full reads start splicing.  Those of a throttled pair read
        about their bucket's size, the TCP one under a TLS one too: a 64
        KiB read is a burst of over three seconds at 20 kB/s.
        """
        server, clientTransport = self.connectClient(_SplicingTransport)
        target, targetTransport = self.targetAnswers(transport=_SplicingTransport)
        self.assertEqual([t.bufferSize for t in (clientTransport, targetTransport)], [CHUNK, CHUNK])
        server, tls = self.connectClient(_TLSTransport)
        target, targetTransport = self.targetAnswers(index=1, transport=_SplicingTransport)
        self.assertEqual([t.bufferSize for t in (tls.under, targetTransport)], [BULK_READ, BULK_READ])
        app = AppConfig("web", (5001,), (A, B), bandwidthLimit=10_000.0)
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)
        server, tls = self.connectClient(_TLSTransport)
        target, targetTransport = self.targetAnswers(index=2, transport=_SplicingTransport)
        # The throttle's own reads, of about its bucket (tcpproxy.limits).
        self.assertEqual([t.bufferSize for t in (tls.under, targetTransport)], [MIN_READ, MIN_READ])


class DialThroughEndpointTests(_ClientMixin, SynchronousTestCase):
    """
    The whole lifecycle in memory with the real dialer: client endpoints on
    a L{MemoryReactorClock}, connections completed by L{iosim}.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(100)
        app = AppConfig("web", (5001,), (A, B), connectTimeout=5.0)
        dialer = FailoverDialer(self.reactor, app.connectTimeout)
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), dialer, self.reactor)
        self.events = captureEvents(self)
        self.completer = ConnectionCompleter(self.reactor)
        self.backend = _MemoryBackend()
        self.reactor.listenTCP(B.port, self.backend, interface=B.host)

    def test_failoverThenPair(self):
        """
        The first target refuses, the second answers: what the client sent
        meanwhile reaches it first, replies flow back, and the log names the
        failed attempt.
        """
        server, clientTransport = self.connectClient()
        server.dataReceived(b"early")
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), (A.host, A.port))
        self.completer.failOnce()
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), (B.host, B.port))
        pump = self.completer.succeedOnce()
        pump.flush()
        [backend] = self.backend.protocols
        self.assertEqual(bytes(backend.data), b"early")
        server.dataReceived(b" and later")
        pump.flush()
        self.assertEqual(bytes(backend.data), b"early and later")
        backend.transport.write(b"reply")
        pump.flush()
        self.assertEqual(clientTransport.value(), b"reply")
        self.factory.abortAll()
        # What the aborted client transport does next (a StringTransport
        # does not call connectionLost itself).
        server.connectionLost(Failure(ConnectionLost()))
        pump.flush()
        self.assertEqual(self.factory.relays, set())
        [event] = self.events
        self.assertEqual(event["failures"], ["127.0.0.1:7001: connection refused"])
        self.assertEqual((event["target"], event["bytesIn"], event["bytesOut"]), ("127.0.0.1:7002", 15, 5))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connectTimeout(self):
        """
        A target that does not answer within ConnectTimeout is given up
        (its attempt cancelled) and the next one tried.
        """
        server, clientTransport = self.connectClient()
        self.reactor.advance(4.9)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.1)
        [(host, port, *_)] = self.reactor.tcpClients[1:]
        self.assertEqual((host, port), (B.host, B.port))
        self.completer.failOnce()  # the abandoned attempt, already cancelled
        self.completer.failOnce()
        self.assertTrue(clientTransport.disconnecting)
        server.connectionLost(Failure(ConnectionDone()))
        [event] = self.events
        self.assertEqual(event["end"], END_NO_TARGET)
        self.assertEqual(
            event["failures"], ["127.0.0.1:7001: no answer within 5s", "127.0.0.1:7002: connection refused"]
        )

    def test_clientLeavesWhileDialling(self):
        """
        A client that leaves while its target is dialled cancels the
        endpoint's connect: the connector stops connecting.
        """
        server, clientTransport = self.connectClient()
        [connector] = self.reactor.connectors
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(connector.stoppedConnecting, True)
        [event] = self.events
        self.assertEqual(event["end"], END_CLIENT_LEFT)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
