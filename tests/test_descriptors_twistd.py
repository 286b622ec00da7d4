"""
System test: the real C{twistd tcpproxy} with few file descriptors.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.support import Twistd, connect, echoThrough, freePorts, waitUntil

LIMIT = 48
CLIENTS = 40
"""
More clients than C{LIMIT} descriptors can serve at once: each relayed
client holds two (its own socket and the one to its target).
"""

ECHO_SERVER = """
import selectors, socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(128)
sel = selectors.DefaultSelector()
sel.register(server, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is server:
            client, _ = server.accept()
            sel.register(client, selectors.EVENT_READ)
            continue
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if data:
            key.fileobj.sendall(data)
        else:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""


def echoBackend(testCase, port: int) -> None:
    """
    An echo server in a process of its own (its descriptors are not the
    proxy's), until the test ends.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    testCase.addCleanup(process.wait)
    testCase.addCleanup(process.kill)
    testCase.assertEqual(process.stdout.readline().strip(), "ready")


def echoed(sock: socket.socket, message: bytes, timeout: float) -> bool | None:
    """
    Whether C{message} came back on C{sock} within C{timeout} seconds:
    C{True}; C{None} if nothing came (the client still waits); C{False} if
    the connection was closed or reset instead.
    """
    sock.settimeout(timeout)
    reply = b""
    try:
        while len(reply) < len(message):
            chunk = sock.recv(len(message) - len(reply))
            if not chunk:
                return False
            reply += chunk
    except TimeoutError:
        return None if not reply else False
    except ConnectionResetError:
        return False
    return reply == message


class DescriptorLimitTests(TestCase):
    def test_clientsBeyondTheLimitWaitAndAreServed(self) -> None:
        """
        With too few descriptors for every client at once, the proxy takes
        as many as it can dial for (the number it logs at start), leaves the
        others waiting in the backlog -- none is closed -- and serves each
        as earlier ones end; the log says so in a few lines, not one per
        client, and without a traceback.
        """
        twistd = Twistd(self)
        proxyPort, targetPort = freePorts(2)
        echoBackend(self, targetPort)
        config = twistd.writeConfig(
            {
                "BindAddress": "127.0.0.1",
                "DrainTimeout": 1,
                "Apps": [
                    {
                        "Name": "tight",
                        "Ports": [proxyPort],
                        "Targets": [f"127.0.0.1:{targetPort}"],
                        "AccessLog": False,
                    }
                ],
            }
        )
        twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config, fileLimit=LIMIT)
        twistd.waitUntilServing(proxyPort)
        pattern = re.compile(r"at most (\d+) connections at once")
        waitUntil(lambda: pattern.search(twistd.output()), "the connection limit logged")
        budget = int(pattern.search(twistd.output()).group(1))
        self.assertLess(budget, CLIENTS)

        held: list[socket.socket] = []
        try:
            for index in range(CLIENTS):
                sock = connect(proxyPort)
                held.append(sock)
                sock.sendall(b"client %02d" % index)
            # The first ones are served; the rest wait, none is turned away.
            messages = [b"client %02d" % index for index in range(CLIENTS)]
            first = [echoed(held[i], messages[i], 0.5) for i in range(budget)]
            self.assertEqual(first, [True] * budget, twistd.output())
            waiting = [echoed(held[i], messages[i], 0.05) for i in range(budget, CLIENTS)]
            self.assertEqual(waiting, [None] * (CLIENTS - budget))
            # As served clients leave, the waiting ones are served in turn.
            for sock in held[:budget]:
                sock.close()
            late = []
            for i in range(budget, CLIENTS):
                late.append(echoed(held[i], messages[i], 10))
                held[i].close()
            self.assertEqual(late, [True] * (CLIENTS - budget), twistd.output())
        finally:
            for sock in held:
                sock.close()

        waitUntil(lambda: echoThrough(proxyPort, b"after")[0] == b"after", "a client served afterwards")
        self.assertTrue(twistd.assertRunning())
        output = twistd.output()
        self.assertNotIn("Traceback", output)
        self.assertNotIn("EMFILE", output)
        gateLines = [line for line in output.splitlines() if "AcceptGate" in line]
        self.assertLessEqual(len(gateLines), 6, "\n".join(gateLines))
