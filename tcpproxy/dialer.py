"""
Reaching a target: one client endpoint per target, tried in the order the
balancer gave, each attempt bounded by a connect timeout.

The dialer knows nothing of round-robin (the order comes in) nor of relaying
(the protocol factory comes in): it turns "these targets, in this order" into
one connected protocol, or into one failure that lists every target's reason.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from tcpproxy.config import IPV4, IPV6, Target
from tcpproxy.deadlines import Deadlines, IExpiring
from tcpproxy.tls import TLSHandshakeFailed


def endpointForTarget(reactor: IReactorTCP, target: Target) -> IStreamClientEndpoint:
    """
    The client endpoint that reaches C{target}.

    IP literals get a plain TCP endpoint of their family; a hostname gets a
    L{HostnameEndpoint}, which resolves on every connect (so DNS changes are
    followed) and tries IPv6 and IPv4 addresses alike.

    The endpoints get no timeout of their own (C{None}: the connector sets
    no timer): whoever connects through them bounds the whole attempt
    (lookup, handshake, TLS) with a deadline of theirs and cancels it,
    which aborts the connect (the dialer's C{ConnectTimeout}, a health
    check's timeout).  A second, longer timer would be one more to set
    and cancel for every connection, to no effect.
    """
    if target.kind == IPV4:
        return TCP4ClientEndpoint(reactor, target.host, target.port, timeout=None)
    if target.kind == IPV6:
        return TCP6ClientEndpoint(reactor, target.host, target.port, timeout=None)
    return HostnameEndpoint(reactor, target.host.encode("idna"), target.port, timeout=None)


def describeFailure(reason: Failure, timeout: float) -> str:
    """
    Say in a few words why a connect attempt failed, for the log.
    """
    if reason.check(error.ConnectionRefusedError):
        return describeError(errno.ECONNREFUSED, timeout)
    # Our deadline cancels the attempt: endpoints report that as
    # ConnectingCancelledError rather than as a timeout.
    if reason.check(defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError):
        return describeError(errno.ETIMEDOUT, timeout)
    if reason.check(error.DNSLookupError):
        return "hostname did not resolve"
    if reason.check(error.NoRouteError):
        return describeError(errno.EHOSTUNREACH, timeout)
    if reason.check(error.ConnectBindError):
        # No socket could be made here: the proxy's own trouble, not the target's.
        code = reason.value.osError
        if code in OWN_ERRORS:
            return describeError(code, timeout)
        return f"no socket could be made: {os.strerror(code) if isinstance(code, int) else code}"
    return reason.getErrorMessage() or reason.type.__name__


def failureKind(reason: Failure, expired: bool) -> str:
    """
    The kind of a failed connect, for the metrics' C{reason} label:
    C{refused}, C{timeout} (C{expired}: cut short by the connect timeout),
    C{unreachable}, C{dns}, C{tls} (the handshake with the target failed)
    or C{reset} (the connection was lost while it was being made).
    """
    if expired or reason.check(defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError):
        return "timeout"
    if reason.check(error.ConnectionRefusedError):
        return "refused"
    if reason.check(error.DNSLookupError):
        return "dns"
    if reason.check(error.NoRouteError):
        return "unreachable"
    if reason.check(TLSHandshakeFailed):
        return "tls"
    if reason.check(error.ConnectError) and reason.value.osError in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "reset"


OWN_ERRORS = frozenset((errno.EMFILE, errno.ENFILE))
"""
Connect errors that are the proxy's own trouble and say nothing of the
target (so they do not count against its health).
"""


def describeError(code: int, timeout: float) -> str:
    """
    Say in a few words what the connect error C{code} (an C{errno}) means,
    for the log: the words L{describeFailure} uses for the same failure.
    """
    if code == errno.ECONNREFUSED:
        return "connection refused"
    if code == errno.ETIMEDOUT:
        return f"no answer within {timeout:g}s"
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to host"
    if code in OWN_ERRORS:
        return "the proxy is out of file descriptors"
    return os.strerror(code)


class NoTargetAvailable(Exception):
    """
    Every target of the list failed to connect.

    @ivar failures: C{(target, reason text)} for each target, in the order tried.
    """

    def __init__(self, failures: Sequence[tuple[Target, str]]) -> None:
        super().__init__(failures)
        self.failures = failures

    def __str__(self) -> str:
        if not self.failures:
            return "no target to try"
        reasons = "; ".join(f"{target}: {reason}" for target, reason in self.failures)
        return f"all {len(self.failures)} targets failed: {reasons}"


@dataclass
class Dialled:
    """
    The outcome of a successful dial.

    @ivar target: the target that answered.
    @ivar protocol: the protocol connected to it.
    @ivar failures: C{(target, reason text)} of the targets tried before it.
    @ivar early: bytes the target sent before a client was paired with the
        connection (a pooled one, L{tcpproxy.pool}): the client gets them first.
    """

    target: Target
    protocol: IProtocol
    failures: Sequence[tuple[Target, str]] = ()
    early: bytes = b""


class IDialer(Interface):
    """
    Connects a protocol to the first target, of an ordered list, that answers.
    """

    def dial(protocolFactory: IProtocolFactory, targets: Iterable[Target]) -> Deferred[Dialled]:
        """
        Try C{targets} one after the other until one connects.

        @return: a L{Deferred} firing with a L{Dialled}, or failing with
            L{NoTargetAvailable}.  Cancelling it abandons the attempt under
            way and tries no further target.
        """


@implementer(IExpiring)
class _FailoverAttempt:
    """
    One client's walk along the target list.

    A class rather than closures because cancellation must be seen before the
    cancelled attempt's errback runs, or that errback would dial the next target.

    @ivar timedOut: the attempt under way was cancelled by its deadline.
    """

    _expired = False

    def __init__(
        self,
        dialer: FailoverDialer,
        protocolFactory: IProtocolFactory,
        targets: Iterator[Target],
    ) -> None:
        self._dialer = dialer
        self._protocolFactory = protocolFactory
        self._targets = targets
        # A tuple, grown only by a failure: most dials fail nowhere, and the
        # relay keeps what this is for the life of its connection.
        self._failures: tuple[tuple[Target, str], ...] = ()
        self._current: Deferred | None = None
        self._cancelled = False
        self.result: Deferred[Dialled] = Deferred(self._cancel)
        self._next()

    def _next(self) -> None:
        target = next(self._targets, None)
        if target is None:
            self.result.errback(NoTargetAvailable(self._failures))
            return
        health = self._dialer.health
        token = health.attemptStarted(target) if health is not None else None
        self._began = self._dialer.clock.seconds()
        attempt = self._dialer.endpointFor(target).connect(self._protocolFactory)
        self._current = attempt
        if not attempt.called:
            self._dialer.deadlines.add(self, self._dialer.timeout)
        attempt.addCallbacks(
            self._connected, self._failed, callbackArgs=(target,), errbackArgs=(target, token)
        )

    def timedOut(self) -> None:
        """
        The attempt under way took longer than the dialer's timeout.
        """
        self._expired = True
        self._current.cancel()

    def _settled(self) -> None:
        self._current = None
        self._dialer.deadlines.remove(self, self._dialer.timeout)

    def _connected(self, protocol: IProtocol, target: Target) -> None:
        self._settled()
        if self._dialer.health is not None:
            self._dialer.health.connectSucceeded(target)
        if self._dialer.stats is not None:
            self._dialer.stats.connected(target, self._dialer.clock.seconds() - self._began)
        self.result.callback(Dialled(target, protocol, self._failures))

    def _failed(self, reason: Failure, target: Target, token: int | None) -> None:
        self._settled()
        if self._cancelled:
            reason.trap(CancelledError, error.ConnectingCancelledError)
            return
        expired = self._expired
        if expired:
            # Cut short by our deadline, whatever the stage (a lookup, the
            # TCP handshake, TLS): a timeout, not what the cancel raised.
            self._expired = False
            why = describeError(errno.ETIMEDOUT, self._dialer.timeout)
        else:
            why = describeFailure(reason, self._dialer.timeout)
        self._failures += ((target, why),)
        if self._dialer.stats is not None and not reason.check(error.ConnectBindError):
            self._dialer.stats.failed(target, failureKind(reason, expired), why, self._dialer.clock.seconds())
        if self._dialer.health is not None and not reason.check(error.ConnectBindError):
            # A socket the proxy could not make says nothing of the target.
            self._dialer.health.connectFailed(target, why, token)
        self._next()

    def _cancel(self, result: Deferred[Dialled]) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()


@implementer(IDialer)
class FailoverDialer:
    """
    Dial targets through one cached client endpoint each, with failover.

    @ivar timeout: seconds each attempt may take before the next target is
        tried; it covers name resolution as well as the TCP handshake.
    @ivar health: told of every attempt's outcome (passive health checks),
        if not C{None}: a L{tcpproxy.health.HealthTracker}.
    @ivar stats: told of every attempt's outcome too (its time, or the kind
        of failure), if not C{None}: a L{tcpproxy.metrics.AppStats}.
    """

    health = None
    stats = None

    def __init__(
        self,
        reactor: IReactorTCP,
        timeout: float,
        clock: IReactorTime | None = None,
        endpointFactory: Callable[[IReactorTCP, Target], IStreamClientEndpoint] = endpointForTarget,
        health=None,
        stats=None,
    ) -> None:
        self.health = health
        self.stats = stats
        self._reactor = reactor
        self.timeout = timeout
        self.clock = clock if clock is not None else reactor
        self.deadlines = Deadlines(self.clock)
        self._endpointFactory = endpointFactory
        self._endpoints: dict[Target, IStreamClientEndpoint] = {}

    def endpointFor(self, target: Target) -> IStreamClientEndpoint:
        endpoint = self._endpoints.get(target)
        if endpoint is None:
            endpoint = self._endpoints[target] = self._endpointFactory(self._reactor, target)
        return endpoint

    def dial(self, protocolFactory: IProtocolFactory, targets: Iterable[Target]) -> Deferred[Dialled]:
        return _FailoverAttempt(self, protocolFactory, iter(targets)).result
