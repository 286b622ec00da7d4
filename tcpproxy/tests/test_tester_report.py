"""
Tests for L{tcpproxy.tester.report} and L{tcpproxy.tester.plot}: the table,
the JSON document and the PNG, from a real run.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tcpproxy.tester.load import LoadRun, LoadSettings
from tcpproxy.tester.pacing import ClosedLoop
from tcpproxy.tester.payloads import fromSize
from tcpproxy.tester.plot import plotRun
from tcpproxy.tester.report import formatSweep, formatTable, reportDocument, writeReport
from tcpproxy.tester.targets import ProxyPort, targetFor
from tcpproxy.tester.testing import InProcessProxy, freePorts

try:
    import matplotlib  # noqa: F401
except ImportError:
    NO_MATPLOTLIB: str | None = "matplotlib is not installed (pip install 'tcpproxy[plot]')"
else:
    NO_MATPLOTLIB = None

LATENCY_KEYS = {"min", "p50", "p90", "p99", "p999", "max", "mean"}
FIGURE_KEYS = {
    "messages",
    "answered",
    "errors",
    "dropped",
    "bytes",
    "seconds",
    "reqPerSec",
    "mbPerSec",
    "latencyUs",
}


class ReportTests(TestCase):
    """
    The runs reported on are made once, by the first test to need them: a
    sweep of 1 and 2 connections per port over two apps, one of whose
    ports is dead.
    """

    timeout = 30
    sweep: tuple[int, list] | None = None

    async def setUp(self) -> None:
        if ReportTests.sweep is None:
            proxy = InProcessProxy(reactor, [("alpha", 1, 1), ("beta", 1, 1)])
            proxy.start()
            try:
                dead = freePorts(1)[0]
                ports = proxy.ports() + [ProxyPort("beta", dead, targetFor("127.0.0.1", dead))]
                results = []
                for connections in (1, 2):
                    settings = LoadSettings(connections=connections, messages=20)
                    run = LoadRun(reactor, ports, settings, ClosedLoop(reactor), fromSize(64))
                    results.append(await run.run())
            finally:
                await proxy.stop()
            ReportTests.sweep = (dead, results)
        self.dead, self.results = ReportTests.sweep

    def assertFigures(self, figures: dict) -> None:
        self.assertEqual(set(figures), FIGURE_KEYS)
        self.assertEqual(set(figures["latencyUs"]), LATENCY_KEYS)
        for key in ("messages", "answered", "errors", "dropped", "bytes"):
            self.assertIsInstance(figures[key], int)

    def test_table(self) -> None:
        """
        The table has a row per app and one in total, and lists the errors
        by app and port.
        """
        table = formatTable(self.results[0])
        lines = table.splitlines()
        self.assertEqual(
            lines[0].split(),
            ["app", "conns", "messages", "errors", "dropped", "req/s", "MB/s"]
            + ["min", "p50", "p90", "p99", "p999", "max"],
        )
        self.assertEqual(lines[1].split()[:5], ["alpha", "1", "20", "0", "0"])
        self.assertEqual(lines[2].split()[:5], ["beta", "1", "20", "1", "0"])
        self.assertEqual(lines[3].split()[:5], ["total", "2", "40", "1", "0"])
        self.assertIn("latency in microseconds", table)
        self.assertIn(f'  app "beta" port {self.dead}: 1 x cannot connect: connection refused', lines)

    def test_sweepTable(self) -> None:
        lines = formatSweep(self.results).splitlines()
        self.assertEqual(lines[0].split()[:3], ["conns/port", "conns", "messages"])
        self.assertEqual([line.split()[:3] for line in lines[1:3]], [["1", "2", "40"], ["2", "4", "80"]])

    def test_document(self) -> None:
        """
        The JSON report holds the table's figures, per app and in total, the
        errors and the per-second series, for each run.
        """
        path = self.mktemp()
        writeReport(path, reportDocument(self.results, "config.json", {"messages": 20}))
        with open(path) as f:
            document = json.load(f)
        self.assertEqual(set(document), {"tool", "schema", "config", "settings", "runs"})
        self.assertEqual((document["schema"], document["config"]), (1, "config.json"))
        self.assertEqual(len(document["runs"]), 2)
        run = document["runs"][0]
        self.assertEqual(
            set(run),
            {"connectionsPerPort", "seconds", "pacing", "payload", "ports", "connections"}
            | {"total", "apps", "errors", "series"},
        )
        self.assertFigures(run["total"])
        self.assertEqual(set(run["apps"]), {"alpha", "beta"})
        for figures in run["apps"].values():
            self.assertFigures(figures)
        self.assertEqual(run["total"]["answered"], self.results[0].total.answered)
        self.assertEqual(run["total"]["latencyUs"]["p99"], self.results[0].total.latency["p99"])
        self.assertEqual(
            run["errors"],
            [{"app": "beta", "port": self.dead, "kind": "cannot connect: connection refused", "count": 1}],
        )
        self.assertGreaterEqual(len(run["series"]), 1)
        point = run["series"][0]
        self.assertTrue({"t", "connections", "targetRate", "apps"} | FIGURE_KEYS <= set(point))
        self.assertEqual(sum(p["answered"] for p in run["series"]), run["total"]["answered"])

    def assertPNG(self, path: str) -> None:
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_plot(self) -> None:
        """
        A run is drawn against time, as PNG.  (A sweep's plot is drawn by
        the command-line tests.)
        """
        path = self.mktemp() + ".png"
        plotRun(self.results[0], path)
        self.assertPNG(path)

    test_plot.skip = NO_MATPLOTLIB
