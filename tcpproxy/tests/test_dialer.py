"""
Tests for L{tcpproxy.dialer}: failover order, reasons, timeout and
cancellation, on L{MemoryReactorClock} (no sockets).
"""

import errno

from twisted.internet import error
from twisted.internet.defer import CancelledError, fail
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tcpproxy.config import parseTarget
from tcpproxy.dialer import Dialled, FailoverDialer, IDialer, NoTargetAvailable, endpointForTarget

A, B, C = (parseTarget(t) for t in ("127.0.0.1:1001", "127.0.0.2:1002", "127.0.0.3:1003"))


class FailoverDialerTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.dialer = FailoverDialer(self.reactor, timeout=5)
        self.factory = Factory.forProtocol(Protocol)

    def dialled(self):
        """
        The (host, port) of every connect attempt so far.
        """
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def refuse(self, index):
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(
            self.reactor.connectors[index], Failure(error.ConnectionRefusedError())
        )

    def accept(self, index):
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return protocol

    def test_interface(self):
        verifyObject(IDialer, self.dialer)

    def test_firstTargetAnswers(self):
        d = self.dialer.dial(self.factory, [A, B])
        self.assertEqual(self.dialled(), [("127.0.0.1", 1001)])
        self.accept(0)
        result = self.successResultOf(d)
        self.assertIsInstance(result, Dialled)
        self.assertEqual((result.target, result.failures), (A, ()))
        self.assertIsInstance(result.protocol, Protocol)

    def test_failoverInOrder(self):
        """
        A refused target makes the dialer try the next one, in the order
        given; the failures are reported with the success.
        """
        d = self.dialer.dial(self.factory, [B, A, C])
        self.refuse(0)
        self.assertEqual(self.dialled(), [("127.0.0.2", 1002), ("127.0.0.1", 1001)])
        self.assertNoResult(d)
        self.accept(1)
        result = self.successResultOf(d)
        self.assertEqual(result.target, A)
        self.assertEqual(result.failures, ((B, "connection refused"),))
        self.assertEqual(len(self.dialled()), 2, "dialled a target after one answered")

    def test_allFail(self):
        """
        When every target fails, each was tried exactly once, and the
        failure lists each with its reason.
        """
        d = self.dialer.dial(self.factory, [A, B, C])
        for index in range(3):
            self.refuse(index)
        reason = self.failureResultOf(d, NoTargetAvailable)
        self.assertEqual(len(self.dialled()), 3)
        self.assertEqual(
            reason.value.failures,
            ((A, "connection refused"), (B, "connection refused"), (C, "connection refused")),
        )
        self.assertEqual(
            str(reason.value),
            "all 3 targets failed: 127.0.0.1:1001: connection refused; "
            "127.0.0.2:1002: connection refused; 127.0.0.3:1003: connection refused",
        )

    def test_timeoutMovesOn(self):
        """
        An attempt that gets no answer within the connect timeout is
        abandoned (its connector stopped) and the next target tried.
        """
        d = self.dialer.dial(self.factory, [A, B])
        self.reactor.advance(4.9)
        self.assertEqual(len(self.dialled()), 1)
        self.reactor.advance(0.2)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(len(self.dialled()), 2)
        self.accept(1)
        self.assertEqual(self.successResultOf(d).failures, ((A, "no answer within 5s"),))

    def test_cancelStopsTheWalk(self):
        """
        Cancelling the dial (the client left) stops the attempt under way
        and dials no further target.
        """
        d = self.dialer.dial(self.factory, [A, B, C])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(len(self.dialled()), 1)
        self.reactor.advance(10)
        self.assertEqual(len(self.dialled()), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_unresolvableHostname(self):
        """
        A hostname that does not resolve is a failure like any other, with
        its own reason.
        """

        class Unresolvable:
            def connect(self, factory):
                return fail(error.DNSLookupError("nope.invalid"))

        dialer = FailoverDialer(self.reactor, 5, endpointFactory=lambda reactor, target: Unresolvable())
        d = dialer.dial(self.factory, [parseTarget("nope.invalid:80")])
        reason = self.failureResultOf(d, NoTargetAvailable)
        self.assertEqual(str(reason.value), "all 1 targets failed: nope.invalid:80: hostname did not resolve")

    def test_outOfDescriptors(self):
        """
        When the proxy itself cannot make a socket (out of descriptors), the
        reason says so, rather than blaming the target.
        """

        class NoSocket:
            def connect(self, factory):
                return fail(error.ConnectBindError(errno.EMFILE, ""))

        class Health:
            failed: list = []

            def attemptStarted(self, target):
                return 0

            def connectFailed(self, target, why, token):
                self.failed.append(target)

        health = Health()
        dialer = FailoverDialer(
            self.reactor, 5, endpointFactory=lambda reactor, target: NoSocket(), health=health
        )
        reason = self.failureResultOf(dialer.dial(self.factory, [A]), NoTargetAvailable)
        self.assertEqual(reason.value.failures, ((A, "the proxy is out of file descriptors"),))
        self.assertEqual(health.failed, [], "the target was marked down for the proxy's own trouble")

    def test_noTargets(self):
        reason = self.failureResultOf(self.dialer.dial(self.factory, []), NoTargetAvailable)
        self.assertEqual(str(reason.value), "no target to try")


class EndpointForTargetTests(SynchronousTestCase):
    def test_kinds(self):
        """
        IPv4 and IPv6 literals get plain TCP endpoints of their family; a
        hostname gets a HostnameEndpoint, which resolves on each connect.
        """
        reactor = MemoryReactorClock()
        self.assertIsInstance(endpointForTarget(reactor, parseTarget("10.0.0.1:80")), TCP4ClientEndpoint)
        self.assertIsInstance(endpointForTarget(reactor, parseTarget("[::1]:7001")), TCP6ClientEndpoint)
        self.assertIsInstance(endpointForTarget(reactor, parseTarget("backend.example:80")), HostnameEndpoint)

    def test_endpointReused(self):
        dialer = FailoverDialer(MemoryReactorClock(), 5)
        self.assertIs(dialer.endpointFor(A), dialer.endpointFor(A))
