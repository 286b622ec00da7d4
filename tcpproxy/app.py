"""
One app at run time: who is admitted, how many are open, which are open
(to drain them), and the record of each connection when it ends.

L{buildApp} makes the whole of it from an app's configuration -- health,
balancer, dialer, TLS front -- in one place; the service only asks for it,
and a reload gives it new settings with L{ProxyServerFactory.reconfigure}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory

from tcpproxy import access
from tcpproxy.access import END_DONE, END_NO_TARGET, END_OPEN, InterimRecords, formatFor
from tcpproxy.balancer import IBalancer, balancerFor
from tcpproxy.config import AppConfig
from tcpproxy.dialer import FailoverDialer, IDialer, endpointForTarget
from tcpproxy.dispatch import Dispatcher
from tcpproxy.health import DEFAULT_FALL, DEFAULT_RISE, HealthTracker
from tcpproxy.idle import IdleSweeper
from tcpproxy.limits import REFUSED_DENIED, AcceptGate, ConnectionCounter, permitted
from tcpproxy.metrics import REFUSED_DRAINING, AppStats
from tcpproxy.pool import WarmPool, stopPool
from tcpproxy.proxyaccept import HeaderStageFactory, ProxiedAddress
from tcpproxy.proxysend import sendingEndpoints
from tcpproxy.relay import IRelayed, ProxyClientProtocol, ProxyServerProtocol
from tcpproxy.scaling import ScaleToZero
from tcpproxy.tls import AppTLS
from tcpproxy.transport.engine import IEngine


class ProxyServerFactory(Factory):
    """
    Accepts an app's clients (on every one of its ports) and relays each to
    a target the balancer picks, through the dialer.

    @ivar front: what the app's ports hand new clients to: this factory,
        or this factory behind TLS termination.
    @ivar relays: the connections open now (L{IRelayed}), so that shutdown
        can drain them.
    @ivar counter: the app's L{ConnectionCounter} (open and refused clients).
    @ivar gate: the proxy-wide L{AcceptGate}, if any.
    @ivar health: the app's L{HealthTracker}, if any.
    @ivar stats: the app's L{AppStats} (bytes, durations, targets' connects).
    @ivar dispatcher: gives each client its dial, under the targets'
        C{MaxConnections}, with the app's queue (L{Dispatcher}).
    """

    noisy = False
    protocol = ProxyServerProtocol
    scaler: ScaleToZero | None = None

    def __init__(
        self,
        app: AppConfig,
        balancer: IBalancer,
        dialer: IDialer,
        clock: IReactorTime,
        tls: AppTLS | None = None,
        health: HealthTracker | None = None,
        gate: AcceptGate | None = None,
        stats: AppStats | None = None,
    ) -> None:
        self.clock = clock
        self.health = health
        self.stats = stats if stats is not None else AppStats(app.targets)
        self.gate = gate
        self.relays: set[IRelayed] = set()
        self.counter = ConnectionCounter()
        self._idleWaiters: list[Deferred[None]] = []
        self.idleSweeper = IdleSweeper(clock, lambda: self.relays)
        self.interim = InterimRecords(clock, lambda: self.relays, self._logInterim)
        self.clientFactory = Factory.forProtocol(ProxyClientProtocol)
        self.clientFactory.noisy = False
        self.dispatcher = Dispatcher(self)
        self.reconfigure(app, balancer, dialer, tls)

    def reconfigure(self, app: AppConfig, balancer: IBalancer, dialer: IDialer, tls: AppTLS | None) -> None:
        """
        Serve new clients with C{app}'s settings (a configuration reload).

        Only a new connection reads these attributes, when it is made; a
        relay already open keeps the target it has (and one being dialled
        keeps the list and dialer it started with).  C{relays} is untouched:
        the connections are still this app's to drain.
        """
        self.app = app
        self.tls = tls
        self.balancer = balancer
        self.dialer = dialer
        self.front: IProtocolFactory = self
        if tls is not None and tls.server is not None:
            self.front = tls.serverFactory(self, self.clock, self.gate, self.counter.refusals)
        if app.acceptProxy is not None:
            # The PROXY header comes first, before TLS (tcpproxy.proxyaccept).
            self.front = HeaderStageFactory(
                app.acceptProxy, self.front, self.clock, self.logRefusal, self.counter.refusals, self.gate
            )
        self.dispatcher.changed()

    def buildProtocol(self, addr) -> ProxyServerProtocol:
        protocol = ProxyServerProtocol()
        protocol.factory = self
        if type(addr) is ProxiedAddress:
            # The client as the PROXY header stage read it.
            protocol.proxied = addr
            addr = addr.address
        # Only the client's IP is kept (limits, access lists, source hash):
        # the address object, for the log, is asked of the transport again.
        protocol.clientHost = getattr(addr, "host", "")
        return protocol

    def admit(self, host: str) -> str | None:
        """
        Count a new client from C{host} in, or say why it is refused
        (C{Allow}/C{Deny}, C{MaxConnections}, C{MaxConnectionsPerClient},
        or every target drained by an operator).
        """
        app = self.app
        if not permitted(host, app.allow, app.deny):
            self.counter.refusals[REFUSED_DENIED] += 1
            return REFUSED_DENIED
        if self.health is not None and self.health.allDrained:
            self.counter.refusals[REFUSED_DRAINING] += 1
            return REFUSED_DRAINING
        refused = self.counter.tryOpen(host, app.maxConnections, app.maxConnectionsPerClient)
        if refused is None:
            if self.gate is not None:
                self.gate.connectionOpened()
            if app.accessLogInterval and app.accessLog:
                self.interim.start(app.accessLogInterval)
        return refused

    def logRefusal(self, clientAddress: str, port: int, reason: str, connectionId: str) -> None:
        """
        Log a client refused by L{admit} (and closed) on C{port}.
        """
        app = self.app
        access.logRefusal(
            app.name,
            clientAddress,
            port,
            reason,
            self.counter.refusals,
            connectionId,
            formatFor(app.accessLogFormat),
            self.clock.seconds(),
        )

    def _logInterim(self, relay: IRelayed, now: float) -> None:
        """
        Write the interim record of C{relay}, open since its C{started}
        (L{InterimRecords}), if the app's C{AccessLog} is on.
        """
        if self.app.accessLog:
            access.logConnection(self.app.name, relay, END_OPEN, now - relay.started)

    def relayEnded(self, relay: IRelayed) -> None:
        """
        A connection admitted by L{admit} has ended, both sides closed: count
        it out, write its access-log line, and wake whoever waits for the
        app to be idle.
        """
        self.relays.discard(relay)
        if relay.target is not None:
            self.dispatcher.ended(relay.target)
        self.counter.close(relay.clientHost)
        if self.gate is not None:
            self.gate.connectionClosed()
        end = relay.end or END_DONE
        duration = self.clock.seconds() - relay.started
        self.stats.ended(relay.bytesIn, relay.bytesOut, end, duration)
        # A connection nobody could serve is worth a warning whatever the
        # AccessLog switch.
        if self.app.accessLog or end == END_NO_TARGET:
            access.logConnection(self.app.name, relay, end, duration)
        if not self.relays:
            self.idleSweeper.stop()
            self.interim.stop()
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def whenIdle(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once no connection of this app is open.
        """
        if not self.relays:
            return succeed(None)
        d: Deferred[None] = Deferred(self._idleWaiters.remove)
        self._idleWaiters.append(d)
        return d

    def abortAll(self) -> None:
        """
        Drop every open connection of this app at once.
        """
        for relay in list(self.relays):
            relay.abort()


def buildDialer(
    app: AppConfig, tls: AppTLS, engine: IEngine, health: HealthTracker | None, stats: AppStats | None = None
) -> FailoverDialer:
    """
    The dialer of C{app}: an endpoint per target on C{engine}'s reactor
    (wrapped in TLS if the app originates it), C{ConnectTimeout} per attempt,
    each attempt's outcome told to C{health} and C{stats}.
    """
    reactor = engine.reactor
    return FailoverDialer(
        reactor,
        app.connectTimeout,
        endpointFactory=tls.endpointFactory(
            sendingEndpoints(endpointForTarget, app.sendProxy, app.targetSendProxy), reactor
        ),
        health=health,
        stats=stats,
    )


def _healthSettings(app: AppConfig) -> tuple[int, int]:
    """
    C{Rise} and C{Fall} for the app's L{HealthTracker}.
    """
    check = app.healthCheck
    return (check.rise, check.fall) if check else (DEFAULT_RISE, DEFAULT_FALL)


def buildApp(
    app: AppConfig, tls: AppTLS, engine: IEngine, clock: IReactorTime, gate: AcceptGate | None = None
) -> ProxyServerFactory:
    """
    The whole runtime of C{app}: its targets' health, the balancer over
    them, the dialer, TLS, and the factory that admits and records.

    @param tls: C{app}'s TLS, loaded (L{tcpproxy.tls.loadAppTLS}).
    """
    health = HealthTracker(app.name, app.targets, clock, *_healthSettings(app))
    stats = AppStats(app.targets)
    balancer = balancerFor(app, health, clock)
    factory = ProxyServerFactory(
        app,
        balancer,
        _pooled(app, buildDialer(app, tls, engine, health, stats), clock, health, balancer, stats, gate),
        clock,
        tls=tls,
        health=health,
        gate=gate,
        stats=stats,
    )
    _scale(factory, app, engine)
    return factory


def _scale(factory: ProxyServerFactory, app: AppConfig, engine: IEngine) -> None:
    """
    Give the app its L{ScaleToZero} if it has a C{"ScaleToZero"} (with
    its new settings on a reload), or take it away.
    """
    scaler = factory.scaler
    if app.scaleToZero is None:
        if scaler is not None:
            # A wake-up under way still serves the clients it holds.
            scaler.retire()
            factory.scaler = None
            # Its stopped targets count as running again: they may serve
            # clients waiting in the queue.
            factory.dispatcher.changed()
    elif scaler is None:
        factory.scaler = ScaleToZero(
            app,
            factory.dialer,
            factory.clock,
            engine.reactor,
            factory.health,
            lambda: factory.balancer.load,
            factory.dispatcher.changed,
        )
    else:
        scaler.update(app, factory.dialer)


def updateApp(factory: ProxyServerFactory, app: AppConfig, tls: AppTLS, engine: IEngine) -> None:
    """
    Give a running app C{app}'s settings (a reload), for its new clients.

    Targets that stay keep their health and their count of active
    connections; the rotation goes on where it was for them; the dialer is
    kept unless how it dials changed (timeout, TLS towards the targets, or
    TLS files read anew).

    @param tls: C{app}'s TLS, as loaded for this reload.
    """
    old = factory.app
    factory.health.update(app.name, app.targets, *_healthSettings(app))
    factory.stats.keepTargets(app.targets)
    balancer = factory.balancer
    if (old.targets, old.targetSettings, old.balance, old.slowStart) != (
        app.targets,
        app.targetSettings,
        app.balance,
        app.slowStart,
    ):
        balancer = balancerFor(app, factory.health, factory.clock, balancer)
    dialer = factory.dialer
    pool = dialer if isinstance(dialer, WarmPool) else None
    if pool is not None:
        dialer = pool.dialer
    if (old.connectTimeout, old.targetTLS, old.sendProxy, old.targetSendProxy) != (
        app.connectTimeout,
        app.targetTLS,
        app.sendProxy,
        app.targetSendProxy,
    ) or tls.client is not None:
        dialer = buildDialer(app, tls, engine, factory.health, factory.stats)
    if (
        pool is not None
        and pool.dialer is dialer
        and (old.pool, old.targets, old.targetSettings) == (app.pool, app.targets, app.targetSettings)
    ):
        # The same pool dials the same way: its idle connections stay.
        dialer = pool
    else:
        if pool is not None:
            stopPool(pool)
        dialer = _pooled(app, dialer, factory.clock, factory.health, balancer, factory.stats, factory.gate)
    factory.reconfigure(app, balancer, dialer, tls)
    _scale(factory, app, engine)


def _pooled(
    app: AppConfig,
    dialer: IDialer,
    clock: IReactorTime,
    health: HealthTracker | None,
    balancer: IBalancer,
    stats: AppStats | None,
    gate: AcceptGate | None,
) -> IDialer:
    """
    C{dialer}, behind a warm pool of connections (L{tcpproxy.pool}) if the
    app has a C{"Pool"}: its connections counted in the app's C{stats} and
    in the proxy's accept C{gate} (the descriptors they hold).
    """
    if app.pool is None:
        return dialer
    return WarmPool(dialer, app.pool, app.targets, clock, health, balancer.load, stats, gate)
