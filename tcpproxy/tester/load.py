"""
A load run: open the connections, let the pacer send, end, and count.

A run goes through four phases:

  1. Connecting.  C{connections} per port, interleaved across the ports, all
     at once or C{connectRate} per second.  Without a connect rate, time zero
     is when every attempt has settled; with one, it is the first attempt,
     and the ramp is part of what is measured.
  2. Running.  The L{IPacer} sends, until every connection has spent its
     message budget, the duration is over, or L{LoadRun.interrupt} is called.
  3. Ending.  C{drain} waits (at most C{drainTimeout}) for the replies still
     in flight; C{cut} does not.  Either way what is still unanswered when
     the connections are closed counts as dropped.
  4. Closing.  The run's result fires once every connection is gone, so that
     nothing is left behind for the next run of a sweep (or the next test).

Every second the L{Recorder} samples the run, which feeds the time series
and the live progress line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpproxy.dialer import describeFailure
from tcpproxy.tester.client import CLOSED, CONNECTING, OPEN, IConnectionListener, LoadProtocol
from tcpproxy.tester.pacing import IPacer
from tcpproxy.tester.payloads import Payloads
from tcpproxy.tester.stats import Figures, Recorder, Sample
from tcpproxy.tester.targets import ProxyPort

DRAIN = "drain"
CUT = "cut"
ENDINGS = (DRAIN, CUT)

SAMPLE_INTERVAL = 1.0


class Unreachable(Exception):
    """
    Not one connection could be opened; the text lists each port and why.
    """


@dataclass(frozen=True)
class LoadSettings:
    """
    How to load the proxy (the command line's C{load} options, checked).

    @ivar messages: per connection, or C{None} for as many as time allows.
    @ivar duration: seconds of sending, or C{None} to stop on C{messages}.
    """

    connections: int = 1
    connectRate: float | None = None
    messages: int | None = None
    duration: float | None = None
    end: str = DRAIN
    drainTimeout: float = 5.0
    connectTimeout: float = 5.0


@dataclass
class RunResult:
    """
    What one run measured.

    @ivar seconds: from time zero to the end of sending (and draining).
    @ivar connections: per app, connections that opened.
    @ivar errorKinds: C{(app, port, kind, count)}, most frequent first.
    """

    connectionsPerPort: int
    ports: list[ProxyPort]
    seconds: float
    total: Figures
    apps: dict[str, Figures]
    connections: dict[str, int]
    errorKinds: list[tuple[str, int, str, int]]
    samples: list[Sample] = field(default_factory=list)
    pacing: str = ""
    payload: str = ""


@implementer(IConnectionListener)
class LoadRun:
    """
    One run against a list of ports; L{run} returns its L{RunResult}.

    @param onSample: called with each second's L{Sample}, and the seconds
        since time zero, as the run goes (for the progress line).
    """

    def __init__(
        self,
        reactor: IReactorTCP | IReactorTime,
        ports: list[ProxyPort],
        settings: LoadSettings,
        pacer: IPacer,
        payloads: Payloads,
        onSample: Callable[[Sample], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._ports = ports
        self._settings = settings
        self._pacer = pacer
        self._payloads = payloads
        self._onSample = onSample
        self._recorder = Recorder(list(dict.fromkeys(p.app for p in ports)))
        self._connections: list[LoadProtocol] = []
        self._attempts: dict[LoadProtocol, Deferred] = {}
        self._opened: dict[str, int] = dict.fromkeys(self._recorder.totals, 0)
        self._failures: dict[ProxyPort, str] = {}
        self._delayed: list = []
        self._sampler: LoopingCall | None = None
        self._t0: float | None = None
        self._lastSample = 0.0
        self._tStop: float | None = None
        self._lastReply: float | None = None
        self._phase = "new"
        self._waiters: list[Deferred[RunResult]] = []
        self._result: RunResult | None = None
        self._drained: Deferred[None] | None = None

    # -- phase 1: connecting

    def run(self) -> Deferred[RunResult]:
        """
        Start the run.

        @return: fires with the L{RunResult}, or fails with L{Unreachable}.
        """
        settings = self._settings
        self._phase = "connecting"
        for _ in range(settings.connections):
            for where in self._ports:
                connection = LoadProtocol(
                    where,
                    self._payloads.cursor(),
                    self._recorder,
                    self._reactor,
                    self,
                    settings.messages,
                )
                self._connections.append(connection)
        if settings.connectRate:
            self._begin()
            for number, connection in enumerate(self._connections):
                if number == 0:
                    self._connect(connection)
                else:
                    call = self._reactor.callLater(number / settings.connectRate, self._connect, connection)
                    self._delayed.append(call)
        else:
            for connection in self._connections:
                self._connect(connection)
        return self.whenDone()

    def _connect(self, connection: LoadProtocol) -> None:
        if self._phase not in ("connecting", "running"):
            return
        connection.state = CONNECTING
        attempt = connectProtocol(connection.where.endpoint(self._reactor), connection)
        attempt.addTimeout(self._settings.connectTimeout, self._reactor)
        self._attempts[connection] = attempt
        attempt.addCallbacks(self._connected, self._notConnected, errbackArgs=(connection,))

    def _connected(self, connection: LoadProtocol) -> None:
        # Counted already, by connectionReady.
        self._settled()

    def _notConnected(self, reason: Failure, connection: LoadProtocol) -> None:
        self._attempts.pop(connection, None)
        connection.state = CLOSED
        if not (reason.check(CancelledError) and self._phase not in ("connecting", "running")):
            why = describeFailure(reason, self._settings.connectTimeout)
            self._failures[connection.where] = why
            self._recorder.error(connection.where.app, connection.where.port, f"cannot connect: {why}")
        self._settled()
        self._checkFinished()
        self._checkClosed()

    def _pendingCount(self) -> int:
        return sum(1 for c in self._connections if c.state in ("pending", CONNECTING))

    def _settled(self) -> None:
        if self._phase not in ("connecting", "running") or self._pendingCount():
            return
        if not any(self._opened.values()):
            self._fail()
        elif self._phase == "connecting":
            self._begin()

    def _fail(self) -> None:
        self._phase = "failed"
        self._pacer.stop()
        self._stopTimers()
        lines = [f"  {where}: {why}" for where, why in self._failures.items()]
        failure = Failure(Unreachable("could not connect to any port:\n" + "\n".join(lines)))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    # -- phase 2: running

    def _begin(self) -> None:
        self._phase = "running"
        self._t0 = self._reactor.seconds()
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self._reactor
        self._sampler.start(SAMPLE_INTERVAL, now=False)
        if self._settings.duration is not None:
            self._delayed.append(self._reactor.callLater(self._settings.duration, self._stopSending))
        self._pacer.start(self._t0)
        self._checkFinished()

    def connectionReady(self, connection: LoadProtocol) -> None:
        # Connected: from now on it is an open connection, never an attempt
        # to cancel.  (Its attempt's Deferred fires only after this returns,
        # and what the connection sends here may end the run, which cancels
        # the attempts still pending: cancelling this one would raise
        # NotConnectingError and lose the connection's message.)
        if self._attempts.pop(connection, None) is not None:
            self._opened[connection.where.app] += 1
        if self._phase in ("connecting", "running"):
            self._pacer.connectionReady(connection)
        else:
            connection.close()

    def replied(self, connection: LoadProtocol) -> None:
        self._lastReply = self._reactor.seconds()
        if self._phase == "running":
            self._pacer.replied(connection)
        elif self._phase == "draining":
            self._checkDrained()

    def budgetSpent(self, connection: LoadProtocol) -> None:
        self._checkFinished()

    def connectionClosed(self, connection: LoadProtocol) -> None:
        self._pacer.connectionClosed(connection)
        if self._phase == "running":
            self._checkFinished()
        elif self._phase == "draining":
            self._checkDrained()
        elif self._phase == "closing":
            self._checkClosed()

    def _checkFinished(self) -> None:
        """
        Stop sending once no connection can send any more.
        """
        if self._phase != "running" or self._pendingCount():
            return
        if not any(c.canSend for c in self._connections):
            self._stopSending()

    def _sample(self) -> None:
        now = self._reactor.seconds() - self._t0
        openNow = sum(1 for c in self._connections if c.state == OPEN)
        target = self._pacer.targetRate(self._lastSample, now)
        sample = self._recorder.rollOver(now, now - self._lastSample, openNow, target)
        self._lastSample = now
        if self._onSample is not None:
            self._onSample(sample)

    # -- phase 3: ending

    def interrupt(self) -> Deferred[RunResult]:
        """
        Stop sending now and end as the settings say.

        @return: fires with the result, like L{run}.
        """
        self._stopSending()
        return self.whenDone()

    def whenDone(self) -> Deferred[RunResult]:
        """
        A L{Deferred} that fires with the result once the run is over.
        """
        waiter: Deferred[RunResult] = Deferred()
        if self._result is not None:
            waiter.callback(self._result)
        else:
            self._waiters.append(waiter)
        return waiter

    def _stopSending(self) -> None:
        if self._phase not in ("connecting", "running"):
            return
        self._pacer.stop()
        self._stopTimers(keepSampler=True)
        if self._t0 is None:
            self._t0 = self._reactor.seconds()
        self._tStop = self._reactor.seconds()
        if self._settings.end == DRAIN:
            self._phase = "draining"
            self._drained = Deferred()
            self._drained.addTimeout(self._settings.drainTimeout, self._reactor)
            self._drained.addBoth(self._close)
        else:
            self._close(None)
        for attempt in list(self._attempts.values()):
            attempt.cancel()
        self._checkDrained()

    def _checkDrained(self) -> None:
        if self._drained is not None and not any(c.outstanding for c in self._connections):
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _stopTimers(self, keepSampler: bool = False) -> None:
        for call in self._delayed:
            if call.active():
                call.cancel()
        self._delayed = []
        if not keepSampler and self._sampler is not None and self._sampler.running:
            self._sampler.stop()

    # -- phase 4: closing

    def _close(self, reason: object) -> None:
        if isinstance(reason, Failure):
            reason.trap(defer.TimeoutError)
        self._drained = None
        self._phase = "closing"
        cut = self._settings.end == CUT
        for connection in self._connections:
            if connection.state == OPEN:
                connection.close(abort=cut or bool(connection.outstanding))
            else:
                connection.closing = True
        self._checkClosed()

    def _checkClosed(self) -> None:
        if self._phase != "closing":
            return
        if any(c.state in (OPEN, CONNECTING) for c in self._connections):
            return
        self._phase = "done"
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        # Rates are over the time spent sending and receiving: a drain that
        # waited in vain for the last replies does not count.
        end = self._tStop
        if self._settings.end == DRAIN and self._lastReply is not None:
            end = max(end, self._lastReply)
        seconds = end - self._t0
        closed = self._reactor.seconds() - self._t0
        if closed > self._lastSample or not self._recorder.samples:
            self._recorder.rollOver(closed, closed - self._lastSample, 0, None)
        total, apps = self._recorder.figures(seconds)
        kinds = sorted(self._recorder.errorKinds.items(), key=lambda item: (-item[1], item[0]))
        self._result = RunResult(
            connectionsPerPort=self._settings.connections,
            ports=self._ports,
            seconds=seconds,
            total=total,
            apps=apps,
            connections=dict(self._opened),
            errorKinds=[(app, port, kind, count) for (app, port, kind), count in kinds],
            samples=list(self._recorder.samples),
            pacing=self._pacer.describe(),
            payload=self._payloads.description,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._result)
