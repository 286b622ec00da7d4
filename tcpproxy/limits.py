"""
Fairness between clients: who may connect (allow/deny lists), how many at
once (per app, per client address, for the whole proxy), how fast each
connection may go (a token bucket), and the process's descriptor limit.

Nothing here touches a socket: the relay and the service ask these objects
and act on their answers, so the arithmetic is tested on a L{Clock}.
"""

from __future__ import annotations

import ipaddress
import os
import resource
from collections import Counter
from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from tcpproxy.config import Network

# Why a new client was refused, as logged and counted.
REFUSED_DENIED = "denied"
REFUSED_APP_LIMIT = "MaxConnections"
REFUSED_CLIENT_LIMIT = "MaxConnectionsPerClient"


def clientAddress(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    The address of a client as the access lists see it: an IPv4 client on
    a dual-stack socket (C{::ffff:10.0.0.1}) is the IPv4 address it is.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def permitted(host: str, allow: Sequence[Network], deny: Sequence[Network]) -> bool:
    """
    Whether a client at C{host} may connect: it must be in a network of
    C{allow} (when that is not empty) and in none of C{deny}.  An address
    that is not an IP address (a UNIX socket) matches no network.
    """
    if not allow and not deny:
        return True
    address = clientAddress(host)
    if allow and not any(address in network for network in allow if address is not None):
        return False
    return address is None or not any(address in network for network in deny)


class ConnectionCounter:
    """
    An app's open connections, in all and per client address.

    A connection is counted from L{tryOpen} until L{close}, whatever way it
    ends (refused target, reset, idle timeout): the relay closes exactly
    what it opened, so the counts return to zero.

    @ivar refusals: how many clients were refused, by reason.
    @ivar opened: how many connections were counted in, ever.
    """

    def __init__(self) -> None:
        self.opened = 0
        self.total = 0
        self.perClient: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()

    def tryOpen(self, host: str, maxTotal: int | None, maxPerClient: int | None) -> str | None:
        """
        Count a new connection from C{host}, if the limits allow it.

        @return: C{None} if it was counted, else the reason it was refused
            (L{REFUSED_APP_LIMIT} or L{REFUSED_CLIENT_LIMIT}), itself counted.
        """
        reason = None
        if maxTotal is not None and self.total >= maxTotal:
            reason = REFUSED_APP_LIMIT
        elif maxPerClient is not None and self.perClient[host] >= maxPerClient:
            reason = REFUSED_CLIENT_LIMIT
        if reason is not None:
            self.refusals[reason] += 1
            return reason
        self.opened += 1
        self.total += 1
        self.perClient[host] += 1
        return None

    def close(self, host: str) -> None:
        self.total -= 1
        self.perClient[host] -= 1
        if self.perClient[host] <= 0:
            del self.perClient[host]


class AcceptGate:
    """
    The proxy-wide connection limit: at C{maximum} open connections every
    listening port stops reading, so new clients wait in the kernel's
    backlog (not refused); below it again, the ports read again.

    The limit is the top-level C{MaxConnections}, or what the descriptor
    limit allows (L{descriptorBudget}) if that is lower: a client accepted
    with no descriptor left to dial its target with could only be closed,
    while one left in the backlog is served once a connection ends (as
    HAProxy derives its C{maxconn} from the descriptor limit).

    Descriptors held outside the clients' connections -- a warm pool's
    idle connections and its dials under way (L{tcpproxy.pool}), one each
    -- count against the descriptor budget too (L{holdDescriptor}), not
    against C{MaxConnections}, which is about clients: with them, the
    gate closes as soon as one more client (L{DESCRIPTORS_PER_CONNECTION}
    descriptors) would not fit, and a holder asks L{roomToHold} first so
    that it never takes the last client's place.

    A L{tcpproxy.listening.SocketPort} looks at its reading state before
    each accept, so the count does not pass C{maximum}.

    @ivar configured: the top-level C{MaxConnections}, or C{None}.
    @ivar budget: the connections the descriptor limit allows, or C{None}.
    @ivar maximum: the lower of the two, or C{None} for no limit.
    @ivar heldDescriptors: descriptors held outside clients' connections.
    @ivar ports: returns the listening ports to stop and restart.
    """

    log = Logger()

    SETTLE = 1.0
    """
    Seconds the gate must stay open after reaching the limit before that is
    logged as over: at the limit, every connection that ends lets one more
    in and closes the gate again, and one line for each would flood the log.
    """

    def __init__(
        self, maximum: int | None, ports: Callable[[], Sequence], clock: IReactorTime | None = None
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._saturated = False
        self._closedSince = 0
        self._settle: IDelayedCall | None = None
        self.configured = maximum
        self.budget: int | None = None
        self.maximum = maximum
        self.ports = ports
        self.count = 0
        self.heldDescriptors = 0
        self.paused = False
        self.pauses = 0

    def connectionOpened(self) -> None:
        self.count += 1
        self._check()

    def connectionClosed(self) -> None:
        self.count -= 1
        self._check()

    def holdDescriptor(self) -> None:
        """
        One more descriptor is held outside clients' connections (a warm
        pool's connection, from its dial on).
        """
        self.heldDescriptors += 1
        self._check()

    def releaseDescriptor(self) -> None:
        """
        A descriptor counted by L{holdDescriptor} is closed, or is now a
        client's (a pooled connection handed to one, counted in its
        connection's L{DESCRIPTORS_PER_CONNECTION}).
        """
        self.heldDescriptors -= 1
        self._check()

    def roomToHold(self) -> bool:
        """
        Whether one more descriptor may be held and still leave room, under
        the descriptor budget, for one more client's connection.
        """
        if self.budget is None:
            return True
        used = DESCRIPTORS_PER_CONNECTION * (self.count + 1) + self.heldDescriptors + 1
        return used <= DESCRIPTORS_PER_CONNECTION * self.budget

    def _full(self) -> bool:
        """
        Whether no client may be accepted now: C{MaxConnections} clients are
        open, or one more would pass the descriptor budget.
        """
        if self.configured is not None and self.count >= self.configured:
            return True
        if self.budget is None:
            return False
        used = DESCRIPTORS_PER_CONNECTION * (self.count + 1) + self.heldDescriptors
        return used > DESCRIPTORS_PER_CONNECTION * self.budget

    def setMaximum(self, maximum: int | None) -> None:
        """
        A new top-level C{MaxConnections} (C{None}: none).
        """
        self.configured = maximum
        self._update()

    def setBudget(self, budget: int | None) -> None:
        """
        The connections the descriptor limit allows (C{None}: no bound).
        """
        self.budget = budget
        self._update()

    def _update(self) -> None:
        limits = [m for m in (self.configured, self.budget) if m is not None]
        self.maximum = min(limits) if limits else None
        self._check()

    def _limitName(self) -> str:
        held = self.heldDescriptors
        heldConnections = -(-held // DESCRIPTORS_PER_CONNECTION)
        if self.configured is not None and (
            self.budget is None or self.configured <= self.budget - heldConnections
        ):
            return f"MaxConnections {self.configured}"
        return f"the descriptor limit's {self.budget} connections" + (
            f" ({held} descriptor(s) held by warm pools)" if held else ""
        )

    def portAdded(self, port) -> None:
        """
        A port that starts listening while the gate is closed waits too.
        """
        if self.paused:
            port.stopReading()

    def _check(self) -> None:
        full = self._full()
        if full and not self.paused:
            self.paused = True
            self.pauses += 1
            for port in self.ports():
                port.stopReading()
            if self._saturated:
                self._closedSince += 1  # still the episode already logged
                return
            self._saturated = True
            self._closedSince = 0
            self.log.warn(
                "{limit} reached: not accepting new clients until a connection ends",
                limit=self._limitName(),
                maximum=self.maximum,
                open=self.count,
            )
        elif not full and self.paused:
            self.paused = False
            for port in self.ports():
                port.startReading()
            if self._saturated and self._settle is None:
                self._settle = self._clock.callLater(self.SETTLE, self._settled)

    def _settled(self) -> None:
        """
        The gate opened L{SETTLE} seconds ago: if it is still open, the
        episode at the limit is over, and logged as such.
        """
        self._settle = None
        if self.paused:
            return  # closed again meanwhile: the episode goes on
        self._saturated = False
        self.log.info(
            "below {limit} again ({open} open): accepting new clients"
            + (" (the limit was reached {closed} more time(s) meanwhile)" if self._closedSince else ""),
            limit=self._limitName(),
            maximum=self.maximum,
            open=self.count,
            closed=self._closedSince,
        )

    def stop(self) -> None:
        """
        The proxy stops: no log line is due.
        """
        if self._settle is not None and self._settle.active():
            self._settle.cancel()
        self._settle = None


class TokenBucket:
    """
    Bytes per second, with a burst of C{capacity} bytes.

    Taking never fails: the bucket goes into debt, and L{take} says how
    long to wait until it is out of debt.  Reads come in chunks of up to
    64 KiB whatever the rate, so refusing a chunk is not an option; pausing
    the reader for the debt keeps the average rate exact.
    """

    def __init__(self, rate: float, clock: IReactorTime, capacity: float | None = None) -> None:
        self.rate = rate
        # A twentieth of a second's worth: bursts stay small next to a
        # measurement over a few seconds.
        self.capacity = capacity if capacity is not None else max(rate / 20, 1.0)
        self.clock = clock
        self.tokens = self.capacity
        self._last = clock.seconds()

    def take(self, amount: int) -> float:
        """
        Spend C{amount} bytes' worth.

        @return: seconds until the bucket is no longer in debt (0 if it is not).
        """
        now = self.clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate) - amount
        self._last = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


MIN_READ = 1024
"""
The smallest read size a bandwidth limit sets on a transport, so that a
low limit does not mean a system call per few bytes.
"""

BACKPRESSURE = "backpressure"
BUCKET = "bucket"


@implementer(IPushProducer)
class Throttle:
    """
    The producer a relay registers with a consumer transport in place of the
    reading transport, when the connection has a bandwidth limit.

    The reading transport may be paused for two reasons: the consumer's
    buffer is full (backpressure: the consumer calls L{pauseProducing}) or
    the bucket is in debt.  It is resumed only when neither holds, so that
    the end of one never undoes the other.  (Twisted's C{ThrottlingProtocol}
    pauses the same transport as backpressure does, and either one's resume
    undoes the other's pause.)

    @ivar reasons: why the transport is paused now.
    """

    def __init__(self, producer: IPushProducer, bucket: TokenBucket, reader=None) -> None:
        """
        @param reader: the transport that reads from the socket, whose read
            size (C{bufferSize}, bytes) is capped: C{producer} itself unless
            given; for a TLS transport, which has no read size of its own,
            the TCP transport under it.
        """
        self.producer = producer
        self.bucket = bucket
        reader = producer if reader is None else reader
        if isinstance(getattr(reader, "bufferSize", None), int):
            # A TCP transport reads up to 64 KiB at once, and a chunk already
            # read is relayed whole: at 100 kB/s that is a burst of 0.6 s
            # above the rate.  Reads of about the bucket's size keep the
            # burst to the bucket's (and to a TLS record, 16 KiB, under TLS).
            reader.bufferSize = min(reader.bufferSize, max(int(bucket.capacity), MIN_READ))
        self.reasons: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._stopped = False

    def pauseProducing(self) -> None:
        self._pause(BACKPRESSURE)

    def resumeProducing(self) -> None:
        self._resume(BACKPRESSURE)

    def stopProducing(self) -> None:
        self.stop()
        self.producer.stopProducing()

    def consumed(self, amount: int) -> None:
        """
        C{amount} bytes were read from the producer.
        """
        delay = self.bucket.take(amount)
        if delay and self._timer is None and not self._stopped:
            self._pause(BUCKET)
            self._timer = self.bucket.clock.callLater(delay, self._refilled)

    def _refilled(self) -> None:
        self._timer = None
        delay = self.bucket.take(0)
        if delay:
            self._timer = self.bucket.clock.callLater(delay, self._refilled)
        else:
            self._resume(BUCKET)

    def stop(self) -> None:
        """
        The producer is done (EOF or closed): never pause or resume it again.
        """
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause(self, reason: str) -> None:
        if self._stopped:
            return
        if not self.reasons:
            self.producer.pauseProducing()
        self.reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if self._stopped or reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons:
            self.producer.resumeProducing()


DESCRIPTORS_PER_CONNECTION = 2
"""
A relayed connection holds its client's socket and its target's.  (A
direction that splices holds a pipe too, when descriptors allow; without
them it copies instead.)
"""

DESCRIPTOR_MARGIN = 4
"""
Descriptors kept for what else the proxy opens while it runs: health
checks, DNS queries, a reload's new listening sockets, the log.
"""


def descriptorBudget(limit: int, inUse: int, margin: int = DESCRIPTOR_MARGIN) -> int:
    """
    How many connections C{limit} descriptors allow, with C{inUse} open
    already (listening sockets, the reactor's own) and C{margin} kept.

    @return: at least 1, so a proxy started with too few descriptors still
        serves one client at a time rather than none.
    """
    return max(1, (limit - inUse - margin) // DESCRIPTORS_PER_CONNECTION)


def openDescriptors() -> int | None:
    """
    How many descriptors this process has open (Linux's C{/proc}), or
    C{None} where that cannot be known.
    """
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def raiseFileLimit(log: Logger, getrlimit=resource.getrlimit, setrlimit=resource.setrlimit) -> int:
    """
    Raise the soft limit on open descriptors to the hard limit, and log it:
    every relayed connection holds two, and the default soft limit (often
    1024) would cap the proxy near 500 connections.

    @return: the soft limit in force afterwards.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        log.info("open file limit: {soft} (hard limit {hard})", soft=soft, hard=hard)
        return soft
    try:
        setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        log.warn(
            "open file limit stays at {soft}: cannot raise it to {hard}: {error}",
            soft=soft,
            hard=hard,
            error=e,
        )
        return soft
    log.info("open file limit raised from {old} to {soft}", old=soft, soft=hard)
    return hard
