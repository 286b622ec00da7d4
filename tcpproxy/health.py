"""
Which of an app's targets are worth trying: a health state per target,
fed passively by the dialer (every client connect is a check) and actively
by a periodic TCP connect when the app has a C{HealthCheck}.

  - Passive: a failed connect marks the target down at once.  It is then
    offered to one client again after a back-off that grows with each
    failure in a row (L{twisted.application.internet.backoffPolicy}), so a
    dead target costs one failed attempt per back-off period, not one per
    client.  A successful connect marks it up.

  - Active: C{Fall} failed checks in a row mark a target down, C{Rise}
    successful ones bring it back.  A target the checks found down is left
    to the checks: clients do not try it.

The balancer asks L{HealthTracker.usable} for the targets to rotate over;
when none is usable it tries them all (fail open): a proxy that refuses
every client because its checks are wrong is worse than one that tries.
Every change of state is logged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcpproxy.config import HealthCheckConfig, Target
from tcpproxy.dialer import describeFailure, endpointForTarget

UP = "up"
DOWN = "down"


class TargetHealth:
    """
    The state of one target.

    @ivar up: whether clients are sent to it.
    @ivar successes: active checks passed in a row.
    @ivar failures: active checks failed in a row.
    @ivar attempts: client connects failed in a row (the back-off step).
    @ivar retryAt: when a down target is next offered to a client;
        infinity when only the active checks may bring it back.
    """

    def __init__(self) -> None:
        self.up = True
        self.successes = 0
        self.failures = 0
        self.attempts = 0
        self.retryAt = 0.0


class HealthTracker:
    """
    The health of one app's targets.

    @ivar policy: seconds to wait after the Nth failed connect in a row
        (N from 0); Twisted's exponential back-off by default.
    """

    log = Logger()

    def __init__(
        self,
        app: str,
        targets: Sequence[Target],
        clock: IReactorTime,
        rise: int = 2,
        fall: int = 3,
        policy: Callable[[int], float] | None = None,
    ) -> None:
        self.app = app
        self.clock = clock
        self.rise = rise
        self.fall = fall
        self.policy = policy if policy is not None else backoffPolicy()
        self.states: dict[Target, TargetHealth] = {}
        self._down: set[Target] = set()
        self.update(app, targets, rise, fall)

    def update(self, app: str, targets: Sequence[Target], rise: int, fall: int) -> None:
        """
        New settings (a reload): targets that stay keep their state.
        """
        self.app = app
        self.rise = rise
        self.fall = fall
        self.states = {t: self.states.get(t) or TargetHealth() for t in targets}
        self._down = {t for t, state in self.states.items() if not state.up}

    def isUp(self, target: Target) -> bool:
        state = self.states.get(target)
        return state is None or state.up

    def usable(self, targets: Sequence[Target]) -> list[Target]:
        """
        The targets of C{targets} (in that order) a client may try now: the
        ones up, and a down one whose back-off is over, which this client
        then has to itself until its next back-off period.  All of them if
        none is usable (fail open).
        """
        if not self._down:
            return list(targets)
        now = self.clock.seconds()
        usable = []
        for target in targets:
            state = self.states.get(target)
            if state is None or state.up:
                usable.append(target)
            elif now >= state.retryAt:
                state.retryAt = now + self.policy(state.attempts)
                usable.append(target)
        return usable or list(targets)

    # Passive checks, from the dialer.

    def connectSucceeded(self, target: Target) -> None:
        state = self.states.get(target)
        if state is None:
            return
        state.attempts = 0
        if not state.up:
            self._change(target, state, True, "a client connected to it")

    def connectFailed(self, target: Target, why: str) -> None:
        state = self.states.get(target)
        if state is None:
            return
        delay = self.policy(state.attempts)
        state.attempts += 1
        if math.isfinite(state.retryAt) or state.up:
            state.retryAt = self.clock.seconds() + delay
        if state.up:
            self._change(target, state, False, f"connect failed ({why}); next try in {delay:.1f}s")

    # Active checks, from a HealthChecker.

    def checkSucceeded(self, target: Target) -> None:
        state = self.states.get(target)
        if state is None:
            return
        state.failures = 0
        state.successes += 1
        if not state.up and state.successes >= self.rise:
            state.attempts = 0
            self._change(target, state, True, f"{state.successes} checks passed")

    def checkFailed(self, target: Target, why: str) -> None:
        state = self.states.get(target)
        if state is None:
            return
        state.successes = 0
        state.failures += 1
        if state.failures >= self.fall:
            # Only the checks bring it back now.
            state.retryAt = math.inf
            if state.up:
                self._change(target, state, False, f"{state.failures} checks failed ({why})")

    def _change(self, target: Target, state: TargetHealth, up: bool, why: str) -> None:
        state.up = up
        if up:
            self._down.discard(target)
        else:
            self._down.add(target)
        emit = self.log.info if up else self.log.warn
        emit(
            "app {app}: target {target} is {state}: {why}",
            app=self.app,
            target=str(target),
            state=UP if up else DOWN,
            why=why,
        )


class _Probe(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class HealthChecker:
    """
    Active checks: every C{Interval} seconds, a TCP connect to each target,
    failed if it is not made within C{Timeout}.  A target whose last check
    is still under way is not checked again.
    """

    def __init__(
        self,
        tracker: HealthTracker,
        reactor: IReactorTCP,
        config: HealthCheckConfig,
        endpointFactory: Callable[[IReactorTCP, Target], IStreamClientEndpoint] = endpointForTarget,
    ) -> None:
        self.tracker = tracker
        self.reactor = reactor
        self.config = config
        self._endpointFactory = endpointFactory
        self._inFlight: dict[Target, Deferred] = {}
        self._loop = LoopingCall(self.checkAll)
        self._loop.clock = reactor
        self._probes = Factory.forProtocol(_Probe)
        self._probes.noisy = False

    def start(self) -> None:
        self._loop.start(self.config.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for attempt in list(self._inFlight.values()):
            attempt.cancel()

    def checkAll(self) -> None:
        for target in list(self.tracker.states):
            if target not in self._inFlight:
                self._check(target)

    def _check(self, target: Target) -> None:
        attempt = self._endpointFactory(self.reactor, target).connect(self._probes)
        attempt.addTimeout(self.config.timeout, self.reactor)
        self._inFlight[target] = attempt

        def passed(protocol: Protocol) -> None:
            self._inFlight.pop(target, None)
            self.tracker.checkSucceeded(target)

        def failed(reason: Failure) -> None:
            self._inFlight.pop(target, None)
            if self._loop.running:
                self.tracker.checkFailed(target, describeFailure(reason, self.config.timeout))

        attempt.addCallbacks(passed, failed)
