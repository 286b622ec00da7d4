"""
Which of an app's targets are worth trying: a health state per target,
fed passively by the dialer (every client connect is a check) and actively
by a periodic TCP connect when the app has a C{HealthCheck}.

  - Passive: a failed connect marks the target down at once.  It is then
    offered to clients again after a back-off that grows with each
    failure in a row (L{twisted.application.internet.backoffPolicy}), and
    the first client that actually dials it takes the retry, so a dead
    target costs one failed attempt per back-off period, not one per
    client.  A successful connect marks it up.

    The dialer tells every attempt: L{HealthTracker.attemptStarted} when
    it dials (which returns a token), then L{HealthTracker.connectFailed}
    with that token, or L{HealthTracker.connectSucceeded}.  The token makes
    the attempts already under way when the target went down count once:
    20 dials in flight to a target that stops answering are one failure
    (the target is down), not 20 steps of back-off.

  - Active: C{Fall} failed checks in a row mark a target down, C{Rise}
    successful ones bring it back.  A target the checks found down is left
    to the checks: clients do not try it.

The balancer asks L{HealthTracker.usable} for the targets to rotate over;
when none is usable it tries them all (fail open): a proxy that refuses
every client because its checks are wrong is worse than one that tries.

  - Drained, by an operator (L{HealthTracker.drain}, from the admin
    endpoint; HAProxy's C{set server state drain}): a target that gets no
    new client, up or down, whatever the checks say, until it is made
    ready again (L{HealthTracker.ready}) or leaves the configuration.  Its
    open connections go on.  Failing open never reaches a drained target:
    an operator's word is not a guess.

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
DRAINING = "draining"
STOPPED = "stopped"
DEFAULT_RISE = 2
DEFAULT_FALL = 3
"""
C{Rise} and C{Fall} without a C{HealthCheck} (HAProxy's defaults are 2 and 3).
"""


class TargetHealth:
    """
    The state of one target.

    @ivar up: whether clients are sent to it.
    @ivar successes: active checks passed in a row.
    @ivar failures: active checks failed in a row.
    @ivar attempts: client connects failed in a row (the back-off step),
        each counted once (see L{epoch}).
    @ivar retryAt: when a down target is next offered to a client;
        infinity when only the active checks may bring it back.
    @ivar epoch: bumped whenever a failure is counted or the target comes
        up: an attempt started in an earlier epoch has nothing new to say
        when it fails.
    @ivar drained: an operator took it out of rotation (L{HealthTracker.drain}).
    @ivar stopped: scaled to zero (L{tcpproxy.scaling}): not checked, not
        down, and offered to no client until it is woken.
    """

    def __init__(self) -> None:
        self.drained = False
        self.stopped = False
        self.up = True
        self.successes = 0
        self.failures = 0
        self.attempts = 0
        self.retryAt = 0.0
        self.epoch = 0


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
        rise: int = DEFAULT_RISE,
        fall: int = DEFAULT_FALL,
        policy: Callable[[int], float] | None = None,
    ) -> None:
        self.app = app
        self.clock = clock
        self.rise = rise
        self.fall = fall
        self.policy = policy if policy is not None else backoffPolicy()
        self.states: dict[Target, TargetHealth] = {}
        self._down: set[Target] = set()
        self._drained: set[Target] = set()
        self.stopped: set[Target] = set()
        # When each target that came back up did (not at start-up): what
        # a balancer's slow start ramps from.
        self.recoveredAt: dict[Target, float] = {}
        self.update(app, targets, rise, fall)

    def update(self, app: str, targets: Sequence[Target], rise: int, fall: int) -> None:
        """
        New settings (a reload): targets that stay keep their state (a
        drained one stays drained).
        """
        self.app = app
        self.rise = rise
        self.fall = fall
        self.states = {t: self.states.get(t) or TargetHealth() for t in targets}
        self._down = {t for t, state in self.states.items() if not state.up}
        self._drained = {t for t, state in self.states.items() if state.drained}
        self.stopped = {t for t, state in self.states.items() if state.stopped}
        self.recoveredAt = {t: when for t, when in self.recoveredAt.items() if t in self.states}

    def isUp(self, target: Target) -> bool:
        state = self.states.get(target)
        return state is None or state.up

    def stateOf(self, target: Target) -> str:
        """
        L{STOPPED}, L{DRAINING}, L{UP} or L{DOWN}: what the status page shows.
        """
        state = self.states.get(target)
        if state is None:
            return UP
        if state.stopped:
            return STOPPED
        if state.drained:
            return DRAINING
        return UP if state.up else DOWN

    @property
    def allUsable(self) -> bool:
        """
        Whether every target is up and none drained: L{usable} keeps all.
        """
        return not self._down and not self._drained and not self.stopped

    @property
    def allDrained(self) -> bool:
        """
        Whether every target is drained: the app has nowhere to send a client.
        """
        drained = self._drained
        return bool(drained) and len(drained) == len(self.states)

    # Runtime control, from the admin endpoint.

    def drain(self, target: Target, why: str) -> bool:
        """
        Send C{target} no new client until L{ready}; logged, with C{why}.

        @return: whether it changed (it was not drained already).
        @raise KeyError: C{target} is not one of the app's.
        """
        return self._setDrained(target, True, why)

    def ready(self, target: Target, why: str) -> bool:
        """
        Put a drained C{target} back in rotation (the checks still decide
        whether it is up); logged, with C{why}.

        @return: whether it changed (it was drained).
        @raise KeyError: C{target} is not one of the app's.
        """
        return self._setDrained(target, False, why)

    def setStopped(self, target: Target, stopped: bool) -> None:
        """
        Mark C{target} stopped (its C{Stop} ran: no client is sent to it,
        no check runs, it is not down) or running again (it accepted a
        connection after its C{Start}), for L{tcpproxy.scaling}, which logs
        why.  A stopped target that comes back is up, with no failure
        counted while it was stopped.
        """
        state = self.states.get(target)
        if state is None:
            return
        state.stopped = stopped
        if stopped:
            self.stopped.add(target)
        else:
            self.stopped.discard(target)
            state.attempts = state.failures = 0
            state.epoch += 1
            if not state.up:
                state.up = True
                self._down.discard(target)

    def _setDrained(self, target: Target, drained: bool, why: str) -> bool:
        state = self.states[target]
        if state.drained == drained:
            return False
        state.drained = drained
        if drained:
            self._drained.add(target)
        else:
            self._drained.discard(target)
        (self.log.warn if drained else self.log.info)(
            "app {app}: target {target} is {state}: {why}",
            app=self.app,
            target=str(target),
            state=DRAINING if drained else "ready",
            why=why,
        )
        return True

    def usable(self, targets: Sequence[Target], failOpen: bool = True) -> list[Target]:
        """
        The targets of C{targets} (in that order) a client may try now: the
        ones up, and a down one whose back-off is over (until a client
        actually dials it: L{attemptStarted}).  All of them if none is
        usable (fail open), but for the drained ones, which are never
        usable.  Nothing changes here: a client that connects to its first
        choice leaves the retry of a later one to the next client.

        @param failOpen: C{False} to get an empty list when none is usable
            (a balancer first looks for usable backup targets).
        """
        if not self._down and not self._drained and not self.stopped:
            return list(targets)
        drained = self._drained
        if drained or self.stopped:
            stopped = self.stopped
            targets = [target for target in targets if target not in drained and target not in stopped]
        now = self.clock.seconds()
        usable = []
        for target in targets:
            state = self.states.get(target)
            if state is None or state.up or now >= state.retryAt:
                usable.append(target)
        return usable or (list(targets) if failOpen else usable)

    # Passive checks, from the dialer.

    def attemptStarted(self, target: Target) -> int:
        """
        A client is dialling C{target} now.  Call it for every real dial,
        just before the connect, and pass what it returns to
        L{connectFailed}.

        If the target is down and its back-off is over, this dial is its
        retry: it is offered to no other client until the outcome is known,
        or, if the dial is abandoned (the client left), until the next
        back-off period is over.

        @return: a token: which failures in a row the attempt started after.
        """
        state = self.states.get(target)
        if state is None:
            return 0
        if not state.up and math.isfinite(state.retryAt):
            now = self.clock.seconds()
            if now >= state.retryAt:
                state.retryAt = now + self.policy(state.attempts)
        return state.epoch

    def connectSucceeded(self, target: Target) -> None:
        """
        A dial of C{target} connected: it is up, its back-off starts over.
        """
        state = self.states.get(target)
        if state is None:
            return
        state.attempts = 0
        if not state.up:
            self._change(target, state, True, "a client connected to it")

    def connectFailed(self, target: Target, why: str, token: int | None = None) -> None:
        """
        A dial of C{target} failed because of the target (not for want of a
        socket here), for the reason C{why} (a few words, for the log).

        Counted only if nothing was counted since the attempt started
        (C{token} is still the target's epoch): the first failure marks the
        target down; a failed retry lengthens its back-off.  Attempts that
        were already under way fail for the reason already counted, and do
        not lengthen it again.  Each counted failure is logged with the
        real time to the next try.

        @param token: what L{attemptStarted} returned for this attempt.
            C{None}, from a caller that does not report its dials, counts
            the failure if it could be a retry: the target is up, or its
            back-off is over.
        """
        state = self.states.get(target)
        if state is None or state.stopped:
            # A stopped target refuses until woken: that is not a failure.
            return
        now = self.clock.seconds()
        if token is None:
            if not state.up and now < state.retryAt:
                return
        elif token != state.epoch:
            return
        delay = self.policy(state.attempts)
        state.attempts += 1
        if math.isfinite(state.retryAt) or state.up:
            state.retryAt = now + delay
            next = f"next try in {delay:.1f}s"
        else:
            next = "the active checks decide when it is back"
        if state.up:
            self._change(target, state, False, f"connect failed ({why}); {next}")
        else:
            state.epoch += 1
            self.log.info(
                "app {app}: target {target} is still down: connect failed ({why}); {next}",
                app=self.app,
                target=str(target),
                why=why,
                next=next,
            )

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
        if state is None or state.stopped:
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
        state.epoch += 1  # what was under way before says nothing of the new state
        if up:
            self._down.discard(target)
            self.recoveredAt[target] = self.clock.seconds()
        else:
            self._down.add(target)
            self.recoveredAt.pop(target, None)
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
        stopped = self.tracker.stopped
        for target in list(self.tracker.states):
            if target not in self._inFlight and target not in stopped:
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
