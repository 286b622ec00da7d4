"""
System test: the real C{twistd tcpproxy} running out of file descriptors.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import TestCase

from tests.support import Twistd, connect, echoThrough, freePorts, waitUntil

LIMIT = 64
CLIENTS = 40
"""
More clients than C{LIMIT} descriptors can serve: each relayed client takes
three here (its own socket, the one to its target, and the demo echo's end).
"""


class DescriptorExhaustionTests(TestCase):
    def test_acceptFailsAndRecovers(self) -> None:
        """
        With too few descriptors, the clients that cannot be served are
        closed (Twisted's reserved-descriptor recovery, logged), the others
        are relayed, nothing crashes, and once descriptors are free again
        new clients are served as usual.
        """
        twistd = Twistd(self)
        proxyPort, targetPort = freePorts(2)
        config = twistd.writeConfig(
            {
                "BindAddress": "127.0.0.1",
                "DrainTimeout": 1,
                "Apps": [{"Name": "tight", "Ports": [proxyPort], "Targets": [f"127.0.0.1:{targetPort}"]}],
            }
        )
        twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends", fileLimit=LIMIT)
        twistd.waitUntilServing(proxyPort)

        held: list[socket.socket] = []
        echoed = closed = 0
        try:
            for index in range(CLIENTS):
                sock = connect(proxyPort)
                held.append(sock)
                message = b"client %d" % index
                sock.sendall(message)
                reply = b""
                try:
                    while len(reply) < len(message):
                        chunk = sock.recv(len(message) - len(reply))
                        if not chunk:
                            break
                        reply += chunk
                except ConnectionResetError:
                    pass
                if reply == message:
                    echoed += 1
                else:
                    self.assertEqual(reply, b"", "a client got bytes that are not its own")
                    closed += 1
        finally:
            for sock in held:
                sock.close()

        self.assertGreater(echoed, 0, twistd.output())
        self.assertGreater(closed, 0, "the descriptor limit was never reached")
        self.assertEqual(echoed + closed, CLIENTS)

        # Once the proxy has seen those clients go, descriptors are free
        # again and a new client is relayed (until then it may be closed).
        def servedAgain() -> bool:
            try:
                return echoThrough(proxyPort, b"after")[0] == b"after"
            except ConnectionError:
                return False

        waitUntil(servedAgain, "a client served after the descriptors were freed")
        self.assertTrue(twistd.assertRunning())
        output = twistd.output()
        self.assertIn("EMFILE", output)
        self.assertNotIn("Traceback", output)
