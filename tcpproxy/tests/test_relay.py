"""
Unit tests of the relay's dial and pairing logic, with a fake dialer and
L{StringTransport}s (backpressure and half-close on real sockets are in
L{tcpproxy.tests.test_relay_loopback}).
"""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import Clock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tcpproxy.access import END_CLIENT_LEFT, END_CLIENT_LOST, END_NO_TARGET
from tcpproxy.app import ProxyServerFactory
from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, parseTarget
from tcpproxy.dialer import Dialled, IDialer, NoTargetAvailable
from tcpproxy.relay import LINGER, PREDIAL_BUFFER, ProxyClientProtocol
from tcpproxy.tests.loopback import captureEvents

A, B = parseTarget("127.0.0.1:7001"), parseTarget("127.0.0.1:7002")


@implementer(IDialer)
class _HalfCloseableTransport(StringTransport):
    """
    A L{StringTransport} that can be shut for writing, as a TCP one can.
    """

    writeShut = False

    def loseWriteConnection(self) -> None:
        self.writeShut = True


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


class RelayTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(100)
        self.dialer = FakeDialer()
        self.dialer.cancelled = []
        app = AppConfig("web", (5001,), (A, B))
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)
        self.events = captureEvents(self)

    def connectClient(self):
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = _HalfCloseableTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5001),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        server.makeConnection(transport)
        return server, transport

    def targetAnswers(self, index=0, target=A, failures=()):
        client = ProxyClientProtocol()
        transport = _HalfCloseableTransport()
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

    def test_clientResetClosesTarget(self):
        """
        A client that resets makes the proxy close the target side: EOF
        first (after what was already sent to it is flushed), then what the
        target still sends is dropped until its own EOF (a lingering close,
        so that closing with unread bytes does not reset what the target
        was sent); producers are unregistered first, so the close cannot
        hang on a paused producer.
        """
        server, clientTransport = self.connectClient()
        target, targetTransport = self.targetAnswers(failures=[(B, "connection refused")])
        server.dataReceived(b"12345")
        target.dataReceived(b"abc")
        server.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(targetTransport.writeShut)
        self.assertFalse(targetTransport.disconnecting)
        self.assertIsNone(targetTransport.producer)
        target.dataReceived(b"dropped")
        target.readConnectionLost()
        self.assertTrue(targetTransport.disconnecting)
        target.connectionLost(Failure(ConnectionDone()))
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

    def test_lingerBounded(self):
        """
        A target that never sends its EOF after the client reset is reset
        once the lingering close has lasted LINGER seconds.
        """
        server, _ = self.connectClient()
        target, targetTransport = self.targetAnswers()
        server.connectionLost(Failure(ConnectionLost()))
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
