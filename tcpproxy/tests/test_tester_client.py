"""
Tests for L{tcpproxy.tester.client.LoadProtocol}: matching echoes to the
messages sent, over a L{StringTransport}.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tcpproxy.tester.client import MISMATCH, UNEXPECTED, IConnectionListener, LoadProtocol
from tcpproxy.tester.stats import Recorder
from tcpproxy.tester.targets import ProxyPort, targetFor


class TCPStringTransport(StringTransport):
    """
    A L{StringTransport} with the TCP option the load client sets.
    """

    tcpNoDelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.tcpNoDelay = enabled


@implementer(IConnectionListener)
class Listener:
    def __init__(self) -> None:
        self.events: list[str] = []

    def connectionReady(self, connection) -> None:
        self.events.append("ready")

    def replied(self, connection) -> None:
        self.events.append("replied")

    def budgetSpent(self, connection) -> None:
        self.events.append("spent")

    def connectionClosed(self, connection) -> None:
        self.events.append("closed")


class LoadProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.recorder = Recorder(["app"])
        self.listener = Listener()
        self.messages = iter([b"first message", b"second", b"third one"])
        self.protocol = LoadProtocol(
            ProxyPort("app", 5001, targetFor("127.0.0.1", 5001)),
            lambda: next(self.messages),
            self.recorder,
            self.clock,
            self.listener,
            budget=3,
        )
        self.transport = TCPStringTransport()
        self.protocol.makeConnection(self.transport)

    def figures(self):
        self.recorder.rollOver(1.0, 1.0, 1, None)
        return self.recorder.figures(1.0)[0]

    def test_echoInPieces(self) -> None:
        """
        Replies are matched to messages by length, however the stream is cut
        up, and latency runs from each message's intended send time.
        """
        self.assertEqual(self.listener.events, ["ready"])
        self.assertTrue(self.transport.tcpNoDelay)
        self.protocol.send(2, intended=0.0)
        self.assertEqual(self.transport.value(), b"first messagesecond")
        self.clock.advance(0.0015)
        self.protocol.dataReceived(b"first mes")
        self.protocol.dataReceived(b"sagesec")
        self.clock.advance(0.0005)
        self.protocol.dataReceived(b"ond")
        figures = self.figures()
        self.assertEqual((figures.sent, figures.answered, figures.errors, figures.bytes), (2, 2, 0, 19))
        self.assertEqual((figures.latency["min"], figures.latency["max"]), (1500, 2000))
        self.assertEqual(self.listener.events, ["ready", "replied", "replied"])
        self.assertEqual(len(self.protocol.outstanding), 0)

    def test_mismatch(self) -> None:
        """
        A reply that differs from its message is an error, not an answer, and
        the next reply is still matched to the next message.
        """
        self.protocol.send(2, intended=0.0)
        self.protocol.dataReceived(b"first MESSAGEsecond")
        figures = self.figures()
        self.assertEqual((figures.answered, figures.errors), (1, 1))
        self.assertEqual(dict(self.recorder.errorKinds), {("app", 5001, MISMATCH): 1})

    def test_unexpected(self) -> None:
        """
        Bytes when no reply is awaited are an error.
        """
        self.protocol.dataReceived(b"surprise")
        self.assertEqual(dict(self.recorder.errorKinds), {("app", 5001, UNEXPECTED): 1})

    def test_budget(self) -> None:
        """
        No more than the budget is sent, and the listener hears when it is spent.
        """
        self.assertEqual(self.protocol.send(2, 0.0), 2)
        self.assertEqual(self.protocol.send(2, 0.0), 1)
        self.assertEqual(self.protocol.send(2, 0.0), 0)
        self.assertFalse(self.protocol.canSend)
        self.assertEqual(self.listener.events, ["ready", "spent"])

    def test_closeDrops(self) -> None:
        """
        Closing with replies outstanding drops them, without an error.
        """
        self.protocol.send(2, 0.0)
        self.protocol.dataReceived(b"first message")
        self.protocol.close()
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        figures = self.figures()
        self.assertEqual((figures.answered, figures.dropped, figures.errors), (1, 1, 0))
        self.assertEqual(self.listener.events[-1], "closed")

    def test_closedByTheProxy(self) -> None:
        """
        A connection the proxy closes is an error, naming how it ended, and
        its outstanding messages are dropped.
        """
        self.protocol.send(1, 0.0)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.protocol.makeConnection(TCPStringTransport())
        self.protocol.send(1, 0.0)
        self.protocol.connectionLost(Failure(ConnectionLost("reset")))
        figures = self.figures()
        self.assertEqual((figures.errors, figures.dropped), (2, 2))
        kinds = sorted(kind for (_, _, kind) in self.recorder.errorKinds)
        self.assertEqual(kinds[0], "connection closed by the proxy")
        self.assertTrue(kinds[1].startswith("connection lost: "), kinds[1])
