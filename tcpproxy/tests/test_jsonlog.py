"""
Tests for L{tcpproxy.jsonlog}.
"""

import json

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy import jsonlog


class ObserverTests(SynchronousTestCase):
    def test_fieldsAsJSONLines(self):
        """
        An access-log event comes out as one JSON line with its fields.
        """
        path = self.mktemp()
        self.patch(jsonlog.os, "environ", {jsonlog.ENVIRONMENT_VARIABLE: path})
        observer = jsonlog.observer()
        log = Logger(namespace="tcpproxy.access", observer=observer)
        log.info("{client} -> {app}", client="127.0.0.1:4000", app="web", bytesIn=12, end="done")
        log.info("second")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2)
        event = json.loads(lines[0])
        self.assertEqual(
            (event["client"], event["app"], event["bytesIn"], event["end"], event["log_namespace"]),
            ("127.0.0.1:4000", "web", 12, "done", "tcpproxy.access"),
        )
