"""
System tests of C{twistd tcpproxy --workers 2}: the real daemon, its worker
processes found by their command line, killed and signalled as an operator
would; checked through the ports, the admin endpoint and the one log.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.support import (
    TIMEOUT,
    Twistd,
    accepts,
    connect,
    echoThrough,
    freePorts,
    processGone,
    receive,
    waitUntil,
)
from tests.test_twistd import linesWith


def workerPids(directory: str, number: int) -> list[int]:
    """
    The live worker processes numbered C{number} whose configuration is
    in C{directory}.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                arguments = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if "tcpproxy.worker" not in arguments or processGone(int(entry)):
            continue
        if arguments[arguments.index("--number") + 1] == str(number) and any(
            a.startswith(directory) for a in arguments
        ):
            pids.append(int(entry))
    return pids


class WorkersMixin:
    def setUp(self) -> None:
        self.twistd = Twistd(self)
        self.port, self.target, self.admin, self.newPort = freePorts(4)

    def document(self, **top: object) -> dict:
        document = {
            "DrainTimeout": 10,
            "Admin": {"Listen": f"127.0.0.1:{self.admin}"},
            "Apps": [{"Name": "echo", "Ports": [self.port], "Targets": [f"127.0.0.1:{self.target}"]}],
        }
        document.update(top)
        return document

    def startWorkers(self, document: dict | None = None, *extra: str) -> tuple[int, str]:
        """
        Start the daemon with two workers; wait until both serve.

        @return: the main process's pid and the logfile.
        """
        config = self.twistd.writeConfig(document or self.document())
        self.pidfile, self.logfile = self.twistd.path("twistd.pid"), self.twistd.path("twistd.log")
        status = self.twistd.run(
            "--pidfile",
            self.pidfile,
            "--logfile",
            self.logfile,
            "tcpproxy",
            "--config",
            config,
            "--demo-backends",
            "--workers",
            "2",
            *extra,
        )
        self.assertEqual(status, 0, self.twistd.output())
        with open(self.pidfile) as f:
            pid = int(f.read())
        for number in (1, 2):
            waitUntil(
                lambda number=number: linesWith(self.log(), f"[worker {number}]", 'app "echo": listening'),
                f"worker {number} to listen",
            )
        waitUntil(lambda: accepts(self.port), "the port to answer")
        return pid, self.logfile

    def log(self) -> str:
        with open(self.logfile) as f:
            return f.read()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=TIMEOUT) as answer:
            return answer.read()

    def status(self) -> dict:
        return json.loads(self.get("/status"))

    def workerOf(self, client: str) -> int | None:
        """
        The worker whose access log line names C{client} (C{host:port}).
        """
        for line in linesWith(self.log(), f"] {client} -> echo:"):
            if "[worker 1]" in line:
                return 1
            if "[worker 2]" in line:
                return 2
        return None


class WorkersTests(WorkersMixin, TestCase):
    def test_sigkillUnderLoad(self) -> None:
        """
        Worker 1 killed (C{SIGKILL}) while clients stream through both: no
        client worker 2 served fails, every client that came after the
        kill is served (the port never stops answering), at most the few
        worker 1 held are cut; the main process logs the kill and starts
        worker 1 again.
        """
        pid, logfile = self.startWorkers()
        [victim] = workerPids(self.twistd.directory, 1)
        results: list[tuple[float, str | None, bool, str]] = []
        stop = threading.Event()
        lock = threading.Lock()

        def load() -> None:
            message = os.urandom(2000)
            while not stop.is_set():
                started = time.monotonic()
                client = None
                try:
                    received, client = echoThrough(self.port, message)
                    ok, why = received == message, f"{len(received)} bytes back"
                except OSError as e:
                    ok, why = False, repr(e)
                with lock:
                    results.append((started, client, ok, why))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            waitUntil(lambda: len(results) >= 100, "100 clients served")
            killedAt = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            waitUntil(
                lambda: linesWith(self.log(), "worker 1 (pid", "killed by signal SIGKILL"), "the kill logged"
            )
            waitUntil(lambda: len(linesWith(self.log(), "worker 1 started (pid")) == 2, "worker 1 restarted")
            count = len(results)
            waitUntil(lambda: len(results) >= count + 100, "100 more clients served")
        finally:
            stop.set()
            for thread in threads:
                thread.join(TIMEOUT)

        after = [r for r in results if r[0] > killedAt]
        self.assertTrue(after)
        self.assertEqual([r for r in after if not r[2]], [], "a client that came after the kill failed")
        failed = [r for r in results if not r[2]]
        self.assertLessEqual(len(failed), len(threads), failed)
        for _, client, _, why in failed:
            self.assertNotEqual(self.workerOf(client), 2, f"worker 2's client {client} failed: {why}")
        served = {self.workerOf(client) for _, client, ok, _ in results if ok}
        self.assertEqual(served - {None}, {1, 2}, "both workers served clients")
        self.assertEqual(len(linesWith(self.log(), "killed by signal SIGKILL; starting it again")), 1)
        self.assertTrue(workerPids(self.twistd.directory, 2))

    def test_sighupBadFile(self) -> None:
        """
        C{SIGHUP} with an invalid file: one line says why, from the main
        process; no worker is touched (same processes, no reload line of
        theirs); the port serves.  A valid file then is applied by both
        workers, and its new port, bound by the main process, serves.
        """
        pid, logfile = self.startWorkers()
        pids = (workerPids(self.twistd.directory, 1), workerPids(self.twistd.directory, 2))
        self.twistd.writeConfig('{"Apps": [{"Name": "echo", "Ports": [1], "Targets": ["nowhere"]}]}')
        os.kill(pid, signal.SIGHUP)
        waitUntil(lambda: linesWith(self.log(), "reload refused, nothing changed:"), "the refusal")
        [refusal] = linesWith(self.log(), "reload refused")
        self.assertIn("[tcpproxy.supervisor#error]", refusal)
        self.assertIn('"nowhere"', refusal)
        self.assertEqual(linesWith(self.log(), "[worker", "reload"), [])
        self.assertEqual((workerPids(self.twistd.directory, 1), workerPids(self.twistd.directory, 2)), pids)
        self.assertEqual(echoThrough(self.port, b"still")[0], b"still")

        document = self.document()
        document["Apps"][0]["Ports"].append(self.newPort)
        self.twistd.writeConfig(document)
        os.kill(pid, signal.SIGHUP)
        for number in (1, 2):
            waitUntil(
                lambda number=number: linesWith(
                    self.log(), f"[worker {number}] reload of", f"applied; ports added: {self.newPort}"
                ),
                f"worker {number} to apply the file",
            )
        self.assertEqual(echoThrough(self.newPort, b"new port")[0], b"new port")

    def test_sighupAddingScaleToZeroRefused(self) -> None:
        """
        C{SIGHUP} with a file that adds C{ScaleToZero}: refused in one line
        as at start-up (each worker would stop targets the others use); no
        worker hears of it, and the port serves as before.
        """
        pid, _ = self.startWorkers()
        document = self.document()
        document["Apps"][0]["ScaleToZero"] = {"IdleAfter": 1}
        self.twistd.writeConfig(document)
        os.kill(pid, signal.SIGHUP)
        waitUntil(lambda: linesWith(self.log(), "reload refused, nothing changed:"), "the refusal")
        [refusal] = linesWith(self.log(), "reload refused")
        self.assertIn(
            'app "echo": key "ScaleToZero": cannot be used with 2 worker processes: each would stop and'
            " start the targets on its own, blind to the other workers' connections; run one process"
            " (no --workers)",
            refusal,
        )
        self.assertEqual(linesWith(self.log(), "[worker", "reload"), [])
        self.assertEqual(echoThrough(self.port, b"still")[0], b"still")

    def test_sigtermDrainsBothWorkers(self) -> None:
        """
        C{SIGTERM} to the main process while both workers hold
        connections: the port stops answering at once, every held
        connection still relays until its client closes it, then every
        worker exits (status 0) and the main process too.
        """
        pid, logfile = self.startWorkers()
        held = []

        def active() -> list[int]:
            return [
                w["apps"][0]["connections"]["active"] if w["apps"] else 0 for w in self.status()["workers"]
            ]

        try:
            while min(active()) == 0:
                self.assertLess(len(held), 40, f"both workers never held a connection: {active()}")
                sock = connect(self.port)
                held.append(sock)
                sock.sendall(b"ping")
                self.assertEqual(receive(sock, 4), b"ping")
            os.kill(pid, signal.SIGTERM)
            waitUntil(lambda: not accepts(self.port), "the port to close")
            for number in (1, 2):
                waitUntil(
                    lambda number=number: linesWith(
                        self.log(), f"[worker {number}] stopped listening;", "draining"
                    ),
                    f"worker {number} to drain",
                )
            for sock in held:
                message = os.urandom(10_000)
                sock.sendall(message)
                self.assertEqual(receive(sock, len(message)), message)
            self.assertFalse(processGone(pid))
        finally:
            for sock in held:
                sock.close()
        waitUntil(lambda: processGone(pid), "the main process to exit")
        log = self.log()
        for number in (1, 2):
            self.assertEqual(len(linesWith(log, f"worker {number} (pid", "exited with status 0")), 1, log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)

    def test_sigusr1RotatesTheOneLog(self) -> None:
        """
        C{SIGUSR1} to the main process rotates the log as C{twistd} does,
        and the workers (same processes, untouched) go on logging into the
        new file through the main process.
        """
        pid, logfile = self.startWorkers()
        pids = (workerPids(self.twistd.directory, 1), workerPids(self.twistd.directory, 2))
        os.kill(pid, signal.SIGUSR1)
        waitUntil(lambda: os.path.exists(logfile + ".1"), "the log to be rotated")
        clients = [echoThrough(self.port, b"after")[1] for _ in range(10)]
        for client in clients:
            waitUntil(lambda client=client: self.workerOf(client), f"{client} in the new log")
        self.assertEqual((workerPids(self.twistd.directory, 1), workerPids(self.twistd.directory, 2)), pids)
        with open(logfile + ".1") as f:
            self.assertIn('[worker 1] app "echo": listening', f.read())

    def test_adminSumsWorkers(self) -> None:
        """
        One scrape of the main process's admin endpoint counts the clients
        of both workers; C{/status} and the page show each worker; the
        C{--json-log} records carry the worker's number.
        """
        jsonLog = self.twistd.path("events.json")
        pid, logfile = self.startWorkers(None, "--json-log", jsonLog)
        clients = {echoThrough(self.port, b"counted")[1] for _ in range(30)}

        def counted() -> float:
            for family in text_string_to_metric_families(self.get("/metrics").decode()):
                for sample in family.samples:
                    if sample.name == "tcpproxy_connections_total":
                        return sample.value
            return 0

        def records() -> dict[str, int]:
            events = []
            with open(jsonLog) as f:
                for line in f:
                    if line.endswith("\n"):  # not one being written
                        events.append(json.loads(line))
            return {e["client"]: e["worker"] for e in events if "end" in e and "client" in e}

        # Our 30, and the connections made to see whether the port answers.
        waitUntil(lambda: clients <= set(records()), "30 records in the JSON log")
        total = len(records())
        self.assertEqual(set(records().values()), {1, 2})
        waitUntil(lambda: counted() == total, f"{total} clients in /metrics")
        status = self.status()
        self.assertEqual(status["apps"][0]["connections"]["total"], total)
        workers = status["workers"]
        self.assertEqual([w["worker"] for w in workers], [1, 2])
        self.assertEqual(
            [w["apps"][0]["connections"]["total"] for w in workers],
            [list(records().values()).count(n) for n in (1, 2)],
        )
        self.assertEqual(
            [[w["pid"]] for w in workers],
            [workerPids(self.twistd.directory, 1), workerPids(self.twistd.directory, 2)],
        )
        page = self.get("/").decode()
        self.assertIn('<table class="workers">', page)
        self.assertEqual(page.count('<td class="state">running</td>'), 2)
