"""
Tests for L{tcpproxy.jsonlog}.
"""

import json

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogPublisher
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


class _SlowStop(Service):
    """
    A child service whose stop ends when told, logging as it ends (as the
    proxy's drain logs the last connections' records).
    """

    def __init__(self, log):
        self.log = log
        self.stopping = Deferred()

    def stopService(self):
        Service.stopService(self)

        def stopped(_):
            self.log.info("last record", bytesIn=3)

        return self.stopping.addCallback(stopped)


class JSONLogServiceTests(SynchronousTestCase):
    def test_whileChildrenRun(self):
        """
        Events are written from the start until every child has stopped,
        drain included; then the file is closed and nothing more is
        written.
        """
        path = self.mktemp()
        publisher = LogPublisher()
        log = Logger(namespace="tcpproxy.access", observer=publisher)
        service = jsonlog.JSONLogService(path, publisher)
        child = _SlowStop(log)
        child.setServiceParent(service)
        log.info("before")
        service.startService()
        log.info("{client}", client="127.0.0.1:4000")
        stopped = service.stopService()
        log.info("draining")
        child.stopping.callback(None)
        self.successResultOf(stopped)
        log.info("after")
        with open(path, encoding="utf-8") as f:
            events = [json.loads(line) for line in f.read().splitlines()]
        self.assertEqual(
            [(e["log_format"], e.get("client"), e.get("bytesIn")) for e in events],
            [("{client}", "127.0.0.1:4000", None), ("draining", None, None), ("last record", None, 3)],
        )

    def test_appends(self):
        """
        The file is appended to.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("earlier\n")
        publisher = LogPublisher()
        service = jsonlog.JSONLogService(path, publisher)
        service.startService()
        Logger(observer=publisher).info("now")
        self.successResultOf(service.stopService())
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        self.assertEqual((lines[0], json.loads(lines[1])["log_format"]), ("earlier", "now"))
