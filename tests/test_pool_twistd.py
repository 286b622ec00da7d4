"""
System tests of the warm pool: the real C{twistd tcpproxy} with a
C{"Pool"}, a server-first backend on a real socket (it greets each
connection with its number, then echoes), clients on real sockets.
"""

from __future__ import annotations

import socket
import threading

from twisted.trial.unittest import TestCase

from tests.support import Twistd, connect, freePorts, receiveAll, waitUntil


class _Greeter:
    """
    A server-first backend in a thread: greets each connection with its
    number (C{"220 connection N"}), then echoes until EOF.
    """

    def __init__(self, testCase, port: int) -> None:
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.running = True
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        testCase.addCleanup(self._stop, thread)

    def _stop(self, thread: threading.Thread) -> None:
        self.running = False
        thread.join()
        self.listener.close()

    def _accept(self) -> None:
        while self.running:
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            threading.Thread(target=self._serve, args=(connection, self.accepted), daemon=True).start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        with connection:
            try:
                connection.sendall(b"220 connection %d\r\n" % number)
                while data := connection.recv(65536):
                    connection.sendall(data)
            except OSError:
                pass


class PoolTwistdTests(TestCase):
    def setUp(self) -> None:
        self.twistd = Twistd(self)
        self.port, self.target = freePorts(2)

    def app(self, **settings) -> dict:
        app = {"Name": "smtp", "Ports": [self.port], "Targets": [f"127.0.0.1:{self.target}"], **settings}
        return {"BindAddress": "127.0.0.1", "Apps": [app]}

    def test_greetingOfAConnectionOpenedBefore(self) -> None:
        """
        A client gets the greeting of a connection the proxy opened before
        the client came, then the relay goes on both ways, byte-exact.
        """
        backend = _Greeter(self, self.target)
        config = self.twistd.writeConfig(self.app(Pool={"Size": 2}))
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config)
        self.twistd.waitUntilServing(self.port)
        # The probe took one pooled connection; the pool opened another.
        waitUntil(lambda: backend.accepted >= 3, "the pool filled again")
        openedBefore = backend.accepted
        with connect(self.port) as client:
            client.sendall(b"EHLO client.example\r\n")
            client.shutdown(socket.SHUT_WR)
            answer = receiveAll(client)
        greeting, _, echoed = answer.partition(b"\r\n")
        self.assertEqual(echoed, b"EHLO client.example\r\n")
        self.assertTrue(greeting.startswith(b"220 connection "), answer)
        self.assertLessEqual(int(greeting.split()[-1]), openedBefore)

    def test_refusedWithSendProxy(self) -> None:
        """
        A pool with C{SendProxy} is refused at start-up, in one line.
        """
        config = self.twistd.writeConfig(self.app(Pool={"Size": 2}, SendProxy="v2"))
        self.assertEqual(self.twistd.run("-n", "--pidfile=", "tcpproxy", "--config", config), 1)
        self.assertIn(
            'app "smtp": key "Pool": cannot be used with SendProxy: the PROXY header names the client',
            self.twistd.stderr(),
        )
