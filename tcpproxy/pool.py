"""
A warm pool of target connections (an app's C{"Pool"} key): connections
opened to each target before a client needs them, so that a new client is
paired with a ready one at once instead of waiting for a dial (a round
trip to the target, more with TLS towards it).

The pool is a dialer (L{IDialer}) in front of the app's own one: a client's
dial walks the balancer's order and takes an idle pooled connection of the
first target that has one; with none, the dial goes on to the real dialer,
as without a pool.  The pool fills itself through that same dialer, one
target at a time, so its dials are bounded by C{ConnectTimeout} and counted
in the targets' health and metrics like any other.

A pooled connection is a L{ProxyClientProtocol} not yet paired.  What the
target sends before a client takes it (the greeting of a server-first
protocol: SSH, SMTP, MySQL) is held, bounded as a client's bytes are during
a dial (L{tcpproxy.relay.PREDIAL_BUFFER}), and handed over with it
(L{Dialled.early}): the client gets it first, exactly.  A pooled connection
the target closed, reset or that failed is dropped as soon as the reactor
says so, and is looked at once more (a non-blocking peek at its socket,
under the TLS layer with C{TargetTLS}) before it is handed out, so that a
client is never given a dead one (L{PooledClientProtocol.alive}).

The pool's connections, idle or being dialled, count with the clients'
against a target's C{MaxConnections} (a client that needs a slot they
hold gets it: L{WarmPool._makeRoom}), and against the proxy's descriptor
budget (L{tcpproxy.limits.AcceptGate.holdDescriptor}), each holding a
descriptor until it is closed or handed to a client.  Their hits, misses
and drops are counted in the app's L{tcpproxy.metrics.AppStats}.

Envoy's "preconnect" is the same idea for its upstream clusters; HAProxy,
nginx stream and Traefik have none for TCP.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IReactorTime,
    ISSLTransport,
    ISystemHandle,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpproxy.config import PoolConfig, Target
from tcpproxy.dialer import Dialled, IDialer
from tcpproxy.health import UP
from tcpproxy.limits import AcceptGate
from tcpproxy.relay import PREDIAL_BUFFER, ProxyClientProtocol
from tcpproxy.tls import TLSCloser

REFILL_INTERVAL = 1.0
"""
Seconds between two looks at every target's pool: a target that came up
(or whose pooled dial failed) is filled again at the next look.
"""


class PooledClientProtocol(ProxyClientProtocol):
    """
    A connection to a target opened by the pool: until a client takes it,
    what the target sends is held (L{early}), and its end drops it from
    the pool; once paired it is a L{ProxyClientProtocol} like any other.

    @ivar pool: the L{WarmPool} that keeps it while it is idle.
    @ivar early: the bytes the target sent while it was idle.
    @ivar earlySize: their length.
    @ivar expiry: the call that closes it after C{MaxIdle}, while idle.
    @ivar target: the target it is connected to.
    @ivar gate: the L{AcceptGate} that counts its descriptor as the pool's
        (until it is closed, or handed to a client), or C{None}.
    @ivar pooledAt: when it joined the pool (the clock's seconds).
    """

    __slots__ = ("pool", "early", "earlySize", "expiry", "target", "gate", "pooledAt")

    def __init__(self) -> None:
        ProxyClientProtocol.__init__(self)
        self.pool: WarmPool | None = None
        self.early: list[bytes] = []
        self.earlySize = 0
        self.expiry: IDelayedCall | None = None
        self.target: Target | None = None
        self.gate: AcceptGate | None = None
        self.pooledAt = 0.0

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            ProxyClientProtocol.dataReceived(self, data)
            return
        self.received += len(data)
        self.early.append(data)
        self.earlySize += len(data)
        if self.earlySize >= PREDIAL_BUFFER:
            # Bounded as a client's bytes are during a dial.
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            ProxyClientProtocol.readConnectionLost(self)
            return
        # The target ended it while idle: no client may have it.
        self.readDone = True
        if self.pool is not None:
            self.pool.dropped(self)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self.relay is not None:
            ProxyClientProtocol.connectionLost(self, reason)
            return
        self.closed = True
        if self.closing is not None:
            self.closing.cancel()
        self.releaseDescriptor()
        if self.pool is not None:
            self.pool.lost(self)

    def releaseDescriptor(self) -> None:
        """
        Its descriptor is no longer the pool's to count: it is closed, or
        a client's.
        """
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.releaseDescriptor()

    def alive(self) -> bool | None:
        """
        Whether this idle connection may be given to a client, as far as
        the reactor knows and as its socket says (a peek that takes
        nothing, C{MSG_PEEK}): C{False} if it ended, or if an end (EOF) or
        a reset waits unread in the socket; C{True} if nothing waits there,
        or data does.

        Over TLS the socket is the one under the TLS layer (its
        C{transport}), and bytes waiting there may be the target's
        C{close_notify} as well as data: only the TLS layer can tell, once
        the reactor has had it read them.  The answer is then C{None}, not
        known yet: the connection is not handed out, and is left in the
        pool for the TLS layer to read what came (and drop it, if that was
        the target's close).  Unless it is paused with a full greeting held
        (L{PREDIAL_BUFFER}): more of the greeting is what waits.
        """
        if self.closed or self.readDone:
            return False
        transport = self.transport
        tls = ISSLTransport.providedBy(transport)
        under = getattr(transport, "transport", None) if tls else transport
        if under is None or not ISystemHandle.providedBy(under):
            return True
        try:
            peeked = under.getHandle().recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not peeked:
            return False
        if tls and self.earlySize < PREDIAL_BUFFER:
            return None
        return True


class _PoolFactory(Factory):
    """
    Builds the pool's protocols for one target.
    """

    noisy = False

    def __init__(self, pool: WarmPool, target: Target) -> None:
        self.pool = pool
        self.target = target

    def buildProtocol(self, addr) -> PooledClientProtocol:
        protocol = PooledClientProtocol()
        protocol.factory = self
        protocol.pool = self.pool
        protocol.target = self.target
        return protocol


@implementer(IDialer)
class WarmPool:
    """
    Up to C{Size} idle connections to each target that is up, given to
    new clients in the balancer's order, refilled after use, replaced
    after C{MaxIdle} seconds.

    @ivar dialer: the app's own dialer, which makes every connection.
    @ivar config: the app's L{PoolConfig}.
    @ivar idle: per target, its idle connections, oldest first.
    @ivar handedOut: connections given to clients so far (for tests,
        and to say in the log how useful the pool is).
    """

    log = Logger()

    def __init__(
        self,
        dialer: IDialer,
        config: PoolConfig,
        targets: Sequence[Target],
        clock: IReactorTime,
        health=None,
        load=None,
        stats=None,
        gate: AcceptGate | None = None,
    ) -> None:
        """
        @param health: the app's L{tcpproxy.health.HealthTracker}, or C{None}.
        @param load: the app's L{tcpproxy.balancer.Load}, or C{None}: the
            clients' connections per target, under C{MaxConnections}.
        @param stats: the app's L{tcpproxy.metrics.AppStats}, or C{None}:
            told of each client's hit or miss and of each idle connection
            given up (the pool's metrics; they outlive a pool a reload
            replaces).
        @param gate: the proxy's L{AcceptGate}, or C{None}: each pooled
            connection holds a descriptor, from its dial until it is closed
            or handed to a client, counted there against the descriptor
            budget; the pool dials only while the gate has room for it.
        """
        self.gate = gate
        self.dialer = dialer
        self.stats = stats
        self.load = load
        self.config = config
        self.clock = clock
        self.health = health
        self.targets = tuple(targets)
        self._limited = any(t.maxConnections is not None for t in self.targets)
        self.idle: dict[Target, deque[PooledClientProtocol]] = {t: deque() for t in self.targets}
        self._dialling: dict[Target, set[Deferred]] = {t: set() for t in self.targets}
        self._factories = {t: _PoolFactory(self, t) for t in self.targets}
        self.handedOut = 0
        self.idleTotal = 0
        self._closing: set[PooledClientProtocol] = set()
        self._closedWaiters: list[Deferred[None]] = []
        self._stopped = False
        self._tick: IDelayedCall | None = clock.callLater(0, self._look)

    # IDialer

    def dial(self, protocolFactory: IProtocolFactory, targets: Iterable[Target]) -> Deferred[Dialled]:
        """
        A pooled connection to the first target of C{targets}, at once, if
        it has a live one; else C{targets} dialled by the app's dialer.

        Only the first target is looked at: C{targets} is the balancer's
        order, walked lazily (L{tcpproxy.dispatch}: each target taken from
        it is counted in the app's load, a full one skipped), so the pool
        changes neither which target a client goes to nor the counts.
        """
        targets = iter(targets)
        target = next(targets, None)
        if target is None:
            return self.dialer.dial(protocolFactory, ())
        protocol = self._take(target) if self.idleTotal else None
        if protocol is None:
            if self.stats is not None and target in self.idle and self.usable(target):
                self.stats.pooled(target, False)
            order = chain((target,), targets)
            return self.dialer.dial(protocolFactory, self._withRoom(order) if self._limited else order)
        if self.stats is not None:
            self.stats.pooled(target, True)
        protocol.releaseDescriptor()
        protocol.pool = None
        early = b"".join(protocol.early)
        protocol.early = []
        if protocol.earlySize >= PREDIAL_BUFFER:
            protocol.transport.resumeProducing()
        self.handedOut += 1
        return succeed(Dialled(target, protocol, (), early))

    def _withRoom(self, targets: Iterator[Target]) -> Iterator[Target]:
        """
        C{targets}, each given up to the real dialer only once the pool has
        made room for the client's connection under the target's
        C{MaxConnections} (L{_makeRoom}).
        """
        for target in targets:
            self._makeRoom(target)
            yield target

    def _makeRoom(self, target: Target) -> None:
        """
        A client is about to dial C{target}, and is counted in the app's
        load already: if the clients' connections and the pool's (idle,
        and dials under way) now pass C{MaxConnections}, the pool gives up
        one of its own -- a dial under way (cancelled: its socket is closed
        before the client's is opened), else an idle connection -- so that
        the target never has more connections than its limit from this
        proxy.  (The dispatcher lets a client dial a target below its limit
        by the clients' count alone: the pool's connections are the
        clients' to take.)
        """
        limit = target.maxConnections
        if limit is None or self.load is None:
            return
        idle = self.idle.get(target)
        dialling = self._dialling.get(target)
        if idle is None or dialling is None:
            return
        while self.load.active(target) + len(idle) + len(dialling) > limit:
            if dialling:
                d = dialling.pop()
                d.cancel()
            elif idle:
                protocol = idle.pop()
                self.idleTotal -= 1
                self._unwatch(protocol)
                self._close(protocol)
            else:
                return

    def _take(self, target: Target) -> PooledClientProtocol | None:
        """
        The oldest live idle connection to C{target}, taken out of the
        pool (and replaced), or C{None}; dead ones found on the way are
        aborted (and replaced), and those not known to be alive yet (see
        L{PooledClientProtocol.alive}) left where they are.
        """
        idle = self.idle.get(target)
        if not idle:
            return None
        unknown = []
        taken = None
        out = 0
        while idle and taken is None:
            protocol = idle.popleft()
            alive = protocol.alive()
            if alive is None:
                unknown.append(protocol)
                continue
            out += 1
            self.idleTotal -= 1
            self._unwatch(protocol)
            if alive:
                taken = protocol
            else:
                self._droppedFor(target, "closed")
                self._closing.add(protocol)
                protocol.transport.abortConnection()
        idle.extendleft(reversed(unknown))
        if out:
            self._fill(target)
        return taken

    # Filling

    def usable(self, target: Target) -> bool:
        """
        Whether C{target} is pooled now: it is up and not drained (a down
        target is left to clients' own dials to retry), takes clients in
        the rotation (not a backup, a weight above 0).
        """
        if target.backup or not target.weight:
            return False
        return self.health is None or self.health.stateOf(target) == UP

    def _room(self, target: Target) -> int:
        """
        How many more connections the pool may open to C{target}: up to
        C{Size} idle ones, and no more than its C{MaxConnections} leaves
        beside the clients' connections (counted in the app's load) and
        the pool's own, idle or being dialled.
        """
        dialling = len(self._dialling[target])
        room = self.config.size - len(self.idle[target]) - dialling
        limit = target.maxConnections
        if limit is not None:
            active = self.load.active(target) if self.load is not None else 0
            room = min(room, limit - active - len(self.idle[target]) - dialling)
        return room

    def _look(self) -> None:
        self._tick = None
        if self._stopped:
            return
        for target in self.targets:
            self._fill(target)
        self._tick = self.clock.callLater(REFILL_INTERVAL, self._look)

    def _fill(self, target: Target) -> None:
        if self._stopped or not self.usable(target):
            return
        dialling = self._dialling[target]
        gate = self.gate
        for _ in range(self._room(target)):
            if gate is not None:
                if not gate.roomToHold():
                    # No descriptor to spare beside the clients': the next
                    # look tries again.
                    return
                gate.holdDescriptor()
            d = self.dialer.dial(self._factories[target], [target])
            dialling.add(d)
            d.addCallbacks(self._connected, self._failed, callbackArgs=(d, target), errbackArgs=(d, target))

    def _connected(self, dialled: Dialled, d: Deferred, target: Target) -> None:
        self._dialling[target].discard(d)
        protocol = dialled.protocol
        if not protocol.closed:
            # Its descriptor, held since the dial, is counted until it closes.
            protocol.gate = self.gate
        elif self.gate is not None:
            self.gate.releaseDescriptor()
        if self._stopped or protocol.closed or protocol.readDone:
            if not protocol.closed:
                self._close(protocol)
            return
        protocol.pooledAt = self.clock.seconds()
        protocol.expiry = self.clock.callLater(self.config.maxIdle, self._expire, protocol)
        self.idle[target].append(protocol)
        self.idleTotal += 1

    def _failed(self, reason: Failure, d: Deferred, target: Target) -> None:
        # Told to the target's health and metrics by the dialer already;
        # the next look (REFILL_INTERVAL) tries again if it is still up.
        # (Cancelled, by stop or to make room for a client, as well.)
        self._dialling[target].discard(d)
        if self.gate is not None:
            self.gate.releaseDescriptor()

    def _unwatch(self, protocol: PooledClientProtocol) -> None:
        expiry = protocol.expiry
        protocol.expiry = None
        if expiry is not None and expiry.active():
            expiry.cancel()

    def _expire(self, protocol: PooledClientProtocol) -> None:
        """
        C{protocol} waited C{MaxIdle} seconds for a client: close it, and
        open a fresh one in its place.
        """
        protocol.expiry = None
        if self._remove(protocol):
            self._droppedFor(protocol.target, "expired")
        self._close(protocol)
        self._fill(protocol.target)

    def _close(self, protocol: PooledClientProtocol) -> None:
        """
        Close an idle C{protocol} the pool gives up (expired, stopped, or
        to make room for a client).  Over TLS, C{close_notify} is sent and
        the connection aborted if the target does not answer it in time
        (L{TLSCloser}): a TLS close otherwise waits for the peer's, and the
        descriptor would be held for ever.
        """
        self._closing.add(protocol)
        transport = protocol.transport
        if ISSLTransport.providedBy(transport):
            protocol.closing = TLSCloser(transport, self.clock)
        else:
            transport.loseConnection()

    def _remove(self, protocol: PooledClientProtocol) -> bool:
        idle = self.idle.get(protocol.target)
        if idle is not None and protocol in idle:
            idle.remove(protocol)
            self.idleTotal -= 1
            return True
        return False

    def dropped(self, protocol: PooledClientProtocol) -> None:
        """
        An idle C{protocol}'s connection ended (the target closed or reset
        it): it is no longer offered, and another is opened -- at once if
        it had been idle a while (the target's own idle timeout, say), else
        at the next look (L{REFILL_INTERVAL}), as after a failed dial: a
        target that closes every connection as soon as it is opened would
        otherwise be redialled in a loop, as fast as the CPU goes.
        """
        self._unwatch(protocol)
        if self._remove(protocol):
            self._droppedFor(protocol.target, "closed")
            if self.clock.seconds() - protocol.pooledAt >= REFILL_INTERVAL:
                self._fill(protocol.target)

    def lost(self, protocol: PooledClientProtocol) -> None:
        """
        C{protocol}'s connection is over (idle, or being closed by the
        pool): no longer offered, replaced if it was idle; once the pool is
        stopped and the last such connection is over, L{stop}'s result fires.
        """
        self.dropped(protocol)
        closing = self._closing
        closing.discard(protocol)
        if not closing and self._closedWaiters:
            waiters, self._closedWaiters = self._closedWaiters, []
            for d in waiters:
                d.callback(None)

    def _droppedFor(self, target: Target, reason: str) -> None:
        if self.stats is not None:
            self.stats.poolDropped(target, reason)

    # Stopping

    def stop(self) -> Deferred[None]:
        """
        Open no more connections and close the idle ones (shutdown, or
        the pool replaced by a reload).

        @return: fires once every connection the pool closed has ended
            (over TLS, the target answers C{close_notify}, or the
            connection is aborted after L{tcpproxy.tls.CLOSE_TIMEOUT}).
        """
        self._stopped = True
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        self.idleTotal = 0
        for idle in self.idle.values():
            while idle:
                protocol = idle.popleft()
                self._unwatch(protocol)
                self._close(protocol)
        for dialling in self._dialling.values():
            for d in list(dialling):
                d.cancel()
        if not self._closing:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closedWaiters.append(d)
        return d

    def idleCount(self) -> int:
        """
        Idle pooled connections, all targets together.
        """
        return self.idleTotal


def stopPool(dialer: IDialer) -> Deferred[None]:
    """
    Stop C{dialer} if it is a L{WarmPool} (an app's dialer at shutdown or
    when a reload replaces it).

    @return: fires once the pool's connections have ended (L{WarmPool.stop});
        at once if C{dialer} is no pool.
    """
    if isinstance(dialer, WarmPool):
        return dialer.stop()
    return succeed(None)
