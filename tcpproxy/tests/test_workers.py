"""
The pieces of C{--workers N} that need no process: the C{"Workers"} key,
each worker's share of the limits, the sockets a worker takes from its
main process, its log events' text, the sums of the workers' metrics and
status, and how a worker's end is told.  The processes themselves are
tested through the real C{twistd} (C{tests.test_workers_twistd}).
"""

from __future__ import annotations

import io
import json
import os
import socket

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tcpproxy.config import MAX_WORKERS, ConfigError, parseConfig, parseWorkers
from tcpproxy.eventpipe import PipeObserver, decodeEvent
from tcpproxy.listening import ListenError
from tcpproxy.supervisor import ASK_TIMEOUT, STABLE, endOf
from tcpproxy.tests.loopback import captureEvents
from tcpproxy.worker import WorkerService, share, workerConfig
from tcpproxy.workerstats import mergeStatus, sumMetrics


def document(**top: object) -> dict:
    top.setdefault("Apps", [{"Name": "web", "Ports": [8000], "Targets": ["127.0.0.1:9000"]}])
    return top


class WorkersKeyTests(TestCase):
    def test_default(self) -> None:
        self.assertEqual(parseConfig(document()).workers, 1)

    def test_number(self) -> None:
        self.assertEqual(parseConfig(document(Workers=4)).workers, 4)

    def test_auto(self) -> None:
        """
        C{"auto"}: one per CPU this process may run on.
        """
        self.assertEqual(parseConfig(document(Workers="auto")).workers, len(os.sched_getaffinity(0)))

    def test_refused(self) -> None:
        for value in (0, -1, 1.5, "4", True, None, MAX_WORKERS + 1, "many"):
            with self.assertRaises(ConfigError) as caught:
                parseConfig(document(Workers=value), "proxy.json")
            self.assertIn("proxy.json", str(caught.exception))
            self.assertIn("Workers", str(caught.exception))
            self.assertIn(json.dumps(value), str(caught.exception))

    def test_option(self) -> None:
        """
        C{--workers} takes the same values, written on a command line.
        """
        self.assertEqual(parseWorkers("3"), 3)
        self.assertEqual(parseWorkers("auto"), len(os.sched_getaffinity(0)))
        with self.assertRaises(ConfigError) as caught:
            parseWorkers("0")
        self.assertTrue(str(caught.exception).startswith("--workers: "))


class ShareTests(TestCase):
    def test_addsUp(self) -> None:
        """
        The shares add up to the limit exactly, the remainder going to the
        first workers.
        """
        self.assertEqual([share(10, i, 3) for i in range(3)], [4, 3, 3])
        self.assertEqual([share(9, i, 3) for i in range(3)], [3, 3, 3])
        for total in range(2, 50):
            for workers in range(1, total + 1):
                self.assertEqual(sum(share(total, i, workers) for i in range(workers)), total)

    def test_atLeastOne(self) -> None:
        self.assertEqual([share(1, i, 3) for i in range(3)], [1, 1, 1])

    def test_none(self) -> None:
        self.assertIsNone(share(None, 0, 2))

    def test_workerConfig(self) -> None:
        """
        A worker runs every app and port, its share of C{MaxConnections}
        (proxy-wide and per app), and no admin endpoint.
        """
        config = parseConfig(
            document(
                MaxConnections=101,
                Admin={"Listen": "127.0.0.1:9901"},
                Apps=[
                    {"Name": "a", "Ports": [1, 2], "Targets": ["127.0.0.1:9"], "MaxConnections": 11},
                    {
                        "Name": "b",
                        "Ports": [3],
                        "Targets": ["127.0.0.1:9", {"Address": "127.0.0.1:8", "MaxConnections": 5}],
                    },
                ],
            )
        )
        first, second = workerConfig(config, 0, 2), workerConfig(config, 1, 2)
        self.assertEqual(
            [[t.maxConnections for t in worker.apps[1].targets] for worker in (first, second)],
            [[None, 3], [None, 2]],
        )
        self.assertEqual((first.maxConnections, second.maxConnections), (51, 50))
        self.assertEqual((first.apps[0].maxConnections, second.apps[0].maxConnections), (6, 5))
        self.assertIsNone(first.apps[1].maxConnections)
        self.assertEqual(
            [(app.name, port) for app, port in first.listeners()],
            [(app.name, port) for app, port in config.listeners()],
        )
        self.assertIsNone(first.admin)


class WorkerServiceTests(TestCase):
    def service(self) -> WorkerService:
        config = parseConfig(
            document(Apps=[{"Name": "web", "Ports": [8000, 8001], "Targets": ["127.0.0.1:9"]}]), "p.json"
        )
        return WorkerService(config, MemoryReactorClock(), "p.json", 1, 2)

    def test_takesInherited(self) -> None:
        """
        A worker listens on the sockets its main process bound, and binds
        none itself.
        """
        service = self.service()
        sockets = {}
        for port in (8000, 8001):
            sock = sockets[port] = socket.socket()
            self.addCleanup(sock.close)
            service.inherited[("0.0.0.0", port)] = sock
        got = service.bindListeners([("a", "0.0.0.0", 8001), ("a", "0.0.0.0", 8000)])
        self.assertEqual(got, [sockets[8001], sockets[8000]])
        self.assertEqual(service.inherited, {})

    def test_missing(self) -> None:
        """
        A port its main process could not bind is refused, naming it; the
        sockets that were there stay for another try.
        """
        service = self.service()
        sock = socket.socket()
        self.addCleanup(sock.close)
        service.inherited[("0.0.0.0", 8000)] = sock
        with self.assertRaises(ListenError) as caught:
            service.bindListeners([('app "web"', "0.0.0.0", 8000), ('app "web"', "0.0.0.0", 8001)])
        self.assertEqual(
            str(caught.exception),
            'app "web": cannot listen on 0.0.0.0:8001: the main process could not bind it',
        )
        self.assertEqual(list(service.inherited), [("0.0.0.0", 8000)])


class EventPipeTests(TestCase):
    """
    A worker's events as its main process logs them (L{tcpproxy.eventpipe}).
    """

    def roundTrip(self, emit) -> dict:
        out = io.BytesIO()
        clock = Clock()
        log = Logger(observer=PipeObserver(out, clock), namespace="tcpproxy.access")
        emit(log)
        clock.advance(0)
        [line] = out.getvalue().splitlines()
        return decodeEvent(line)

    def test_sameText(self) -> None:
        """
        The text is the worker's: a format spec applies (C{0.123s}, not
        the float's every digit), braces stay braces.
        """
        event = self.roundTrip(
            lambda log: log.info("done after {duration:.3f}s {{braces}}", duration=0.123456789)
        )
        self.assertEqual(formatEvent(event), "done after 0.123s {braces}")

    def test_fields(self) -> None:
        """
        The fields go along (for C{--json-log}), with the level, time and
        namespace; a value JSON cannot hold arrives as its C{repr}.
        """
        event = self.roundTrip(
            lambda log: log.warn("x", client="127.0.0.1:5", bytesIn=3, failures=["a"], odd=object)
        )
        self.assertEqual((event["client"], event["bytesIn"], event["failures"]), ("127.0.0.1:5", 3, ["a"]))
        self.assertEqual(event["odd"], repr(object))
        self.assertIs(event["log_level"], LogLevel.warn)
        self.assertEqual(event["log_namespace"], "tcpproxy.access")
        self.assertIsInstance(event["log_time"], float)

    def test_failure(self) -> None:
        """
        A failure arrives as its traceback, after the text.
        """

        def emit(log: Logger) -> None:
            try:
                raise ZeroDivisionError("divided by zero")
            except ZeroDivisionError:
                log.failure("serving {client} failed", client="c")

        text = formatEvent(self.roundTrip(emit))
        self.assertTrue(text.startswith("serving c failed\nTraceback"), text)
        self.assertIn("ZeroDivisionError", text)

    def test_batched(self) -> None:
        """
        The events of one turn of the reactor are written together at its
        end; L{PipeObserver.flush} writes what is left at once.
        """
        out = io.BytesIO()
        clock = Clock()
        observer = PipeObserver(out, clock)
        log = Logger(observer=observer)
        log.info("one")
        log.info("two")
        self.assertEqual(out.getvalue(), b"")
        clock.advance(0)
        self.assertEqual(
            [formatEvent(decodeEvent(line)) for line in out.getvalue().splitlines()], ["one", "two"]
        )
        log.info("three")
        observer.flush()
        self.assertEqual(formatEvent(decodeEvent(out.getvalue().splitlines()[-1])), "three")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_notAnEvent(self) -> None:
        for line in (b"Traceback (most recent call last):", b"[1]", b"{}", b"\xff"):
            self.assertRaises(ValueError, decodeEvent, line)


def metricsText(connections: float, up: float, start: float) -> bytes:
    return (
        "# HELP tcpproxy_connections_total Clients accepted.\n"
        "# TYPE tcpproxy_connections_total counter\n"
        f'tcpproxy_connections_total{{app="web"}} {connections}\n'
        "# HELP tcpproxy_target_up 1 if the target is in rotation.\n"
        "# TYPE tcpproxy_target_up gauge\n"
        f'tcpproxy_target_up{{app="web",target="127.0.0.1:9"}} {up}\n'
        "# HELP process_start_time_seconds Start time.\n"
        "# TYPE process_start_time_seconds gauge\n"
        f"process_start_time_seconds {start}\n"
        "# HELP tcpproxy_reloads_total Configuration reloads, by result.\n"
        "# TYPE tcpproxy_reloads_total counter\n"
        'tcpproxy_reloads_total{result="applied"} 1.0\n'
    ).encode()


class SumMetricsTests(TestCase):
    def test_sums(self) -> None:
        """
        Counters are summed over the workers; a target is up only if every
        worker has it up; the earliest start time is kept; reloads are the
        main process's own (left out).
        """
        families = sumMetrics([metricsText(3, 1, 100), metricsText(4, 0, 90)])
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
        self.assertEqual(
            samples,
            {
                ("tcpproxy_connections_total", (("app", "web"),)): 7,
                ("tcpproxy_target_up", (("app", "web"), ("target", "127.0.0.1:9"))): 0,
                ("process_start_time_seconds", ()): 90,
            },
        )

    def test_exposition(self) -> None:
        """
        What comes out is Prometheus' text again.
        """
        from prometheus_client import CollectorRegistry, generate_latest

        from tcpproxy.supervisor import _Fixed

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(sumMetrics([metricsText(3, 1, 100), metricsText(4, 1, 90)])))
        text = generate_latest(registry).decode()
        [family] = [f for f in text_string_to_metric_families(text) if f.name == "tcpproxy_connections"]
        self.assertEqual([s.value for s in family.samples], [7.0])


def status(active: int, state: str, lastError: dict | None) -> dict:
    return {
        "apps": [
            {
                "name": "web",
                "limits": {"maxConnections": 5},
                "connections": {"active": active, "total": active * 10, "refused": {"limit": 1}},
                "bytesReceived": 100,
                "bytesSent": 200,
                "targets": [
                    {
                        "target": "127.0.0.1:9",
                        "state": state,
                        "active": active,
                        "connections": active * 10,
                        "errors": {"refused": 1},
                        "lastError": lastError,
                        "pooled": active * 2,
                    }
                ],
            }
        ]
    }


class MergeStatusTests(TestCase):
    def test_merge(self) -> None:
        """
        Counts are summed; a target's state is the worst a worker gives it
        (health is per worker); its last error the latest.
        """
        [app] = mergeStatus(
            [status(1, "up", {"at": 5, "reason": "old"}), status(2, "down", {"at": 7, "reason": "new"})]
        )
        self.assertEqual(app["connections"], {"active": 3, "total": 30, "refused": {"limit": 2}})
        self.assertEqual((app["bytesReceived"], app["bytesSent"]), (200, 400))
        self.assertEqual(app["limits"]["maxConnections"], 10)
        [target] = app["targets"]
        self.assertEqual((target["active"], target["connections"], target["pooled"]), (3, 30, 6))
        self.assertEqual(target["errors"], {"refused": 2})
        self.assertEqual(target["state"], "down")
        self.assertEqual(target["lastError"], {"at": 7, "reason": "new"})

    def test_none(self) -> None:
        self.assertEqual(mergeStatus([]), [])


class EndOfTests(TestCase):
    def test_status(self) -> None:
        self.assertEqual(endOf(Failure(ProcessDone(0))), "exited with status 0")
        self.assertEqual(endOf(Failure(ProcessTerminated(exitCode=3))), "exited with status 3")

    def test_signal(self) -> None:
        self.assertEqual(endOf(Failure(ProcessTerminated(signal=9))), "killed by signal SIGKILL")


class _ProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.written: list[tuple[int, bytes]] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append((fd, data))

    def closeChildFD(self, fd: int) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _ProcessReactor(MemoryReactorClock):
    """
    A memory reactor that records the processes spawned.
    """

    def __init__(self) -> None:
        MemoryReactorClock.__init__(self)
        self.spawned: list[tuple[object, list[str], dict]] = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **kw):
        transport = _ProcessTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, childFDs))
        return transport


class SupervisionTests(TestCase):
    """
    L{WorkerPool} starts its workers, starts one that ended again after a
    back-off, and stops them all (on a memory reactor: no process runs).
    """

    def setUp(self) -> None:
        from tcpproxy.supervisor import WorkerPool
        from tcpproxy.tests.loopback import freePorts

        [port] = freePorts(1)
        raw = json.dumps(
            document(
                BindAddress="127.0.0.1",
                DrainTimeout=3,
                Apps=[{"Name": "web", "Ports": [port], "Targets": ["127.0.0.1:9"]}],
            )
        ).encode()
        self.reactor = _ProcessReactor()
        self.events = captureEvents(self, "tcpproxy.supervisor")
        self.pool = WorkerPool(parseConfig(json.loads(raw), "p.json"), raw, self.reactor, 2, "p.json")
        self.pool.startService()
        self.addCleanup(self.pool.unbind)

    def end(self, number: int, reason: Exception) -> None:
        process = self.pool.slots[number - 1].process
        process.processEnded(Failure(reason))

    def test_started(self) -> None:
        """
        Each worker is told its number, and inherits the port and the
        configuration's bytes.
        """
        self.assertEqual(len(self.reactor.spawned), 2)
        for number, (protocol, args, childFDs) in enumerate(self.reactor.spawned, 1):
            self.assertEqual(args[args.index("--number") + 1], str(number))
            [(fd, address, port)] = json.loads(args[args.index("--listen") + 1])
            self.assertEqual(childFDs[fd], self.pool.sockets[(address, port)].fileno())
            self.assertEqual(protocol.transport.written[0][1], self.pool.configBytes)

    def test_restartBackOff(self) -> None:
        """
        A worker that ended is logged with how, and started again: at once
        if it had run for a while, later each time it ends again soon
        after its start.
        """
        self.reactor.advance(STABLE)
        self.end(1, ProcessTerminated(signal=9))
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertIn("killed by signal SIGKILL", formatEvent(self.events[-2]))
        delays = []
        for _ in range(4):
            self.end(1, ProcessTerminated(exitCode=1))
            [call] = self.reactor.getDelayedCalls()
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        self.assertEqual(len(self.reactor.spawned), 7)
        self.assertEqual(delays, sorted(delays))
        self.assertGreater(delays[-1], 4 * delays[0])
        self.assertEqual([slot.restarts for slot in self.pool.slots], [5, 0])

    def test_stop(self) -> None:
        """
        Stopping closes the ports, sends every worker C{SIGTERM}, starts
        none again, and is done when the last one has ended.
        """
        stopped = self.pool.stopService()
        self.assertEqual(self.pool.sockets, {})
        for protocol, _, _ in self.reactor.spawned:
            self.assertEqual(protocol.transport.signals, ["TERM"])
        self.end(1, ProcessDone(0))
        self.assertNoResult(stopped)
        self.end(2, ProcessDone(0))
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_reloadAddingScaleToZeroRefused(self) -> None:
        """
        A reload that adds C{ScaleToZero} while workers run is refused as
        it is at start-up, in one line: the configuration stays, and no
        worker hears of the file.
        """
        path = os.path.abspath(self.mktemp())
        old = self.pool.config
        app = {"Name": "web", "Ports": list(old.apps[0].ports), "Targets": ["127.0.0.1:9"], "ScaleToZero": {}}
        with open(path, "w") as f:
            json.dump(document(BindAddress="127.0.0.1", DrainTimeout=3, Apps=[app]), f)
        self.pool.configPath = path
        sent = [len(protocol.transport.written) for protocol, _, _ in self.reactor.spawned]
        self.assertEqual(self.successResultOf(self.pool.reload()), "refused")
        self.assertIs(self.pool.config, old)
        self.assertEqual([len(protocol.transport.written) for protocol, _, _ in self.reactor.spawned], sent)
        [line] = [formatEvent(e) for e in self.events if "reload" in formatEvent(e)]
        self.assertEqual(
            line,
            f'reload refused, nothing changed: {path}: app "web": key "ScaleToZero": cannot be used with 2'
            " worker processes: each would stop and start the targets on its own, blind to the other"
            " workers' connections; run one process (no --workers)",
        )

    def test_askTimeout(self) -> None:
        """
        A worker that does not answer the admin endpoint's question in
        time is left out of the answer, which comes anyway.
        """
        for protocol, _, _ in self.reactor.spawned:
            protocol.control.makeConnection(StringTransport())
        gathered = self.pool.gather("metrics")
        self.assertNoResult(gathered)
        self.reactor.advance(ASK_TIMEOUT)
        self.assertEqual([text for _, text in self.successResultOf(gathered)], [None, None])
