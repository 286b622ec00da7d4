"""
System tests of reload: the real C{twistd tcpproxy}, its configuration file
edited as a user edits it, then C{kill -HUP} (or C{--watch}); checked in the
log and through the ports, with a connection open throughout.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import TIMEOUT, accepts, connect, echoThrough, freePorts, processGone, receive, waitUntil
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


def catches(pid: int, signum: int) -> bool:
    """
    Whether process C{pid} has a handler installed for C{signum} (its
    C{SigCgt} mask in C{/proc}).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


def loaded(pid: int, library: str) -> bool:
    """
    Whether process C{pid} has mapped a shared library whose path contains
    C{library}.
    """
    try:
        with open(f"/proc/{pid}/maps") as f:
            return library in f.read()
    except OSError:
        return False


class StartUpSignalTests(TwoAppsMixin, TestCase):
    """
    C{SIGHUP} while C{twistd tcpproxy} is starting (C{systemctl reload}
    right after C{start}) never kills it.
    """

    def whenStarting(self, process) -> None:
        """
        Return as soon as C{process} is in tcpproxy's start-up: it catches
        C{SIGHUP}, or has loaded the TLS library (the relay's modules are
        being imported), or has bound its first port; polling without a
        pause, since each of these moments may be short.
        """
        deadline = time.monotonic() + TIMEOUT
        while not (
            catches(process.pid, signal.SIGHUP)
            or loaded(process.pid, "_rust.abi3")
            or accepts(self.alphaPorts[0])
        ):
            self.twistd.assertRunning()
            self.assertLess(time.monotonic(), deadline, "twistd did not start")

    def test_sighupDuringStartUp(self) -> None:
        """
        A SIGHUP sent as soon as the proxy has its first port bound, or
        catches the signal, whichever is first -- before it serves: the
        process lives, serves every port, and says it reloads once for it.
        A few runs, since where start-up is when the signal lands varies.
        """
        if not os.path.exists("/proc/self/status"):
            raise SkipTest("needs /proc to see when start-up is under way")
        config = self.twistd.writeConfig(self.document())
        for _ in range(3):
            process = self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends")
            self.whenStarting(process)
            os.kill(process.pid, signal.SIGHUP)
            self.twistd.waitUntilServing(*self.alphaPorts, self.betaPort)
            self.waitForLine(self.twistd.stdout, "SIGHUP received during start-up")
            self.waitForLine(self.twistd.stdout, "reload of ", ": no change")
            self.assertEqual(echoThrough(self.betaPort, b"after HUP")[0], b"after HUP")
            process.send_signal(signal.SIGTERM)
            self.assertShutDownBy(signal.SIGTERM)
