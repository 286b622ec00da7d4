"""
System tests: the real C{twistd tcpproxy}, run as a user runs it, checked as
a user checks it -- what comes back through a port, the exit status, what is
on standard error and in the log, the pidfile.

About exit statuses: C{twistd} stopped by a signal ends by that same signal
(Twisted re-raises it once shut down, so that a supervisor sees why it
stopped); C{subprocess} reports that as minus the signal number.  An orderly
shutdown is recognised by that status, the "Server Shut Down." line and no
traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from twisted.trial.unittest import TestCase

from tests.support import (
    TIMEOUT,
    Twistd,
    accepts,
    blockPort,
    connect,
    describe,
    echoThrough,
    freePorts,
    pidsMentioning,
    processGone,
    receive,
    receiveAll,
    waitUntil,
)


def linesWith(text: str, *fragments: str) -> list[str]:
    """
    The lines of C{text} that contain every one of C{fragments}.
    """
    return [line for line in text.splitlines() if all(f in line for f in fragments)]


class TwoAppsMixin:
    """
    A configuration of two apps on free loopback ports, with demo backends.

    @ivar alphaPorts: app C{alpha}'s two ports, relaying to C{alphaTarget}.
    @ivar betaPort: app C{beta}'s port, relaying to C{betaTarget}.
    """

    def setUp(self) -> None:
        self.twistd = Twistd(self)
        alphaA, alphaB, self.betaPort, self.alphaTarget, self.betaTarget = freePorts(5)
        self.alphaPorts = [alphaA, alphaB]

    def document(self, **top: object) -> dict:
        document = {
            "BindAddress": "127.0.0.1",
            "Apps": [
                {"Name": "alpha", "Ports": self.alphaPorts, "Targets": [f"127.0.0.1:{self.alphaTarget}"]},
                {"Name": "beta", "Ports": [self.betaPort], "Targets": [f"127.0.0.1:{self.betaTarget}"]},
            ],
        }
        document.update(top)
        return document

    def startForeground(self, **top: object) -> None:
        """
        Start C{twistd -n tcpproxy --demo-backends} on this configuration
        and wait until every proxy port answers.
        """
        config = self.twistd.writeConfig(self.document(**top))
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends")
        self.twistd.waitUntilServing(*self.alphaPorts, self.betaPort)

    def assertShutDownBy(self, signum: int, log: str | None = None) -> None:
        """
        Assert that the last run ended in order on C{signum}.
        """
        status = self.twistd.wait()
        self.assertEqual(status, -signum, self.twistd.output())
        log = self.twistd.stdout() if log is None else log
        self.assertIn("Server Shut Down.", log)
        self.assertNoTraceback(log)

    def assertNoTraceback(self, *texts: str) -> None:
        for text in (self.twistd.stdout(), self.twistd.stderr(), *texts):
            self.assertNotIn("Traceback", text)

    def waitForLine(self, log, *fragments: str) -> str:
        """
        Wait until a line of C{log()} contains every one of C{fragments}.
        """
        found = waitUntil(lambda: linesWith(log(), *fragments), f"a log line with {fragments}")
        return found[0]


class HelpTests(TestCase):
    """
    C{twistd} knows C{tcpproxy} and its options.
    """

    def setUp(self) -> None:
        self.twistd = Twistd(self)

    def test_listed(self) -> None:
        self.assertEqual(self.twistd.run("--help"), 0, self.twistd.output())
        self.assertEqual(
            linesWith(self.twistd.stdout(), "tcpproxy", "A layer-4 (TCP) proxy"),
            ["    tcpproxy         A layer-4 (TCP) proxy and round-robin load balancer."],
        )

    def test_options(self) -> None:
        self.assertEqual(self.twistd.run("tcpproxy", "--help"), 0, self.twistd.output())
        out = self.twistd.stdout()
        self.assertEqual(len(linesWith(out, "--config=", "[default: config.json]")), 1, out)
        self.assertIn("--demo-backends", out)
        self.assertIn("--demo-down=", out)


class ForegroundTests(TwoAppsMixin, TestCase):
    """
    C{twistd -n tcpproxy}: relaying, logging, and stopping on a signal.
    """

    def test_echoAndSIGINT(self) -> None:
        """
        Bytes go through unchanged; the log says what each app listens on and
        what each connection did; Ctrl-C stops the proxy in order.
        """
        self.startForeground()
        message = os.urandom(100_000)
        port = self.alphaPorts[1]
        received, client = echoThrough(port, message)
        self.assertEqual(received, message)

        line = self.waitForLine(
            self.twistd.stdout, f"{client} -> alpha:{port} -> 127.0.0.1:{self.alphaTarget}"
        )
        self.assertIn("100000 bytes in", line)
        self.assertIn("100000 bytes out", line)
        out = self.twistd.stdout()
        (alpha,) = linesWith(out, '"alpha"', "listening on 127.0.0.1")
        self.assertIn(f"{self.alphaPorts[0]}, {self.alphaPorts[1]}", alpha)
        self.assertIn(f"127.0.0.1:{self.alphaTarget}", alpha)
        (beta,) = linesWith(out, '"beta"', "listening on 127.0.0.1")
        self.assertIn(str(self.betaPort), beta)
        self.assertIn(f"127.0.0.1:{self.betaTarget}", beta)

        self.twistd.process.send_signal(signal.SIGINT)
        self.assertShutDownBy(signal.SIGINT)
        self.assertFalse(accepts(port))

    def test_SIGTERM(self) -> None:
        self.startForeground()
        received, client = echoThrough(self.betaPort, b"hello beta")
        self.assertEqual(received, b"hello beta")
        self.waitForLine(self.twistd.stdout, f"{client} -> beta:{self.betaPort} -> ", "10 bytes in")

        self.twistd.process.send_signal(signal.SIGTERM)
        self.assertShutDownBy(signal.SIGTERM)
        self.assertFalse(accepts(self.betaPort))

    def test_defaultConfig(self) -> None:
        """
        Without C{--config}, C{config.json} of the working directory is read.
        """
        self.twistd.writeConfig(self.document(), "config.json")
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--demo-backends")
        self.twistd.waitUntilServing(self.betaPort)
        self.assertEqual(echoThrough(self.betaPort, b"default")[0], b"default")
        self.twistd.process.send_signal(signal.SIGTERM)
        self.assertShutDownBy(signal.SIGTERM)


class DaemonTests(TwoAppsMixin, TestCase):
    """
    C{twistd tcpproxy} in the background, with a pidfile and a logfile.
    """

    def test_daemon(self) -> None:
        config = self.twistd.writeConfig(self.document())
        pid, pidfile, logfile = self.twistd.runDaemon(config)
        self.assertNotEqual(pid, self.twistd.process.pid)
        self.assertFalse(processGone(pid))

        received, client = echoThrough(self.alphaPorts[0], b"daemon")
        self.assertEqual(received, b"daemon")

        def log() -> str:
            with open(logfile) as f:
                return f.read()

        self.waitForLine(log, f"{client} -> alpha:{self.alphaPorts[0]} -> ", "6 bytes in", "6 bytes out")

        os.kill(pid, signal.SIGTERM)
        waitUntil(lambda: processGone(pid), "the daemon to exit")
        self.assertFalse(os.path.exists(pidfile))
        self.assertIn("Server Shut Down.", log())
        self.assertNoTraceback(log())
        self.assertFalse(accepts(self.alphaPorts[0]))


class RefusalTests(TwoAppsMixin, TestCase):
    """
    A mistake of the user's stops C{twistd} at once: exit status 1, one line
    on standard error that says what is wrong, no traceback, no pidfile, and
    no process left behind.
    """

    def assertRefused(self, config: str, *fragments: str, daemon: bool = True) -> str:
        """
        Run C{twistd tcpproxy --config config} (in the background unless
        C{daemon} is false) and assert that it is refused as above.

        @return: the line on standard error.
        """
        pidfile, logfile = self.twistd.path("twistd.pid"), self.twistd.path("twistd.log")
        tail = ("tcpproxy", "--config", config, "--demo-backends")
        if daemon:
            status = self.twistd.run("--pidfile", pidfile, "--logfile", logfile, *tail)
        else:
            status = self.twistd.run("-n", "--pidfile", pidfile, *tail)
        self.assertEqual(status, 1, self.twistd.output())
        lines = self.twistd.stderr().splitlines()
        self.assertEqual(len(lines), 1, self.twistd.output())
        self.assertTrue(lines[0].startswith("tcpproxy: error: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        log = ""
        if os.path.exists(logfile):
            with open(logfile) as f:
                log = f.read()
        self.assertNoTraceback(log)
        self.assertFalse(os.path.exists(pidfile))
        self.assertEqual(pidsMentioning(self.twistd.directory), [])
        return lines[0]

    def test_unknownKey(self) -> None:
        document = self.document()
        document["Apps"][1]["Tragets"] = document["Apps"][1].pop("Targets")
        config = self.twistd.writeConfig(document)
        self.assertRefused(config, config, 'app "beta"', 'key "Tragets"', 'did you mean "Targets"?')

    def test_invalidJSON(self) -> None:
        config = self.twistd.writeConfig('{"Apps": [\n  {"Name": "alpha",, "Ports": [1]}]}')
        self.assertRefused(config, config, "invalid JSON at line 2 column 20")

    def test_missingFile(self) -> None:
        config = self.twistd.path("nowhere.json")
        self.assertRefused(config, config, "cannot read the configuration file", "No such file or directory")

    def test_portInUse(self) -> None:
        taken = blockPort(self)
        self.alphaPorts[1] = taken
        self.assertRefused(
            self.twistd.writeConfig(self.document()), '"alpha"', f"127.0.0.1:{taken}", "in use"
        )
        for port in (self.alphaPorts[0], self.betaPort):
            self.assertFalse(accepts(port))

    def test_portInUseForeground(self) -> None:
        taken = blockPort(self)
        self.betaPort = taken
        config = self.twistd.writeConfig(self.document())
        self.assertRefused(config, '"beta"', f"127.0.0.1:{taken}", "in use", daemon=False)

    def test_badDemoDown(self) -> None:
        """
        A bad C{--demo-down} is a usage error: twistd's own form, no traceback.
        """
        config = self.twistd.writeConfig(self.document())
        status = self.twistd.run(
            "-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends", "--demo-down", "nowhere"
        )
        self.assertNotEqual(status, 0)
        self.assertIn("--demo-down 'nowhere' has no port", self.twistd.stdout() + self.twistd.stderr())
        self.assertNoTraceback()


class DrainTests(TwoAppsMixin, TestCase):
    """
    Stopping with connections open: listeners close at once, open
    connections go on relaying for the drain period, then are cut.
    """

    def openConversation(self) -> socket.socket:
        """
        A client of app C{alpha}, in the middle of a conversation.
        """
        sock = connect(self.alphaPorts[0])
        self.addCleanup(sock.close)
        sock.sendall(b"before")
        self.assertEqual(receive(sock, 6), b"before")
        return sock

    def test_drainUntilClientCloses(self) -> None:
        """
        On SIGTERM new connections are refused while an open one still
        relays; the proxy exits as soon as that one ends, long before its
        30-second drain period would be over.
        """
        self.startForeground(DrainTimeout=30)
        sock = self.openConversation()
        client = describe(sock)

        self.twistd.process.send_signal(signal.SIGTERM)
        for port in (*self.alphaPorts, self.betaPort):
            waitUntil(lambda port=port: not accepts(port), f"port {port} to refuse connections")
        sock.sendall(b"during")
        self.assertEqual(receive(sock, 6), b"during")
        self.assertIsNone(self.twistd.process.poll(), "twistd exited before its last client closed")

        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(receiveAll(sock), b"")
        closed = time.monotonic()
        self.assertShutDownBy(signal.SIGTERM)
        self.assertLess(time.monotonic() - closed, TIMEOUT)
        out = self.twistd.stdout()
        self.assertTrue(linesWith(out, "draining for up to 30s"), f"no line about draining in:\n{out}")
        (line,) = linesWith(out, f"{client} -> alpha:{self.alphaPorts[0]} -> ")
        self.assertIn("12 bytes in, 12 bytes out", line)
        self.assertIn(": done after", line)

    def test_drainPeriodOver(self) -> None:
        """
        A client that never closes is cut when the drain period is over, and
        then the proxy exits.
        """
        self.startForeground(DrainTimeout=1)
        sock = self.openConversation()
        client = describe(sock)
        self.twistd.process.send_signal(signal.SIGTERM)
        self.assertShutDownBy(signal.SIGTERM)
        try:
            rest = sock.recv(1)
        except ConnectionResetError:
            rest = b""
        self.assertEqual(rest, b"")
        out = self.twistd.stdout()
        self.assertTrue(
            linesWith(out, "drain period over: aborting 1 connection(s)"),
            f"no line about aborting in:\n{out}",
        )
        (line,) = linesWith(out, f"{client} -> alpha:{self.alphaPorts[0]} -> ")
        self.assertIn(": aborted after", line)
