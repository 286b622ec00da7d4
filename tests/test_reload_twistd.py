"""
System tests of reload: the real C{twistd tcpproxy}, its configuration file
edited as a user edits it, then C{kill -HUP} (or C{--watch}); checked in the
log and through the ports, with a connection open throughout.
"""

from __future__ import annotations

import os
import signal
import socket

from twisted.trial.unittest import TestCase

from tests.support import accepts, connect, echoThrough, freePorts, processGone, receive, waitUntil
from tests.test_twistd import TwoAppsMixin, linesWith


class ReloadMixin(TwoAppsMixin):
    def setUp(self) -> None:
        TwoAppsMixin.setUp(self)
        (self.newPort,) = freePorts(1)

    def changed(self) -> dict:
        """
        The configuration edited: alpha loses its second port, which moves
        to beta, and relays to beta's target; beta gains a new port.
        """
        document = self.document()
        alpha, beta = document["Apps"]
        alpha["Ports"] = self.alphaPorts[:1]
        alpha["Targets"] = [f"127.0.0.1:{self.betaTarget}"]
        beta["Ports"] = [self.betaPort, self.alphaPorts[1], self.newPort]
        return document

    def assertEchoes(self, port: int, message: bytes) -> str:
        received, client = echoThrough(port, message)
        self.assertEqual(received, message)
        return client


class DaemonReloadTests(ReloadMixin, TestCase):
    def test_sighup(self) -> None:
        """
        C{kill -HUP $(cat twistd.pid)} applies the edited file: a connection
        open across it keeps relaying byte-exact, the new port serves, the
        moved port goes to its new app, the log has one summary line.  An
        invalid file then changes nothing, and says why.
        """
        config = self.twistd.writeConfig(self.document())
        pid, pidfile, logfile = self.twistd.runDaemon(config)

        def log() -> str:
            with open(logfile) as f:
                return f.read()

        with connect(self.alphaPorts[0]) as held:
            before = os.urandom(50_000)
            held.sendall(before)
            self.assertEqual(receive(held, len(before)), before)

            self.twistd.writeConfig(self.changed())
            os.kill(pid, signal.SIGHUP)
            line = self.waitForLine(log, "reload of ", ": applied;")
            self.assertIn(f"ports added: {self.newPort}", line)
            self.assertIn(f'ports moved: {self.alphaPorts[1]} ("alpha" -> "beta")', line)
            self.assertIn('apps changed: "alpha" (Ports, Targets), "beta" (Ports)', line)

            after = os.urandom(50_000)
            held.sendall(after)
            self.assertEqual(receive(held, len(after)), after)
            client = self.assertEchoes(self.newPort, b"new port")
            self.waitForLine(log, f"{client} -> beta:{self.newPort} -> 127.0.0.1:{self.betaTarget}")
            client = self.assertEchoes(self.alphaPorts[1], b"moved port")
            self.waitForLine(log, f"{client} -> beta:{self.alphaPorts[1]} -> ")
            client = self.assertEchoes(self.alphaPorts[0], b"new target")
            self.waitForLine(log, f"{client} -> alpha:{self.alphaPorts[0]} -> 127.0.0.1:{self.betaTarget}")

            self.twistd.writeConfig('{"Apps": [{"Name": "alpha", "Ports": [1], "Targets": ["nowhere"]}]}')
            os.kill(pid, signal.SIGHUP)
            line = self.waitForLine(log, "reload refused, nothing changed")
            self.assertIn('app "alpha": key "Targets": "nowhere" has no port', line)
            for port in (*self.alphaPorts, self.betaPort, self.newPort):
                self.assertEchoes(port, b"still served")

            held.shutdown(socket.SHUT_WR)
            self.assertEqual(held.recv(1), b"")
        self.waitForLine(
            log, f"-> alpha:{self.alphaPorts[0]} -> 127.0.0.1:{self.alphaTarget}: done", "100000 bytes in"
        )

        os.kill(pid, signal.SIGTERM)
        waitUntil(lambda: processGone(pid), "the daemon to exit")
        self.assertIn("Server Shut Down.", log())
        self.assertNoTraceback(log())


class ForegroundReloadTests(ReloadMixin, TestCase):
    def test_watch(self) -> None:
        """
        With C{--watch}, saving the file is enough: the change is applied
        within a few seconds, with no signal.  A removed port refuses.
        """
        config = self.twistd.writeConfig(self.document())
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends", "--watch")
        self.twistd.waitUntilServing(*self.alphaPorts, self.betaPort)
        document = self.changed()
        document["Apps"][1]["Ports"].remove(self.betaPort)
        self.twistd.writeConfig(document)
        line = self.waitForLine(self.twistd.stdout, "reload of ", ": applied;")
        self.assertIn(f"ports removed: {self.betaPort}", line)
        self.assertEchoes(self.newPort, b"watched")
        self.assertFalse(accepts(self.betaPort))
        self.assertEqual(len(linesWith(self.twistd.stdout(), "reload of ")), 1)

        self.twistd.process.send_signal(signal.SIGTERM)
        self.assertShutDownBy(signal.SIGTERM)
