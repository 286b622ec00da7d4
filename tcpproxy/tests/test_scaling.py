"""
Scale to zero on fakes: the C{"ScaleToZero"} key and targets' C{Start}
and C{Stop}; the idle clock (L{Clock}) and the commands a
L{MemoryReactorClock} records as spawned.
"""

from __future__ import annotations

import dataclasses
import os

from twisted.internet.defer import succeed
from twisted.internet.error import (
    ConnectionRefusedError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.balancer import Load
from tcpproxy.config import AppConfig, ConfigError, ScaleToZeroConfig, parseConfig, parseTarget
from tcpproxy.dialer import Dialled, NoTargetAvailable
from tcpproxy.dispatch import Dispatcher
from tcpproxy.health import STOPPED, UP, HealthTracker
from tcpproxy.scaling import MAX_LINE, ScaleToZero, commandFor, runCommand
from tcpproxy.tests.loopback import captureEvents
from tcpproxy.tests.test_dispatch import FakeFactory
from tcpproxy.tests.test_health import accept, refuse


def document(app=None, **top):
    base = {"Name": "web", "Ports": [5001], "Targets": ["127.0.0.1:6001"]}
    return {**top, "Apps": [{**base, **(app or {})}]}


class ScaleToZeroConfigTests(SynchronousTestCase):
    """
    The C{"ScaleToZero"} key and the targets' C{"Start"} and C{"Stop"}.
    """

    def refused(self, doc) -> str:
        message = str(self.assertRaises(ConfigError, parseConfig, doc, "c.json"))
        self.assertNotIn("\n", message)
        return message

    def test_accepted(self) -> None:
        app = parseConfig(
            document(
                {
                    "ScaleToZero": {"IdleAfter": 60, "StartTimeout": 10, "MinRunning": 1},
                    "Targets": [
                        {
                            "Address": "127.0.0.1:7001",
                            "Start": ["systemctl", "start", "app@{port}"],
                            "Stop": ["systemctl", "stop", "app@{port}"],
                        }
                    ],
                }
            )
        ).apps[0]
        self.assertEqual(app.scaleToZero, ScaleToZeroConfig(60, 10, 1))
        self.assertEqual(app.targets[0].start, ("systemctl", "start", "app@{port}"))
        self.assertEqual(app.targets[0].stop, ("systemctl", "stop", "app@{port}"))
        self.assertEqual(parseConfig(document({"ScaleToZero": {}})).apps[0].scaleToZero, ScaleToZeroConfig())
        self.assertIsNone(parseConfig(document()).apps[0].scaleToZero)

    def test_refusals(self) -> None:
        target = {"Address": "127.0.0.1:7001"}
        for app, expected in (
            ({"ScaleToZero": 3}, 'c.json: app "web": key "ScaleToZero": 3 is not an object like'),
            ({"ScaleToZero": {"IdleAfter": 0}}, 'key "ScaleToZero.IdleAfter": 0 must be greater than 0'),
            ({"ScaleToZero": {"MinRunning": -1}}, 'key "ScaleToZero.MinRunning": -1 is not a whole number'),
            ({"ScaleToZero": {"Idle": 3}}, 'key "ScaleToZero.Idle": unknown key'),
            (
                {"Targets": [{**target, "Start": "systemctl start app"}]},
                'key "Targets[1].Start": "systemctl start app" is not a command as a list of words',
            ),
            ({"Targets": [{**target, "Stop": []}]}, 'key "Targets[1].Stop": [] is not a command'),
            (
                {"Targets": [{**target, "Stop": ["kill", "{pid}"]}]},
                'key "Targets[1].Stop": "{pid}" has a {...} other than {address}, {host}, {port} or {app}',
            ),
        ):
            self.assertIn(expected, self.refused(document(app)))

    def test_stoppableTargetOfOneAppOnly(self) -> None:
        """
        A target that an app scaling to zero may stop cannot be another
        app's target too: the app counts only its own clients, and would
        stop the target under the other app's (seen: an idle app's C{Stop}
        reset a long connection of another app to the same service).
        """
        target = {"Address": "127.0.0.1:7001", "Start": ["true"], "Stop": ["true"]}
        other = {"Name": "alt", "Ports": [5002], "Targets": ["127.0.0.1:6001", "127.0.0.1:7001"]}
        doc = document({"ScaleToZero": {}, "Targets": ["127.0.0.1:6002", target]})
        for apps in ([*doc["Apps"], other], [other, *doc["Apps"]]):
            self.assertEqual(
                self.refused({"Apps": apps}),
                'c.json: app "web": key "Targets": 127.0.0.1:7001 is a target of app "alt" too: this app'
                " scales to zero and would run its Stop while that app's clients use it (each app counts"
                " only its own); list it in one app only, or give it no Stop",
            )
        # Without a Stop, or in an app that does not scale to zero, sharing is fine.
        for shared in ({"Address": "127.0.0.1:7001", "Start": ["true"]}, "127.0.0.1:7001"):
            parseConfig({"Apps": [document({"ScaleToZero": {}, "Targets": [shared]})["Apps"][0], other]})
        parseConfig({"Apps": [document({"Targets": [target]})["Apps"][0], other]})

    def test_commandFor(self) -> None:
        """
        C{{address}}, C{{host}}, C{{port}} and C{{app}} are substituted in
        each word; no shell sees them.
        """
        target = parseTarget("[::1]:7001")
        self.assertEqual(
            commandFor(("docker", "start", "{app}-{port}", "{host} {address}; rm"), target, "web"),
            ["docker", "start", "web-7001", "::1 [::1]:7001; rm"],
        )


class RunCommandTests(SynchronousTestCase):
    """
    L{runCommand}'s answers for commands that cannot run at all, as a
    shell gives them: the log must say why.
    """

    def outcome(self, argv: list[str]) -> tuple:
        reactor = ProcessReactor()
        result: list = []
        runCommand(reactor, argv, 5.0, "Start").addCallback(result.append)
        self.assertEqual(reactor.spawned, [])
        return result[0]

    def test_notFound(self) -> None:
        self.assertEqual(
            self.outcome(["no-such-command-here", "start"]),
            (127, None, "no-such-command-here: command not found"),
        )

    def test_notExecutable(self) -> None:
        """
        A script that exists but is not executable is not "not found": the
        log says what to fix (exit status 126, as a shell gives).
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o644)
        self.assertEqual(self.outcome([path]), (126, None, f"{path}: permission denied (not executable)"))


class FakeProcess:
    def __init__(self) -> None:
        self.signals: list[str] = []
        self.exited = False

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def closeStdin(self) -> None:
        pass


class ProcessReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that records the processes it is asked to spawn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []

    def spawnProcess(self, protocol, executable, args=(), env=None, *rest, **kw):
        process = FakeProcess()
        self.spawned.append((protocol, list(args), process))
        protocol.makeConnection(process)
        return process


class RecordingDialer:
    def __init__(self) -> None:
        self.dials: list = []

    def dial(self, protocolFactory, targets):
        targets = list(targets)
        self.dials.append(targets)
        return succeed(Dialled(targets[0], Protocol()))


def exit(protocol, code: int) -> None:
    reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)
    protocol.processExited(Failure(reason))
    protocol.processEnded(Failure(reason))


START = ("true", "start", "{address}")
STOP = ("true", "stop", "{port}")


class ScaleToZeroTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.load = Load()
        self.dialer = RecordingDialer()

    def scaler(self, targets: list[str], idleAfter=10.0, startTimeout=5.0, minRunning=0) -> ScaleToZero:
        self.targets = tuple(dataclasses.replace(parseTarget(t), start=START, stop=STOP) for t in targets)
        self.app = AppConfig(
            "web", (1,), self.targets, scaleToZero=ScaleToZeroConfig(idleAfter, startTimeout, minRunning)
        )
        self.health = HealthTracker("web", self.targets, self.reactor)
        return ScaleToZero(self.app, self.dialer, self.reactor, self.reactor, self.health, lambda: self.load)

    def test_stoppedAfterIdle(self) -> None:
        """
        At start-up a target is assumed running; after C{IdleAfter} with no
        connection its C{Stop} runs, substituted, and it is C{stopped}.
        """
        self.scaler(["127.0.0.1:7001"])
        target = self.targets[0]
        self.reactor.advance(9.9)
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.health.stateOf(target), UP)
        self.reactor.advance(0.1)
        self.assertEqual([args for _, args, _ in self.reactor.spawned], [["true", "stop", "7001"]])
        self.assertEqual(self.health.stateOf(target), STOPPED)
        self.assertEqual(self.health.usable(self.targets), [])

    def test_neverWhileConnections(self) -> None:
        """
        C{Stop} never runs while the target has a connection; the idle
        time counts from the end of the last one.
        """
        scaler = self.scaler(["127.0.0.1:7001"])
        target = self.targets[0]
        self.reactor.advance(5)
        self.load.opened(target)
        self.reactor.advance(100)
        self.assertEqual(self.reactor.spawned, [])
        self.load.closed(target)
        scaler.ended(target)
        self.reactor.advance(9)
        self.assertEqual(self.reactor.spawned, [])
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_failedStopStaysRunning(self) -> None:
        """
        A C{Stop} that fails leaves the target running (up, given clients),
        logged with its exit status and last line of output; it is stopped
        again only after another C{IdleAfter} with no connection.
        """
        events = captureEvents(self, "tcpproxy.scaling")
        self.scaler(["127.0.0.1:7001"])
        target = self.targets[0]
        self.reactor.advance(10)
        self.assertEqual(self.health.stateOf(target), STOPPED)
        protocol = self.reactor.spawned[0][0]
        protocol.childDataReceived(2, b"Failed to stop app@7001.service: Access denied\n")
        exit(protocol, 4)
        self.assertEqual(self.health.stateOf(target), UP)
        self.assertEqual(self.health.usable(self.targets), [target])
        self.assertIn(
            "app web: target 127.0.0.1:7001: Stop failed: exit status 4 (last output: 'Failed to stop"
            " app@7001.service: Access denied'): the target stays running, stopped again after 10s with no"
            " connection",
            [formatEvent(event) for event in events],
        )
        self.reactor.advance(9.9)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(0.1)
        self.assertEqual([args for _, args, _ in self.reactor.spawned][1], ["true", "stop", "7001"])
        self.assertEqual(self.health.stateOf(target), STOPPED)

    def test_stopKilledStaysRunning(self) -> None:
        """
        A C{Stop} still running after C{StartTimeout} is killed, and the
        target stays running, as for any failed C{Stop}.
        """
        events = captureEvents(self, "tcpproxy.scaling")
        self.scaler(["127.0.0.1:7001"], startTimeout=5.0)
        target = self.targets[0]
        self.reactor.advance(10)
        protocol, _, process = self.reactor.spawned[0]
        self.reactor.advance(5)
        self.assertEqual(process.signals, ["KILL"])
        reason = Failure(ProcessTerminated(signal=9))
        protocol.processExited(reason)
        protocol.processEnded(reason)
        self.assertEqual(self.health.stateOf(target), UP)
        self.assertIn(
            "app web: target 127.0.0.1:7001: Stop failed: killed by signal 9 (no output): the target stays"
            " running, stopped again after 10s with no connection",
            [formatEvent(event) for event in events],
        )
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_minRunning(self) -> None:
        """
        A target is not stopped if fewer than C{MinRunning} would run.
        """
        self.scaler(["127.0.0.1:7001", "127.0.0.1:7002"], minRunning=1)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(len(self.health.stopped), 1)

    def test_reloadRemovingTargetDoesNotStopIt(self) -> None:
        scaler = self.scaler(["127.0.0.1:7001", "127.0.0.1:7002"])
        kept = AppConfig("web", (1,), self.targets[:1], scaleToZero=self.app.scaleToZero)
        self.health.update("web", kept.targets, 2, 3)
        scaler.update(kept, self.dialer)
        self.reactor.advance(100)
        self.assertEqual([args for _, args, _ in self.reactor.spawned], [["true", "stop", "7001"]])

    def test_reloadChangingStop(self) -> None:
        """
        A reload that changes a target's C{Stop} has the new one run; one
        that takes its C{Stop} away leaves it running.
        """
        scaler = self.scaler(["127.0.0.1:7001", "127.0.0.1:7002"])
        changed = (
            dataclasses.replace(self.targets[0], stop=("docker", "stop", "web-{port}")),
            dataclasses.replace(self.targets[1], stop=None),
        )
        self.health.update("web", changed, 2, 3)
        scaler.update(AppConfig("web", (1,), changed, scaleToZero=self.app.scaleToZero), self.dialer)
        self.reactor.advance(100)
        self.assertEqual([args for _, args, _ in self.reactor.spawned], [["docker", "stop", "web-7001"]])

    def test_reloadChangingIdleAfter(self) -> None:
        """
        A reload that changes C{IdleAfter} applies at once to the time a
        target has been idle: lowered from 60 s to 10 s, a target idle for
        5 s is stopped 5 s later (it was stopped only when the 60 s armed
        before the reload were over); raised, a target is not stopped
        before its new time.
        """
        scaler = self.scaler(["127.0.0.1:7001"], idleAfter=60.0)
        self.reactor.advance(5)
        scaler.update(dataclasses.replace(self.app, scaleToZero=ScaleToZeroConfig(10.0, 5.0, 0)), self.dialer)
        self.reactor.advance(4.9)
        self.assertEqual(self.reactor.spawned, [])
        self.reactor.advance(0.1)
        self.assertEqual([args for _, args, _ in self.reactor.spawned], [["true", "stop", "7001"]])

        self.reactor.spawned.clear()
        scaler = self.scaler(["127.0.0.1:7002"], idleAfter=10.0)
        self.reactor.advance(5)
        scaler.update(dataclasses.replace(self.app, scaleToZero=ScaleToZeroConfig(60.0, 5.0, 0)), self.dialer)
        self.reactor.advance(54.9)
        self.assertEqual(self.reactor.spawned, [])
        self.reactor.advance(0.1)
        self.assertEqual([args for _, args, _ in self.reactor.spawned], [["true", "stop", "7002"]])

    def stoppedOne(self) -> ScaleToZero:
        scaler = self.scaler(["127.0.0.1:7001"])
        self.reactor.advance(10)
        exit(self.reactor.spawned.pop()[0], 0)
        return scaler

    def test_oneStartManyClients(self) -> None:
        """
        Clients arriving while a target starts wait on one C{Start}; once a
        connect to the target succeeds, each is dialled to it.
        """
        scaler = self.stoppedOne()
        results = [[] for _ in range(20)]
        for result in results:
            scaler.wake(Factory.forProtocol(Protocol)).addBoth(result.append)
        self.assertEqual([args for _, args, _ in self.reactor.spawned], [["true", "start", "127.0.0.1:7001"]])
        self.assertEqual(results[0], [])
        # The target refuses at first, then accepts.
        connector = self.reactor.connectors.pop(0)
        self.reactor.tcpClients[0][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.reactor.advance(0.05)
        self.reactor.tcpClients[1][2].buildProtocol(None).makeConnection(StringTransport())
        self.assertEqual(self.health.stateOf(self.targets[0]), UP)
        self.assertEqual([len(r) for r in results], [1] * 20)
        self.assertTrue(all(isinstance(r[0], Dialled) for r in results))
        self.assertEqual(self.load.active(self.targets[0]), 20)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_drainedNotWoken(self) -> None:
        """
        A stopped target an operator drained is not woken (it would be
        given no client once up): the next stopped one is.
        """
        scaler = self.scaler(["127.0.0.1:7001", "127.0.0.1:7002"])
        self.reactor.advance(10)
        for protocol, _, _ in self.reactor.spawned:
            exit(protocol, 0)
        self.health.drain(self.targets[0], "by an operator")
        scaler.wake(Factory.forProtocol(Protocol))
        self.assertEqual(self.reactor.spawned[2][1], ["true", "start", "127.0.0.1:7002"])
        self.health.drain(self.targets[1], "by an operator")
        self.assertFalse(scaler.wakeable())

    def test_startFails(self) -> None:
        """
        A C{Start} that exits non-zero refuses its clients with its exit
        status and last line of output.
        """
        scaler = self.stoppedOne()
        result = []
        scaler.wake(Factory.forProtocol(Protocol)).addBoth(result.append)
        protocol = self.reactor.spawned[0][0]
        protocol.childDataReceived(2, b"starting\nunit app.service not found\n")
        exit(protocol, 5)
        self.assertIsInstance(result[0].value, NoTargetAvailable)
        self.assertIn(
            "its Start failed: exit status 5 (last output: 'unit app.service not found')",
            str(result[0].value),
        )
        self.assertEqual(self.health.stateOf(self.targets[0]), STOPPED)
        self.assertEqual(self.load.active(self.targets[0]), 0)

    def test_longOutputLinesCut(self) -> None:
        """
        A command that writes a very long line, or output with no newline
        at all (a progress bar redrawn with carriage returns, say), has each
        line logged cut at L{MAX_LINE} characters: the log is not flooded
        with megabytes in one line, and what is kept of a line that has not
        ended stays bounded (it grew without limit, and was copied whole for
        every chunk read: 30 MB without a newline took longer than a
        C{StartTimeout} of 10 s to read).
        """
        events = captureEvents(self, "tcpproxy.scaling")
        scaler = self.stoppedOne()
        result = []
        scaler.wake(Factory.forProtocol(Protocol)).addBoth(result.append)
        protocol = self.reactor.spawned[0][0]
        protocol.childDataReceived(1, b"short\n")
        for _ in range(200):
            protocol.childDataReceived(1, b"\r" + b"x" * 65535)
            self.assertLessEqual(sum(len(rest) for rest in protocol._partial.values()), MAX_LINE)
        protocol.childDataReceived(1, b"x\nfailed to start, " + b"y" * 3 * MAX_LINE + b"\nend")
        exit(protocol, 1)
        logged = [formatEvent(event) for event in events if "Start:" in formatEvent(event)]
        label = "app web: target 127.0.0.1:7001: Start: "
        self.assertEqual(
            logged,
            [
                label + "short",
                label + ("\rx" + "x" * (MAX_LINE - 2))[:MAX_LINE].rstrip() + " [cut]",
                label + ("failed to start, " + "y" * MAX_LINE)[:MAX_LINE] + " [cut]",
                label + "end",
            ],
        )
        self.assertIn("exit status 1 (last output: 'end')", str(result[0].value))

    def test_shutdownSaysWhy(self) -> None:
        """
        Clients held for a wake-up when the proxy stops, or when a reload
        removes their app, are refused saying so, not that the app
        stopped scaling to zero (it did not: it is going away).
        """
        removed = "a reload removed the app"
        for args, why in (((), "the proxy is stopping"), ((removed,), removed)):
            self.reactor.spawned.clear()
            scaler = self.stoppedOne()
            result = []
            scaler.wake(Factory.forProtocol(Protocol)).addBoth(result.append)
            scaler.shutdown(*args)
            self.assertIsInstance(result[0].value, NoTargetAvailable)
            self.assertEqual(str(result[0].value), f"all 1 targets failed: 127.0.0.1:7001: {why}")

    def test_startTimeout(self) -> None:
        """
        No answer within C{StartTimeout}: the clients are refused, and the
        command, still running, is killed.
        """
        scaler = self.stoppedOne()
        result = []
        scaler.wake(Factory.forProtocol(Protocol)).addBoth(result.append)
        self.reactor.advance(5)
        self.assertIn("no answer within 5s (StartTimeout) after its Start", str(result[0].value))
        self.assertEqual(self.reactor.spawned[0][2].signals, ["KILL"])

    def test_startWaitsForStop(self) -> None:
        """
        A target woken while its C{Stop} still runs has its C{Start} run
        once the C{Stop} has ended, not before (a slow C{Stop} ending after
        the C{Start} would stop what was just started).
        """
        scaler = self.scaler(["127.0.0.1:7001"])
        self.reactor.advance(10)
        result = []
        scaler.wake(Factory.forProtocol(Protocol)).addBoth(result.append)
        self.assertEqual([args for _, args, _ in self.reactor.spawned], [["true", "stop", "7001"]])
        exit(self.reactor.spawned[0][0], 0)
        self.assertEqual(
            [args for _, args, _ in self.reactor.spawned],
            [["true", "stop", "7001"], ["true", "start", "127.0.0.1:7001"]],
        )


class ScaleToZeroDispatchTests(SynchronousTestCase):
    """
    Waking through the app's L{Dispatcher}: the woken targets'
    C{MaxConnections} and the C{QueueTimeout} queue, on the real
    L{FailoverDialer} over a memory reactor (its C{tcpClients}: the
    probes of a wake-up and the clients' dials, in order).
    """

    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.protocols = Factory.forProtocol(Protocol)

    def start(self, targets: list[dict], **settings) -> None:
        document = {
            "Apps": [
                {
                    "Name": "web",
                    "Ports": [1],
                    "Targets": targets,
                    "ScaleToZero": {"IdleAfter": 10, "StartTimeout": 5},
                    **settings,
                }
            ]
        }
        app = parseConfig(document).apps[0]
        self.targets = app.targets
        self.health = HealthTracker("web", app.targets, self.reactor)
        self.factory = FakeFactory(app, self.reactor, self.health)
        self.dispatcher = Dispatcher(self.factory)
        self.factory.scaler = ScaleToZero(
            app,
            self.factory.dialer,
            self.reactor,
            self.reactor,
            self.health,
            lambda: self.factory.balancer.load,
            self.dispatcher.changed,
        )

    def commands(self) -> list[list[str]]:
        return [args for _, args, _ in self.reactor.spawned]

    def stopAll(self) -> None:
        """
        Let every target with a C{Stop} idle out, its C{Stop} succeeding.
        """
        self.reactor.advance(10)
        for protocol, _, _ in self.reactor.spawned:
            exit(protocol, 0)

    def client(self, source: str = "10.0.0.1") -> list:
        results: list = []
        self.dispatcher.dispatch(self.protocols, source).addBoth(results.append)
        return results

    def dialled(self) -> list[int]:
        return [port for _, port, _, _, _ in self.reactor.tcpClients]

    def counts(self) -> dict[int, int]:
        return {t.port: n for t, n in self.factory.balancer.load.counts.items() if n}

    def test_wokenTargetsLimitQueues(self) -> None:
        """
        Of four clients held for one wake-up, the woken target's
        C{MaxConnections} (2) take it; the other two wait in the queue,
        and one is served when a connection ends.
        """
        self.start(
            [{"Address": "127.0.0.1:7001", "MaxConnections": 2, "Start": list(START), "Stop": list(STOP)}],
            QueueTimeout=30,
        )
        self.stopAll()
        results = [self.client(f"10.0.0.{n}") for n in range(4)]
        self.assertEqual(self.commands()[1:], [["true", "start", "127.0.0.1:7001"]])
        accept(self.reactor, 0)  # the wake-up's probe
        self.assertEqual(self.dialled(), [7001, 7001, 7001])
        self.assertEqual(self.counts(), {7001: 2})
        self.assertEqual(len(self.dispatcher.queue), 2)
        accept(self.reactor, 1)
        accept(self.reactor, 2)
        self.assertEqual([len(r) for r in results], [1, 1, 0, 0])
        self.dispatcher.ended(results[0][0].target)
        self.assertEqual(self.dialled(), [7001] * 4)
        accept(self.reactor, 3)
        self.assertEqual([len(r) for r in results], [1, 1, 1, 0])
        self.assertEqual(self.counts(), {7001: 2})

    def test_wokenTargetsLimitRefusesWithoutQueue(self) -> None:
        """
        Without C{QueueTimeout}, the clients beyond the woken target's
        limit are refused, saying it is full.
        """
        self.start(
            [{"Address": "127.0.0.1:7001", "MaxConnections": 1, "Start": list(START), "Stop": list(STOP)}]
        )
        self.stopAll()
        results = [self.client() for _ in range(2)]
        accept(self.reactor, 0)
        self.assertEqual(self.counts(), {7001: 1})
        failure = results[1][0]
        failure.trap(NoTargetAvailable)
        self.assertEqual(
            str(failure.value), "all 1 targets failed: 127.0.0.1:7001: at its MaxConnections (1)"
        )

    def test_beyondTheLimitWakesTheNext(self) -> None:
        """
        The clients beyond the first woken target's limit wake the next
        stopped target, and are given to it.
        """
        self.start(
            [
                {"Address": "127.0.0.1:7001", "MaxConnections": 1, "Start": list(START), "Stop": list(STOP)},
                {"Address": "127.0.0.1:7002", "MaxConnections": 2, "Start": list(START), "Stop": list(STOP)},
            ]
        )
        self.stopAll()
        results = [self.client() for _ in range(3)]
        accept(self.reactor, 0)  # 7001's probe
        self.assertEqual(
            self.commands()[2:], [["true", "start", "127.0.0.1:7001"], ["true", "start", "127.0.0.1:7002"]]
        )
        accept(self.reactor, 2)  # 7002's probe, after 7001's client's dial
        self.assertEqual(self.counts(), {7001: 1, 7002: 2})
        self.assertEqual(self.dialled(), [7001, 7001, 7002, 7002, 7002])
        for index in (1, 3, 4):
            accept(self.reactor, index)
        self.assertEqual(sorted(r[0].target.port for r in results), [7001, 7002, 7002])

    def test_queuedClientsWakeAStoppedTarget(self) -> None:
        """
        Clients waiting in the queue (every running target full) wake a
        target stopped meanwhile, and are served by it once it is up.
        """
        self.start(
            [
                {"Address": "127.0.0.1:7001", "MaxConnections": 1},
                {"Address": "127.0.0.1:7002", "Start": list(START), "Stop": list(STOP)},
            ],
            QueueTimeout=30,
        )
        first = self.client()
        accept(self.reactor, 0)
        # 7002's service has died: a client's connect is refused, and it is down.
        second = self.client()
        refuse(self.reactor, 1)
        self.assertIsInstance(second[0].value, NoTargetAvailable)
        queued = self.client()
        self.assertEqual((len(self.dispatcher.queue), queued), (1, []))
        self.assertEqual(self.dialled(), [7001, 7002])
        self.reactor.advance(10)  # 7002 idle: stopped
        self.assertEqual(self.commands(), [["true", "stop", "7002"]])
        exit(self.reactor.spawned[0][0], 0)
        self.assertEqual(self.commands(), [["true", "stop", "7002"], ["true", "start", "127.0.0.1:7002"]])
        accept(self.reactor, 2)  # the wake-up's probe
        self.assertEqual(self.health.stateOf(self.targets[1]), UP)
        self.assertEqual(self.dialled(), [7001, 7002, 7002, 7002])
        accept(self.reactor, 3)
        self.assertEqual(queued[0].target.port, 7002)
        self.assertEqual(self.dispatcher.queue, {})
        self.assertEqual(first[0].target.port, 7001)

    def test_queuedClientsWakeTheNextWhenAStartFails(self) -> None:
        """
        Clients waiting in the queue whose wake-up of a stopped target
        fails wake the next stopped target, as held clients do, and are
        served by it; the target that failed is not started again for
        them within C{StartTimeout}.
        """
        self.start(
            [
                {"Address": "127.0.0.1:7001", "MaxConnections": 1},
                {"Address": "127.0.0.1:7002", "Start": list(START), "Stop": list(STOP)},
                {"Address": "127.0.0.1:7003", "Start": list(START), "Stop": list(STOP), "MaxConnections": 1},
            ],
            QueueTimeout=30,
        )
        self.stopAll()
        first = self.client()
        accept(self.reactor, 0)
        # A client waits in the queue (as one the wake-ups of its arrival
        # could not place does), and the targets change: its turn to wake one.
        queued: list = []
        self.dispatcher._enqueue(self.protocols, "10.0.0.1").addBoth(queued.append)
        self.dispatcher.changed()
        self.assertEqual(self.commands()[2:], [["true", "start", "127.0.0.1:7002"]])
        exit(self.reactor.spawned[2][0], 1)  # 7002's Start fails
        self.assertEqual(
            self.commands()[2:], [["true", "start", "127.0.0.1:7002"], ["true", "start", "127.0.0.1:7003"]]
        )
        self.assertEqual((len(self.dispatcher.queue), queued), (1, []))
        exit(self.reactor.spawned[3][0], 0)
        probe = len(self.reactor.tcpClients) - 1
        self.assertEqual(self.dialled()[probe], 7003)
        accept(self.reactor, probe)  # 7003 is up
        self.assertEqual(self.health.stateOf(self.targets[2]), UP)
        accept(self.reactor, probe + 1)
        self.assertEqual(queued[0].target.port, 7003)
        self.assertEqual(self.dispatcher.queue, {})
        self.assertEqual(first[0].target.port, 7001)
        # Another client waits, every running target full, and the targets
        # change: 7002, whose Start failed less than StartTimeout ago, is
        # not started again for it; once that is over, it is.
        self.dispatcher._enqueue(self.protocols, "10.0.0.1")
        self.dispatcher.changed()
        self.assertEqual(len(self.commands()), 4)
        self.reactor.advance(5)
        self.dispatcher.changed()
        self.assertEqual(self.commands()[4:], [["true", "start", "127.0.0.1:7002"]])

    def test_failedWakeThenQueue(self) -> None:
        """
        A client finding every running target full whose wake-up fails
        waits in the queue for a slot; if none frees in time, it is refused
        with both reasons: the full target, and the failed C{Start}.
        """
        self.start(
            [
                {"Address": "127.0.0.1:7001", "MaxConnections": 1},
                {"Address": "127.0.0.1:7002", "Start": list(START), "Stop": list(STOP)},
            ],
            QueueTimeout=5,
        )
        self.stopAll()
        self.client()
        accept(self.reactor, 0)
        results = self.client()
        protocol = self.reactor.spawned[1][0]
        protocol.childDataReceived(1, b"Job for app@7002.service failed\n")
        exit(protocol, 1)
        self.assertEqual((results, len(self.dispatcher.queue)), ([], 1))
        self.reactor.advance(5)
        failure = results[0]
        failure.trap(NoTargetAvailable)
        self.assertEqual(
            str(failure.value),
            "all 2 targets failed: 127.0.0.1:7001: at its MaxConnections (1) for the 5s the client waited in"
            " the queue; 127.0.0.1:7002: its Start failed: exit status 1 (last output: 'Job for"
            " app@7002.service failed')",
        )
