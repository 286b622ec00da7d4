"""
System test of the admin endpoint: the real C{twistd tcpproxy} with an
C{Admin} key, its status page loaded in a real headless browser (Debian's
C{chromium}), checked for what a person sees, and photographed.

The screenshot goes to a temporary folder, so that a run leaves the
checkout as it was; C{TCPPROXY_SCREENSHOT=$PWD/docs/status-page.png} (an
absolute path: trial runs in C{_trial_temp}) writes the one the README
shows instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import Twistd, connect, echoThrough, freePorts, receive

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

BROWSER_TIMEOUT = 60.0
"""
Seconds a browser run may take (a cold start on a busy machine takes a few).
"""

COLOURS = {"up": (0xC8, 0xF0, 0xC8), "down": (0xF6, 0xC4, 0xC4), "draining": (0xFB, 0xE3, 0xA6)}
"""
The background of a target's state cell, by state (L{tcpproxy.statuspage}).
"""


def findBrowser() -> str:
    """
    @raise SkipTest: saying so, where no browser is installed.
    """
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SkipTest(
        "no headless browser installed (looked for " + ", ".join(BROWSERS) + "; .ci/run installs chromium)"
    )


class _Tables(HTMLParser):
    """
    The rows of each target table of the status page: app name to a list
    of rows, each C{(row class, [cell texts])}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[str, list[str]]]] = {}
        self._app = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "data-app" in attrs:
            self._app = attrs["data-app"]
            self.tables[self._app] = []
        elif tag == "tr" and self._app is not None and attrs.get("class"):
            self.tables[self._app].append((attrs["class"], []))
        elif tag == "td" and self._app is not None and self.tables[self._app]:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._app][-1][1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._app = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


class StatusPageBrowserTests(TestCase):
    def setUp(self) -> None:
        self.browser = findBrowser()
        self.twistd = Twistd(self)
        (
            self.webA,
            self.webB,
            self.dbPort,
            self.adminPort,
            self.t1,
            self.t2,
            self.t3,
            self.d1,
            self.d2,
        ) = freePorts(9)

    def browse(self, *arguments: str) -> str:
        """
        Run the headless browser on the status page; return what it printed.
        """
        profile = os.path.join(self.twistd.directory, "browser-profile")
        run = subprocess.run(
            [
                self.browser,
                "--headless",
                "--no-sandbox",  # as root, in containers
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                *arguments,
                f"http://127.0.0.1:{self.adminPort}/",
            ],
            capture_output=True,
            timeout=BROWSER_TIMEOUT,
            text=True,
        )
        self.assertEqual(run.returncode, 0, run.stderr)
        return run.stdout

    def post(self, path: str) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.adminPort}{path}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def test_statusPage(self) -> None:
        """
        The page shows one table per app, each target with its state in
        words and in colour (green up, red down, amber draining), and the
        counts of what the clients did.
        """
        web = [f"127.0.0.1:{self.t1}", f"127.0.0.1:{self.t2}", f"127.0.0.1:{self.t3}"]
        db = [f"127.0.0.1:{self.d1}", f"127.0.0.1:{self.d2}"]
        document = {
            "BindAddress": "127.0.0.1",
            "Admin": {"Listen": f"127.0.0.1:{self.adminPort}"},
            "Apps": [
                {"Name": "web", "Ports": [self.webA, self.webB], "Targets": web, "MaxConnections": 1000},
                {"Name": "db", "Ports": [self.dbPort], "Targets": db, "MaxConnectionsPerClient": 20},
            ],
        }
        config = self.twistd.writeConfig(document)
        self.twistd.start(
            "-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends", "--demo-down", web[2]
        )
        self.twistd.waitUntilServing(self.webA, self.webB, self.dbPort, self.adminPort)
        for index in range(6):
            received, _ = echoThrough(self.webA if index % 2 else self.webB, b"hello %d" % index)
            self.assertEqual(received, b"hello %d" % index)
        for index in range(3):
            echoThrough(self.dbPort, b"select %d" % index)
        self.assertEqual(self.post(f"/apps/web/targets/{web[1]}/drain")["state"], "draining")

        with connect(self.dbPort) as held:
            held.sendall(b"still here")
            self.assertEqual(receive(held, 10), b"still here")
            dom = self.browse("--dump-dom")
            screenshot = os.environ.get("TCPPROXY_SCREENSHOT") or os.path.join(
                self.twistd.directory, "status-page.png"
            )
            self.browse(
                "--window-size=1100,560", "--hide-scrollbars", f"--screenshot={os.path.abspath(screenshot)}"
            )

        tables = _Tables()
        tables.feed(dom)
        self.assertEqual(list(tables.tables), ["web", "db"])
        # state, open, connections, failed connects, per target, as shown
        shown = {
            app: {cells[0]: (cls, cells[1:5]) for cls, cells in rows} for app, rows in tables.tables.items()
        }
        self.assertEqual(shown["web"][web[0]][0], "up")
        self.assertEqual(shown["web"][web[1]][0], "draining")
        self.assertEqual(shown["web"][web[2]][:1], ("down",))
        self.assertEqual(shown["web"][web[2]][1][:3], ["down", "0", "0"])
        # Its first connect failed (a second one if its back-off ran out meanwhile).
        self.assertGreaterEqual(int(shown["web"][web[2]][1][3]), 1)
        # The 6 clients, and the connect that found each port serving.
        served = [int(shown["web"][t][1][2]) for t in web]
        self.assertEqual(sum(served), 8)
        self.assertEqual(shown["db"][db[0]][1][0], "up")
        self.assertEqual(sum(int(shown["db"][t][1][1]) for t in db), 1)  # open now
        self.assertEqual(sum(int(shown["db"][t][1][2]) for t in db), 3 + 1 + 1)
        self.assertIn('id="readiness">ready<', dom)
        self.assertIn("8 in all", dom)

        # What the eye sees: each state's colour is on the page.
        from PIL import Image

        with Image.open(screenshot) as image:
            colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
        for state, colour in COLOURS.items():
            self.assertIn(colour, colours, f"no {state} colour in {screenshot}")
