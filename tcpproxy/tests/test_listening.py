"""
Unit tests of L{tcpproxy.listening.SocketPort} that do not depend on a relay:
what one client's trouble may and may not do to a listening port.
"""

from __future__ import annotations

import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

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
        self.assertEqual(event["log_level"].name, "critical")
        self.assertIsInstance(event["log_failure"].value, UnicodeError)
        self.flushLoggedErrors(UnicodeError)
