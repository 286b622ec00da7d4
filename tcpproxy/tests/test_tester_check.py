"""
Tests for L{tcpproxy.tester.check}: the trial-based conformance run.

The generated suite runs under trial's own runner, which owns the reactor,
so it is run as the user runs it -- C{python -m tcpproxy.tester check} in a
child process -- against a proxy served by this process.
"""

from __future__ import annotations

import os
import re
import sys

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.reporter import TestResult
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

import tcpproxy
from tcpproxy.access import END_DONE
from tcpproxy.tester.check import CHECKS, CheckSettings, buildSuite, describeMismatch, sizeText
from tcpproxy.tester.targets import TLS_SKIPPED, ProxyPort, targetFor
from tcpproxy.tester.testing import InProcessProxy, freePorts

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(tcpproxy.__file__)))


@implementer(IHalfCloseableProtocol)
class Greeter(Protocol):
    """
    Not an echo: answers every chunk with C{OK}, and closes after EOF.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"OK\n")

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


async def runTester(*args: str) -> tuple[str, str, int]:
    """
    Run C{python -m tcpproxy.tester ARGS} on this project's sources.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PROJECT, os.environ.get("PYTHONPATH", "")]))
    out, err, status = await getProcessOutputAndValue(
        sys.executable, ["-m", "tcpproxy.tester", *args], env=env, reactor=reactor
    )
    return out.decode(), err.decode(), status


class CheckRunTests(TestCase):
    """
    Three runs of C{check} against one proxy: alpha is healthy, dead's
    targets are all down, greeter's target answers but is not an echo, and
    nothing listens on gone's port.  The three child processes run at once,
    for the first test that needs them; the others read their output.
    """

    timeout = 60
    runs: dict | None = None

    async def setUp(self) -> None:
        if CheckRunTests.runs is None:
            CheckRunTests.runs = await self.runAll()
        self.__dict__.update(CheckRunTests.runs)

    async def runAll(self) -> dict:
        proxy = InProcessProxy(
            reactor, [("alpha", 2, 2), ("dead", 1, 1), ("greeter", 1, 1)], downApps=["dead", "greeter"]
        )
        greeterTarget = proxy.config.apps[2].targets[0]
        greeter = reactor.listenTCP(greeterTarget.port, Factory.forProtocol(Greeter), interface="127.0.0.1")
        ends: list[tuple[str, str]] = []

        def observe(event: dict) -> None:
            if "bytesIn" in event and event.get("log_namespace", "").startswith("tcpproxy"):
                ends.append((event["app"], event["end"]))

        globalLogPublisher.addObserver(observe)
        proxy.start()
        try:
            gone = freePorts(1)[0]
            config = self.mktemp()
            proxy.writeConfig(config, [{"Name": "gone", "Ports": [gone], "Targets": ["127.0.0.1:1"]}])
            check = ("check", "--config", config)
            healthy, anyReply, broken = await gatherResults(
                [
                    ensureDeferred(runTester(*check, "--app", "alpha")),
                    ensureDeferred(
                        runTester(*check, "--app", "greeter", "--any-reply", "--large-size", "100000")
                    ),
                    ensureDeferred(runTester(*check, "--app", "dead", "--app", "greeter", "--app", "gone")),
                ]
            )
        finally:
            await proxy.stop()
            await greeter.stopListening()
            globalLogPublisher.removeObserver(observe)
        return {
            "ends": ends,
            "gone": gone,
            "dead": proxy.ports(["dead"])[0].port,
            "greeter": proxy.ports(["greeter"])[0].port,
            "healthy": healthy,
            "anyReply": anyReply,
            "broken": broken,
        }

    def test_healthy(self) -> None:
        """
        On a healthy proxy every check passes and the exit status is 0; the
        output is trial's, with a line per check under its app and port.
        """
        out, err, status = self.healthy
        self.assertEqual(status, 0, out + err)
        self.assertIn("PASSED (successes=10)", out)
        self.assertIn("alpha\n  port ", out)
        self.assertEqual(len(re.findall(r"echoes 4 MiB exactly \.\.\. +\[OK\]", out)), 2)

    def test_closesCleanly(self) -> None:
        """
        A conformance run ends every connection it opens cleanly: the
        proxy logs each of alpha's as done, none as a reset (the small,
        large and concurrent echoes ended with a reset, and the proxy's
        log filled with "client reset" lines).  The same with the
        greeter, which is no echo.
        """
        for app in ("alpha", "greeter"):
            ends = [end for name, end in self.ends if name == app]
            self.assertTrue(ends, app)
            self.assertEqual(set(ends), {END_DONE}, f"{app}: {sorted(ends)}")
        alpha = [end for name, end in self.ends if name == "alpha"]
        # Per port: accepts, small, large, 10 at once, half-close.
        self.assertEqual(len(alpha), 2 * (1 + 1 + 1 + 10 + 1))

    def test_anyReply(self) -> None:
        """
        With C{--any-reply} a target that answers without echoing passes.
        """
        out, err, status = self.anyReply
        self.assertEqual(status, 0, out + err)
        self.assertIn("PASSED (successes=5)", out)
        self.assertIn("replies to 47 bytes ...", out)

    def test_broken(self) -> None:
        """
        Ports that do not answer, do not echo, or whose targets are down fail,
        each failure naming the app and port; the exit status is 1.
        """
        out, err, status = self.broken
        self.assertEqual(status, 1, out + err)
        self.assertIn("FAILED (failures=13, successes=2)", out)
        gone, dead, greeter = self.gone, self.dead, self.greeter
        where = f'app "gone" port {gone} (127.0.0.1:{gone})'
        self.assertIn(f"{where}: cannot connect to 127.0.0.1:{gone}: connection refused", out)
        self.assertIn(f"gone.port {gone}.echoes then closes after a half-close", out)
        self.assertIn(
            f'app "dead" port {dead} (127.0.0.1:{dead}): 47 bytes: only 0 of the 47 bytes sent came back '
            "before the proxy closed the connection",
            out,
        )
        self.assertIn(
            f'app "greeter" port {greeter} (127.0.0.1:{greeter}): 47 bytes: the reply differs from what '
            "was sent at byte 0: sent b'tcpproxy-tes', got b'OK\\n'",
            out,
        )
        self.assertNotIn("Traceback", out + err)


class SuiteTests(SynchronousTestCase):
    def test_generated(self) -> None:
        """
        The suite has the five checks of every port, in order, with ids that
        read app, port, check.
        """
        ports = [
            ProxyPort(app, port, targetFor("127.0.0.1", port)) for app, port in [("a", 1), ("a", 2), ("b", 3)]
        ]
        suite = buildSuite(ports, CheckSettings(concurrency=7))
        ids = [test.id() for test in suite]
        self.assertEqual(len(ids), 5 * 3)
        self.assertEqual(
            ids[:5],
            [
                "a.port 1.accepts a connection",
                "a.port 1.echoes 47 bytes exactly",
                "a.port 1.echoes 4 MiB exactly",
                "a.port 1.echoes on 7 connections at once",
                "a.port 1.echoes then closes after a half-close",
            ],
        )
        self.assertEqual(ids[-1], "b.port 3.echoes then closes after a half-close")
        self.assertEqual([test._testMethodName for test in suite][:5], list(CHECKS))

    def test_tlsPortSkipped(self) -> None:
        """
        A port where the app terminates TLS is reported skipped, with the
        reason, not failed: the tester speaks plain TCP, which a TLS port
        can only refuse.
        """
        ports = [ProxyPort("secure", 8443, targetFor("127.0.0.1", 8443), tls=True)]
        result = TestResult()
        buildSuite(ports, CheckSettings()).run(result)
        self.assertEqual((result.testsRun, len(result.skips), result.wasSuccessful()), (5, 5, True))
        self.assertEqual({reason for _, reason in result.skips}, {TLS_SKIPPED})

    def test_describeMismatch(self) -> None:
        self.assertIsNone(describeMismatch(b"abc", b"abc"))
        self.assertEqual(describeMismatch(b"abcdef", b"abc"), "only 3 of the 6 bytes sent came back")
        self.assertEqual(describeMismatch(b"abc", b"abcd"), "1 bytes more came back than were sent")
        self.assertEqual(
            describeMismatch(b"x" * 100000 + b"abc", b"x" * 100000 + b"aXc"),
            "the reply differs from what was sent at byte 100001: sent b'bc', got b'Xc'",
        )

    def test_sizeText(self) -> None:
        self.assertEqual(
            [sizeText(n) for n in (47, 2048, 4 * 1024 * 1024, 1500)],
            ["47 bytes", "2 KiB", "4 MiB", "1500 bytes"],
        )
