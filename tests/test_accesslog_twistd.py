"""
System tests of the access log as a user sets it up: the real C{twistd -n
tcpproxy} with C{"AccessLogFormat"} and C{--json-log}, a reload that
changes the format, and a C{--json-log} file that cannot be written.
"""

from __future__ import annotations

import json
import os
import signal

from twisted.trial.unittest import TestCase

from tests.support import Twistd, accepts, echoThrough, waitUntil
from tests.test_twistd import TwoAppsMixin, linesWith


def jsonLines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().splitlines()]


class FormatsTests(TwoAppsMixin, TestCase):
    def setUp(self) -> None:
        TwoAppsMixin.setUp(self)
        self.jsonLog = self.twistd.path("events.json")

    def document(self, alphaFormat: str = "json") -> dict:
        document = TwoAppsMixin.document(self)
        document["Apps"][0]["AccessLogFormat"] = alphaFormat
        document["Apps"][1]["AccessLogFormat"] = "{connectionId} {client} {app} {bytesIn}/{bytesOut} {end}"
        return document

    def record(self, client: str) -> str:
        """
        The message of the access-log line about C{client}, once written.
        """
        line = self.waitForLine(self.twistd.stdout, "[tcpproxy.access#info] ", client)
        return line.partition("[tcpproxy.access#info] ")[2]

    def test_formatsAndJSONLog(self) -> None:
        """
        An app in C{"json"} writes one JSON object as its line, an app with
        a template its own line; C{--json-log} has every event with all its
        fields; a reload to C{"text"} writes today's line for the new
        connections; the JSON file is complete when the proxy has stopped.
        """
        config = self.twistd.writeConfig(self.document())
        self.twistd.start(
            "-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends", "--json-log", "events.json"
        )
        self.twistd.waitUntilServing(*self.alphaPorts, self.betaPort)

        received, alphaClient = echoThrough(self.alphaPorts[0], b"hello alpha")
        self.assertEqual(received, b"hello alpha")
        record = json.loads(self.record(alphaClient))
        self.assertEqual(
            {k: record[k] for k in ("client", "app", "port", "target", "bytesIn", "bytesOut", "end", "sni")},
            {
                "client": alphaClient,
                "app": "alpha",
                "port": self.alphaPorts[0],
                "target": f"127.0.0.1:{self.alphaTarget}",
                "bytesIn": 11,
                "bytesOut": 11,
                "end": "done",
                "sni": None,
            },
        )

        received, betaClient = echoThrough(self.betaPort, b"hello beta")
        connectionId, client, app, counts, end = self.record(betaClient).split()
        self.assertEqual((client, app, counts, end), (betaClient, "beta", "10/10", "done"))

        # The JSON file: the same record, with all its fields.
        [logged] = waitUntil(
            lambda: [e for e in jsonLines(self.jsonLog) if e.get("client") == betaClient],
            "the beta record in the --json-log file",
        )
        self.assertEqual((logged["connectionId"], logged["bytesIn"]), (connectionId, 10))

        self.twistd.writeConfig(self.document(alphaFormat="text"))
        os.kill(self.twistd.process.pid, signal.SIGHUP)
        self.waitForLine(self.twistd.stdout, "reload of ", ": applied;")
        received, textClient = echoThrough(self.alphaPorts[1], b"hello text")
        self.assertRegex(
            self.record(textClient),
            rf"^\[[0-9A-Z]{{16}}-[0-9a-f]+\] {textClient} -> alpha:{self.alphaPorts[1]} -> "
            rf"127\.0\.0\.1:{self.alphaTarget}: done after [0-9.]+s, 10 bytes in, 10 bytes out$",
        )

        self.twistd.process.send_signal(signal.SIGTERM)
        self.assertShutDownBy(signal.SIGTERM)
        self.assertFalse(accepts(self.betaPort))
        logged = jsonLines(self.jsonLog)
        ours = (alphaClient, betaClient, textClient)
        # (waitUntilServing's probes are connections too.)
        records = [e for e in logged if e.get("log_namespace") == "tcpproxy.access"]
        self.assertEqual([e["client"] for e in records if e["client"] in ours], list(ours))
        # Every event of the run, not only the access log.
        self.assertTrue([e for e in logged if e.get("app") == "alpha" and "ports" in e], logged[:5])


class RefusalTests(TestCase):
    def test_jsonLogUnwritable(self) -> None:
        """
        A C{--json-log} file that cannot be written is one line on standard
        error and exit status 1.
        """
        twistd = Twistd(self)
        config = twistd.writeConfig({"Apps": [{"Name": "web", "Ports": [1], "Targets": ["127.0.0.1:2"]}]})
        status = twistd.run(
            "-n", "--pidfile=", "tcpproxy", "--config", config, "--json-log", "no/such/dir.json"
        )
        self.assertEqual(status, 1, twistd.output())
        self.assertEqual(
            twistd.stderr(),
            "tcpproxy: error: --json-log no/such/dir.json: cannot be written: No such file or directory\n",
        )
        self.assertEqual(linesWith(twistd.stdout(), "Traceback"), [])
