"""
Unit tests of L{tcpproxy.listening.SocketPort} that do not depend on a relay:
how it hands clients over, how the accept gate stops and starts it, what it
does when out of descriptors, and what one client's trouble may and may not
do to it.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.connid import PATTERN as CONNECTION_ID
from tcpproxy.listening import SocketPort, bindTCP
from tcpproxy.tests.loopback import captureEvents


class _RaisingAcceptor:
    """
    An acceptor whose first client makes it raise (as a target that cannot
    be dialled once did, deep in the accept path); it keeps the others.
    """

    def __init__(self) -> None:
        self.accepted: list[tuple[socket.socket, tuple]] = []
        self.raised = 0

    def socketAccepted(self, sock: socket.socket, address: tuple) -> None:
        if not self.raised:
            self.raised += 1
            raise UnicodeError("label too long")
        self.accepted.append((sock, address))


class ClientFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.listener = bindTCP("127.0.0.1", 0)
        self.addCleanup(self.listener.close)

    def connect(self) -> socket.socket:
        client = socket.create_connection(self.listener.getsockname(), timeout=5)
        self.addCleanup(client.close)
        return client

    def test_oneClientRaisingDoesNotStopThePort(self) -> None:
        """
        An exception while one client is served is logged with that client's
        address, that client is closed, and the port goes on: the next
        client, in the same turn and in the next one, is accepted.
        """
        events = captureEvents(self, "tcpproxy.listening")
        acceptor = _RaisingAcceptor()
        port = SocketPort(self.reactor, self.listener, acceptor)
        first, second = self.connect(), self.connect()
        port.doRead()
        self.assertEqual([address for _, address in acceptor.accepted], [second.getsockname()])
        self.assertEqual(first.recv(1), b"")  # closed by the proxy
        third = self.connect()
        port.doRead()
        self.assertEqual(len(acceptor.accepted), 2)
        self.assertEqual(acceptor.accepted[1][1], third.getsockname())
        self.assertIn(port, self.reactor.getReaders())
        for sock, _ in acceptor.accepted:
            sock.close()
        [event] = events
        self.assertEqual(event["client"], f"127.0.0.1:{first.getsockname()[1]}")
        self.assertEqual(
            formatEvent(event),
            f"[{event['connectionId']}] port {port.getHost().port}: serving client {event['client']} failed; "
            "closed it",
        )
        self.assertRegex(event["connectionId"], CONNECTION_ID)
        self.assertEqual(event["log_level"].name, "critical")
        self.assertIsInstance(event["log_failure"].value, UnicodeError)
        self.flushLoggedErrors(UnicodeError)


class _Acceptor:
    def __init__(self) -> None:
        self.accepted: list[tuple[socket.socket, tuple]] = []

    def socketAccepted(self, sock: socket.socket, address: tuple) -> None:
        self.accepted.append((sock, address))


class _ExhaustedListener:
    """
    A listening socket whose first accept fails as if the process were out
    of file descriptors.
    """

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failures = 1
        self.family = real.family

    def _accept(self):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.real._accept()

    def accept(self):
        return self.real.accept()

    def __getattr__(self, name: str):
        return getattr(self.real, name)


class SocketPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.listener = bindTCP("127.0.0.1", 0)
        self.addCleanup(self.listener.close)
        self.acceptor = _Acceptor()

    def connect(self) -> socket.socket:
        client = socket.create_connection(self.listener.getsockname(), timeout=5)
        self.addCleanup(client.close)
        return client

    def test_accepts(self) -> None:
        """
        Each client is handed over as a non-blocking socket, with its address.
        """
        port = SocketPort(self.reactor, self.listener, self.acceptor)
        self.assertIn(port, self.reactor.getReaders())
        client = self.connect()
        port.doRead()
        [(sock, address)] = self.acceptor.accepted
        self.addCleanup(sock.close)
        self.assertEqual(address, client.getsockname())
        self.assertEqual(sock.gettimeout(), 0.0)
        self.assertEqual(port.getHost().port, self.listener.getsockname()[1])

    def test_fullAfterOneClient(self) -> None:
        """
        A client that fills the proxy (the accept gate stops the port's
        reading) is the last one accepted: the others of the burst wait in
        the backlog until the port reads again.
        """
        port = SocketPort(self.reactor, self.listener, self.acceptor)
        self.acceptor.socketAccepted = lambda sock, address: (
            self.acceptor.accepted.append((sock, address)),
            port.stopReading(),
        )
        for _ in range(3):
            self.connect()
        port.doRead()
        self.assertEqual(len(self.acceptor.accepted), 1)
        port.startReading()
        port.doRead()
        self.assertEqual(len(self.acceptor.accepted), 2)
        for sock, _ in self.acceptor.accepted:
            sock.close()

    def test_stopAndStartReading(self) -> None:
        """
        The proxy-wide limit stops and starts the reading of a port; stopping
        to listen closes it.
        """
        port = SocketPort(self.reactor, self.listener, self.acceptor)
        port.stopReading()
        self.assertNotIn(port, self.reactor.getReaders())
        port.startReading()
        self.assertIn(port, self.reactor.getReaders())
        self.successResultOf(port.stopListening())
        self.assertNotIn(port, self.reactor.getReaders())
        self.assertFalse(port.listening)
        self.assertEqual(self.listener.fileno(), -1)

    def test_outOfDescriptors(self) -> None:
        """
        When accept fails for lack of descriptors, the waiting client is
        closed (instead of the port being ready for ever) and that is logged,
        once; with nobody waiting, nothing is logged; the next client is
        accepted as usual.
        """
        events = captureEvents(self, "tcpproxy.listening")
        exhausted = _ExhaustedListener(self.listener)
        # Out of descriptors, accept fails whether a client waits or not.
        exhausted.failures = 2
        port = SocketPort(self.reactor, exhausted, self.acceptor)
        refused = self.connect()
        port.doRead()
        port.doRead()
        self.assertEqual(self.acceptor.accepted, [])
        try:
            self.assertEqual(refused.recv(1), b"")
        except ConnectionResetError:
            pass
        [event] = events
        self.assertEqual(event["code"], "EMFILE")
        self.assertEqual(event["client"], f"127.0.0.1:{refused.getsockname()[1]}")
        self.assertRegex(event["connectionId"], CONNECTION_ID)
        self.assertTrue(
            formatEvent(event).startswith(f"[{event['connectionId']}] cannot accept a client on port "), event
        )
        self.assertEqual(event["log_level"].name, "warn")
        self.connect()
        port.doRead()
        self.assertEqual(len(self.acceptor.accepted), 1)
        self.acceptor.accepted[0][0].close()

    def test_outOfDescriptorsSummarised(self) -> None:
        """
        Clients shed one after the other for lack of descriptors: the first
        is logged; those within the next second make one line with their
        count (not a line each: 20,008 lines in 4 s were seen before).
        """
        events = captureEvents(self, "tcpproxy.listening")
        exhausted = _ExhaustedListener(self.listener)
        exhausted.failures = 6
        port = SocketPort(self.reactor, exhausted, self.acceptor)
        for _ in range(5):
            self.connect()
            port.doRead()
        self.assertEqual(len(events), 1)
        self.reactor.advance(SocketPort.SHED_SUMMARY)
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["count"], 4)
        self.assertIn("4 more client(s) closed", events[1]["log_format"].format(**events[1]))
        self.reactor.advance(SocketPort.SHED_SUMMARY)
        self.assertEqual(len(events), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.successResultOf(port.stopListening())
