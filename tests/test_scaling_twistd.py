"""
System test of scale to zero: the real C{twistd tcpproxy} with a
C{"ScaleToZero"} app whose target's C{Start} launches a real echo server
(a Python script, L{tcpproxy.tests.echoservice}, in the background as
C{systemctl start} would) and whose C{Stop} kills it; checked as a user
would, through the backend's process, a client's bytes, and the log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.support import (
    TIMEOUT,
    Twistd,
    accepts,
    childEnvironment,
    echoThrough,
    freePorts,
    processGone,
    waitUntil,
)
from tests.test_twistd import linesWith

SERVICE = (sys.executable, "-m", "tcpproxy.tests.echoservice")


class ScaleToZeroTwistdTests(TestCase):
    def setUp(self) -> None:
        self.twistd = Twistd(self)
        self.port, self.target = freePorts(2)
        self.pidfile = self.twistd.path("echo.pid")
        self.logfile = self.twistd.path("twistd.log")
        # Whatever the test's outcome, no echo server outlives it.
        self.addCleanup(self.service, "stop", self.pidfile)

    def service(self, *arguments: str) -> None:
        subprocess.run(
            [*SERVICE, *arguments], env=childEnvironment(), capture_output=True, check=True, timeout=TIMEOUT
        )

    def servicePid(self) -> int:
        with open(self.pidfile) as f:
            return int(f.read())

    def log(self) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def test_stoppedWhenIdleThenWoken(self) -> None:
        """
        The backend, running at start-up, is stopped after C{IdleAfter}
        with no client (its process is gone); the first client after that
        wakes it and gets its bytes echoed byte-exact; the log says the
        target was woken, and in how long.
        """
        self.service("start", str(self.target), self.pidfile)
        firstPid = self.servicePid()
        waitUntil(lambda: accepts(self.target), "the echo server to listen")
        target = f"127.0.0.1:{self.target}"
        config = self.twistd.writeConfig(
            {
                "BindAddress": "127.0.0.1",
                "Apps": [
                    {
                        "Name": "web",
                        "Ports": [self.port],
                        "ScaleToZero": {"IdleAfter": 1, "StartTimeout": 10},
                        "Targets": [
                            {
                                "Address": target,
                                # Listening 0.2 s after its launch, as a slow service would.
                                "Start": [*SERVICE, "start", "{port}", self.pidfile, "0.2"],
                                "Stop": [*SERVICE, "stop", self.pidfile],
                            }
                        ],
                    }
                ],
            }
        )
        self.twistd.start("-n", "--pidfile=", "--logfile", self.logfile, "tcpproxy", "--config", config)
        self.twistd.waitUntilServing(self.port)

        stopDone = f"app web: target {target}: Stop done"
        waitUntil(
            lambda: self.twistd.assertRunning() and linesWith(self.log(), stopDone),
            "the idle target's Stop to be done",
        )
        [stopped] = linesWith(self.log(), f"app web: target {target} is stopped: no connection for 1s:")
        self.assertIn(f"echoservice stop {self.pidfile}", stopped)
        waitUntil(lambda: processGone(firstPid), f"the echo server's process {firstPid} to be gone")
        self.assertFalse(accepts(self.target))

        payload = os.urandom(200_000)
        echoed, client = echoThrough(self.port, payload)
        self.assertEqual(len(echoed), len(payload))
        self.assertTrue(echoed == payload, "the echo differs from what was sent")

        log = self.log()
        [starting] = linesWith(log, f"app web: target {target} is stopped: starting it for a client:")
        self.assertIn(f"echoservice start {self.target} {self.pidfile} 0.2", starting)
        [woken] = linesWith(log, f"app web: target {target} is up: woken in ")
        seconds = float(re.search(r"woken in (\d+\.\d{3})s", woken).group(1))
        self.assertGreaterEqual(seconds, 0.2)
        self.assertLess(seconds, 10)
        # The access-log line is written once the proxy has seen the client
        # close, which may come after the client has its echo.
        done = f"{client} -> web:{self.port} -> {target}: done after"
        waitUntil(lambda: linesWith(self.log(), done), f"the access-log line {done!r}")
        self.assertNotEqual(self.servicePid(), firstPid)
        self.assertFalse(processGone(self.servicePid()))
