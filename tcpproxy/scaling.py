"""
Scale to zero: an app's idle targets are stopped, and a stopped target is
woken when a client comes that no running target can take (fly.io's
autostop/autostart, for any TCP service; an app's C{"ScaleToZero"} key).

  - Each target names its own commands, in the object form of targets:
    C{"Start"} and C{"Stop"}, argv lists run without a shell through the
    reactor's C{spawnProcess}, with C{{address}}, C{{host}}, C{{port}} and
    C{{app}} substituted (L{commandFor}).  Their output goes to the log,
    line by line; one still running after C{StartTimeout} is killed.
  - A target with a C{Stop} and no connection for C{IdleAfter} seconds is
    stopped, unless fewer than C{MinRunning} targets would then run.  The
    connections counted are the clients' (the app's L{Load}): a warm pool's
    idle connections (L{tcpproxy.pool}) never keep a target awake.  At
    start-up every target is assumed to be running.  A C{Stop} that fails
    (a non-zero exit, or killed after C{StartTimeout}) leaves the target
    running, logged with its exit status and last line of output, and it
    is stopped again only after another C{IdleAfter} with no connection.
  - A stopped target is marked so in the app's health
    (L{tcpproxy.health.STOPPED}): no client is sent to it, it is not
    checked and not counted down; logs, C{/status} and metrics show it.
  - A client that no running target took (none runs, every one failed, or
    every one is at its C{MaxConnections}) wakes the first stopped target
    with a C{Start} (not drained, nor of weight 0: it would get no
    client): its C{Start} runs once however many clients wait, and
    a C{Stop} of that target still running is waited for first, so the
    two never race; the proxy connects to the target again and again (every
    L{PROBE_INTERVAL} seconds) until it accepts or C{StartTimeout} passes.
    The clients are held meanwhile as during any dial (their bytes kept,
    bounded, by the relay), then relayed, as many as the target's
    C{MaxConnections} allows; if the start failed (the command's exit
    status and last line of output), or no answer came in time, or the
    target is full, the next stopped target is woken, and with none left
    the client waits in the app's queue if a target it could have is full
    and the app has a C{QueueTimeout}, or is refused: the access log names
    each target and why (L{tcpproxy.dispatch}).  Clients waiting in that
    queue wake a stopped target too (L{ScaleToZero.wakeOne}).
  - A reload that removes a target forgets it and does not stop it.  One
    that takes C{ScaleToZero} away (L{ScaleToZero.retire}) stops no more
    targets and wakes no more, but lets a wake-up under way run to its
    end: its C{Start} has run, and the clients it holds are relayed to
    the target once it is up (they were refused).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcpproxy.config import AppConfig, ScaleToZeroConfig, Target
from tcpproxy.dialer import NoTargetAvailable, endpointForTarget
from tcpproxy.dispatch import fullReason, hasRoom
from tcpproxy.health import HealthTracker

PROBE_INTERVAL = 0.05
"""
Seconds between two connects to a target being woken: what a wake-up may
add to the time the target itself takes to listen.
"""

PROBE_TIMEOUT = 1.0
"""
Seconds one connect to a target being woken may take before it is tried
again (within what is left of C{StartTimeout}).
"""

OUTPUT_GRACE = 1.0
"""
Seconds the output of a command that failed is awaited after it exited
(its last line says why), should a child of its hold its pipes open.
"""

MAX_LINE = 4096
"""
Bytes of a line of a command's output that are logged, and kept while
the line has not ended: the rest of a longer line is dropped, the line
logged with C{[cut]}.  A command may write megabytes with no newline (a
progress bar redrawn with carriage returns): neither the log nor the
proxy's memory take them whole.
"""

log = Logger()


def commandFor(argv: Sequence[str], target: Target, app: str) -> list[str]:
    """
    C{argv} with C{{address}} (C{host:port}), C{{host}}, C{{port}} and
    C{{app}} substituted in each word (the configuration refused any
    other C{{...}}).
    """
    fields = {"address": str(target), "host": target.host, "port": target.port, "app": app}
    return [word.format(**fields) for word in argv]


class _CommandProtocol(ProcessProtocol):
    """
    A command's output, logged line by line; C{done} fires with
    C{(exit status or None, signal or None, last line of output)}.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.done: Deferred[tuple[int | None, int | None, str]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.lastLine = ""
        self._partial = {1: b"", 2: b""}
        # The output streams whose current line was logged cut already:
        # what comes until its end is dropped.
        self._cut: set[int] = set()
        self._exit: tuple[int | None, int | None] | None = None
        self._grace: IDelayedCall | None = None
        self.clock = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in self._cut:
            end = data.find(b"\n")
            if end < 0:
                return
            self._cut.discard(childFD)
            data = data[end + 1 :]
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            self._line(line)
        if len(rest) > MAX_LINE:
            self._line(rest)
            self._cut.add(childFD)
            rest = b""
        self._partial[childFD] = rest

    def _line(self, raw: bytes) -> None:
        line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip()
        if len(raw) > MAX_LINE:
            line += " [cut]"
        if line:
            self.lastLine = line
            log.info("{label}: {line}", label=self.label, line=line)

    def _flush(self) -> None:
        for rest in self._partial.values():
            if rest:
                self._line(rest)
        self._partial = {}

    def processExited(self, reason: Failure) -> None:
        self._exit = (reason.value.exitCode, reason.value.signal)
        if self._exit[0] == 0:
            self._fire()
        elif self.clock is not None:
            self._grace = self.clock.callLater(OUTPUT_GRACE, self._fire)

    def processEnded(self, reason: Failure) -> None:
        if self._exit is None:
            self._exit = (reason.value.exitCode, reason.value.signal)
        self._fire()
        self.ended.callback(None)

    def _fire(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        if not self.done.called:
            self._flush()
            self.done.callback((*self._exit, self.lastLine))


def runCommand(
    reactor, argv: list[str], timeout: float, label: str, running: set[Deferred[None]] | None = None
) -> Deferred[tuple[int | None, int | None, str]]:
    """
    Run C{argv} without a shell (the first word looked up in C{PATH}), its
    output logged with C{label}, killed if still running after C{timeout}
    seconds.

    @param running: where the command's end (its output closed as well,
        a L{Deferred}) is kept while it runs.
    @return: a L{Deferred} firing with C{(exit status or None, signal or
        None, last line of output)}; a command not found exits with 127,
        and a file named by its path that is not executable with 126, as
        in a shell.
    """
    executable = shutil.which(argv[0])
    if executable is None:
        done: Deferred = Deferred()
        if os.sep in argv[0] and os.path.isfile(argv[0]):
            done.callback((126, None, f"{argv[0]}: permission denied (not executable)"))
        else:
            done.callback((127, None, f"{argv[0]}: command not found"))
        return done
    protocol = _CommandProtocol(label)
    protocol.clock = reactor
    try:
        process = reactor.spawnProcess(protocol, executable, argv, env=dict(os.environ))
    except OSError as e:
        done = Deferred()
        done.callback((126, None, f"{argv[0]}: {e.strerror}"))
        return done

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        else:
            log.warn("{label}: still running after {timeout:g}s: killed", label=label, timeout=timeout)

    timer = reactor.callLater(timeout, kill)
    if running is not None:
        running.add(protocol.ended)
        protocol.ended.addBoth(lambda _: running.discard(protocol.ended))

    def ended(result):
        if timer.active():
            timer.cancel()
        return result

    return protocol.done.addBoth(ended)


def describeExit(status: int | None, signal: int | None, lastLine: str) -> str:
    """
    A failed command, for the log: its exit status (or signal) and the
    last line of its output.
    """
    how = f"exit status {status}" if status is not None else f"killed by signal {signal}"
    return f"{how} ({'last output: ' + repr(lastLine) if lastLine else 'no output'})"


class _Probe(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class _Wake:
    """
    One target being woken: its C{Start} running, and connects to it until
    it accepts or C{StartTimeout} passes; clients wait on it (L{wait}).
    """

    def __init__(self, scaler: ScaleToZero, target: Target) -> None:
        self.scaler = scaler
        self.target = target
        self.waiters: list[Deferred[str | None]] = []
        self.done = False
        self.why: str | None = None
        scaler._waking[target] = self
        reactor = scaler.reactor
        settings = scaler.settings
        self.began = reactor.seconds()
        self.deadline = self.began + settings.startTimeout
        argv = commandFor(target.start, target, scaler.app)
        log.info(
            "app {app}: target {target} is stopped: starting it for a client: {command}",
            app=scaler.app,
            target=str(target),
            command=" ".join(argv),
        )
        self._retry: IDelayedCall | None = None
        self._attempt: Deferred | None = None
        self._timer = reactor.callLater(settings.startTimeout, self._timedOut)
        self._argv = argv
        stopping = scaler._stopping.get(target)
        if stopping is None:
            self._launch()
        else:
            # Its Stop still runs: starting now would race it (a Stop that
            # ends after the Start would stop what was just started).
            stopping.append(self._launch)

    def _launch(self) -> None:
        if self.done:
            return
        scaler = self.scaler
        label = f"app {scaler.app}: target {self.target}: Start"
        runCommand(
            scaler.reactor, self._argv, scaler.settings.startTimeout, label, scaler.running
        ).addCallback(self._commandDone)
        if not self.done:
            self._probe()

    def wait(self) -> Deferred[str | None]:
        """
        A L{Deferred} firing with C{None} once the target accepts, or with
        why it will not; cancelling it leaves the others waiting.
        """
        if self.done:
            return succeed(self.why)
        d: Deferred[str | None] = Deferred(self.waiters.remove)
        self.waiters.append(d)
        return d

    def _probe(self) -> None:
        self._retry = None
        if self.done:
            return
        reactor = self.scaler.reactor
        left = self.deadline - reactor.seconds()
        endpoint = endpointForTarget(self.scaler.connector, self.target)
        attempt = self._attempt = endpoint.connect(self.scaler.probes)
        attempt.addTimeout(max(0.001, min(PROBE_TIMEOUT, left)), reactor)
        attempt.addCallbacks(self._answered, self._notYet)

    def _answered(self, protocol) -> None:
        self._attempt = None
        self._finish(None)

    def _notYet(self, reason: Failure) -> None:
        self._attempt = None
        if not self.done:
            self._retry = self.scaler.reactor.callLater(PROBE_INTERVAL, self._probe)

    def _commandDone(self, result: tuple[int | None, int | None, str]) -> None:
        status, signal, lastLine = result
        if status != 0 and not self.done:
            self._finish(f"its Start failed: {describeExit(status, signal, lastLine)}")

    def _timedOut(self) -> None:
        self._timer = None
        self._finish(
            f"no answer within {self.scaler.settings.startTimeout:g}s (StartTimeout) after its Start"
        )

    def _finish(self, why: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.why = why
        scaler = self.scaler
        for call in (self._timer, self._retry):
            if call is not None and call.active():
                call.cancel()
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.addErrback(lambda reason: None)
            attempt.cancel()
        scaler._waking.pop(self.target, None)
        took = scaler.reactor.seconds() - self.began
        if why is None:
            scaler._failedAt.pop(self.target, None)
            scaler.health.setStopped(self.target, False)
            scaler._lastEnded[self.target] = scaler.reactor.seconds()
            scaler._arm(self.target, scaler.settings.idleAfter)
            log.info(
                "app {app}: target {target} is up: woken in {seconds:.3f}s",
                app=scaler.app,
                target=str(self.target),
                seconds=took,
            )
        else:
            scaler._failedAt[self.target] = scaler.reactor.seconds()
            log.warn(
                "app {app}: target {target} did not start: {why}",
                app=scaler.app,
                target=str(self.target),
                why=why,
            )
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(why)
        # Up: its clients have their slots, and the queue may have the
        # rest.  Failed: the clients waiting in the queue, if any, wake the
        # next stopped target (L{ScaleToZero.wakeOne}), as held ones do.
        scaler.changed()


class ScaleToZero:
    """
    Stops an app's idle targets and wakes them for its clients (see the
    module's description).

    @ivar reactor: runs the commands (C{IReactorProcess}) and keeps time
        (C{IReactorTime}).
    @ivar connector: connects to a target being woken (C{IReactorTCP}:
        the engine's reactor).
    @ivar health: the app's L{HealthTracker}, where C{stopped} is kept.
    @ivar load: gives the app's L{tcpproxy.balancer.Load} now (the
        clients' connections per target, dials included).
    @ivar changed: called when a target was stopped or is running again
        (woken, or its C{Stop} failed): the app's
        L{tcpproxy.dispatch.Dispatcher.changed}, which serves its queue.
    """

    def __init__(
        self,
        app: AppConfig,
        dialer,
        reactor,
        connector,
        health: HealthTracker,
        load: Callable[[], object],
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.reactor = reactor
        self.changed = changed
        self.connector = connector
        self.health = health
        self.load = load
        self.probes = Factory.forProtocol(_Probe)
        self.probes.noisy = False
        self._timers: dict[Target, IDelayedCall] = {}
        self._lastEnded: dict[Target, float] = {}
        self._waking: dict[Target, _Wake] = {}
        # When each target's last wake-up failed (until one succeeds).
        self._failedAt: dict[Target, float] = {}
        self.running: set[Deferred[None]] = set()
        # The targets whose Stop runs now: what waits for it to end.
        self._stopping: dict[Target, list[Callable[[], None]]] = {}
        self.targets: tuple[Target, ...] = ()
        self._retired = False
        self.update(app, dialer)

    def update(self, app: AppConfig, dialer) -> None:
        """
        New settings (at start-up, or a reload): a new target is assumed to
        be running, and stopped once idle for C{IdleAfter}; a target gone
        is forgotten, and not stopped; a changed C{IdleAfter} applies at
        once to the time each target has been idle already.
        """
        self.app = app.name
        self.settings: ScaleToZeroConfig = app.scaleToZero
        self.dialer = dialer
        now = self.reactor.seconds()
        old = set(self.targets)
        self.targets = app.targets
        self._failedAt = {t: when for t, when in self._failedAt.items() if t in app.targets}
        # Targets are equal by address: this gives the one of this
        # configuration, with its commands (a reload may change them).
        self._current = {target: target for target in app.targets}
        for target in app.targets:
            if target not in old:
                self._lastEnded[target] = now
            # IdleAfter (maybe new) counts from the target's last connection's
            # end: a timer armed with the old one would stop it too late.
            timer = self._timers.pop(target, None)
            if timer is not None and timer.active():
                timer.cancel()
            left = self._lastEnded.get(target, now) + self.settings.idleAfter - now
            self._arm(target, max(0.0, left))
        kept = set(app.targets)
        for target in old - kept:
            timer = self._timers.pop(target, None)
            if timer is not None and timer.active():
                timer.cancel()
            self._lastEnded.pop(target, None)

    def retire(self) -> None:
        """
        The app no longer scales to zero (a reload took C{ScaleToZero}
        away): no target is stopped any more, and the targets stopped are
        given back to the health checks, counted as running.  A wake-up
        under way runs to its end, for the clients it holds: its C{Start}
        has run, and the target is most likely coming up (refusing them
        would turn a reload into lost clients).
        """
        self._retired = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for target in list(self.health.stopped):
            if target not in self._waking:
                self.health.setStopped(target, False)

    def shutdown(self, why: str = "the proxy is stopping") -> Deferred[None]:
        """
        Stop every timer and every wake-up, its clients refused (the app
        is gone, or the proxy stops); the targets stopped are given back
        to the health checks.

        @param why: why the clients held are refused, for the log.
        @return: a L{Deferred} that fires once the commands running now
            have ended (each is killed after C{StartTimeout}).
        """
        for wake in list(self._waking.values()):
            wake._finish(why)
        self.retire()
        for target in list(self.health.stopped):
            self.health.setStopped(target, False)
        return DeferredList(list(self.running)).addCallback(lambda _: None)

    # Stopping.

    def ended(self, target: Target) -> None:
        """
        A client's connection to C{target} ended (counted out of the load
        already): the idle time starts now if it was the last.
        """
        target = self._current.get(target)
        if target is None or target.stop is None or self.load().active(target):
            return
        self._lastEnded[target] = self.reactor.seconds()
        self._arm(target, self.settings.idleAfter)

    def _arm(self, target: Target, delay: float) -> None:
        if target.stop is None or self._retired:
            return
        timer = self._timers.get(target)
        if timer is not None and timer.active():
            return  # it looks again when it fires
        self._timers[target] = self.reactor.callLater(delay, self._idleCheck, target)

    def _idleCheck(self, target: Target) -> None:
        self._timers.pop(target, None)
        target = self._current.get(target)
        if target is None or target.stop is None:
            return  # a reload took it, or its Stop, away
        health = self.health
        if target not in health.states or target in health.stopped or target in self._waking:
            return
        if self.load().active(target):
            return  # its last connection to end arms the timer again
        now = self.reactor.seconds()
        left = self._lastEnded.get(target, now) + self.settings.idleAfter - now
        if left > 0:
            self._arm(target, left)
            return
        running = sum(1 for t in self.targets if t not in health.stopped)
        if running - 1 < self.settings.minRunning:
            self._arm(target, self.settings.idleAfter)
            return
        self._stop(target)

    def _stop(self, target: Target) -> None:
        argv = commandFor(target.stop, target, self.app)
        self.health.setStopped(target, True)
        log.info(
            "app {app}: target {target} is stopped: no connection for {idle:g}s: {command}",
            app=self.app,
            target=str(target),
            idle=self.settings.idleAfter,
            command=" ".join(argv),
        )
        label = f"app {self.app}: target {target}: Stop"

        def done(result: tuple[int | None, int | None, str]) -> None:
            status, signal, lastLine = result
            if status == 0:
                log.info("{label} done", label=label)
                return
            # The service may well still run: count it as running (clients
            # are sent to it, health checks resume), and stop it again only
            # after another IdleAfter with no connection.
            log.warn(
                "{label} failed: {why}: the target stays running, stopped again after {idle:g}s"
                " with no connection",
                label=label,
                why=describeExit(status, signal, lastLine),
                idle=self.settings.idleAfter,
            )
            if target not in self.targets:
                return  # a reload took it away meanwhile
            if target in self.health.stopped and target not in self._waking:
                self.health.setStopped(target, False)
            self._lastEnded[target] = self.reactor.seconds()
            self._arm(target, self.settings.idleAfter)
            self.changed()

        waiting: list[Callable[[], None]] = []
        self._stopping[target] = waiting

        def over(result: object) -> None:
            if self._stopping.get(target) is waiting:
                del self._stopping[target]
            for call in waiting:
                call()

        finished = runCommand(self.reactor, argv, self.settings.startTimeout, label, self.running)
        finished.addCallback(done)
        finished.addBoth(over)
        # Clients waiting in the queue wake it again.
        self.changed()

    # Waking.

    def _mayWake(self, target: Target) -> bool:
        """
        Whether C{target} is stopped and may be woken for clients: it has a
        C{Start}, and would be given clients once up (not drained by an
        operator, nor of weight 0).
        """
        if target.start is None or target.weight == 0 or target not in self.health.stopped:
            return False
        state = self.health.states.get(target)
        return state is not None and not state.drained

    def wakeable(self) -> bool:
        """
        Whether a stopped target could be woken for a client.
        """
        return any(self._mayWake(target) for target in self.targets)

    def wakeOne(self) -> None:
        """
        Wake the first stopped target that has a C{Start}, for the clients
        that wait in the app's queue (L{tcpproxy.dispatch}), unless a
        target is being woken already: it is their turn then.  Once it is
        up, L{changed} serves them; if it fails to start, the next stopped
        target is woken for them (a target whose wake-up failed less than
        C{StartTimeout} seconds ago is passed over: the queue would
        otherwise run a failing C{Start} again and again).
        """
        if self._waking:
            return
        now = self.reactor.seconds()
        holdOff = self.settings.startTimeout
        for target in self.targets:
            if self._mayWake(target) and now - self._failedAt.get(target, now - holdOff) >= holdOff:
                _Wake(self, target)
                return

    @inlineCallbacks
    def wake(self, protocolFactory, failures: Sequence[tuple[Target, str]] = ()):
        """
        Wake stopped targets in the app's order, one after the other until
        one starts with room for the client, and dial it for the client.

        A target woken for more clients than its C{MaxConnections} takes
        the first ones; each of the others goes on to the next stopped
        target, as a client finding every running target full does.

        @param failures: why the running targets did not take the client.
        @return: a L{Deferred} as L{tcpproxy.dialer.IDialer.dial}'s.
        """
        failures = list(failures)
        for target in self.targets:
            if not self._mayWake(target):
                continue
            wake = self._waking.get(target) or _Wake(self, target)
            why = yield wake.wait()
            if why is not None:
                failures.append((target, why))
                continue
            load = self.load()
            if not hasRoom(load, (target,)):
                failures.append((target, fullReason(target)))
                continue
            load.opened(target)
            try:
                dialled = yield self.dialer.dial(protocolFactory, [target])
            except NoTargetAvailable as e:
                load.closed(target)
                failures.extend(e.failures)
                continue
            except BaseException:
                load.closed(target)
                raise
            return dataclasses.replace(dialled, failures=(*failures, *dialled.failures))
        raise NoTargetAvailable(failures)
