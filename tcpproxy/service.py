"""
The proxy as a Twisted service: one listener per port of every app, a
reload that applies a changed configuration without dropping a connection,
and an orderly stop that drains open connections before aborting what is
left.
"""

from __future__ import annotations

import resource
import socket
from collections import Counter
from collections.abc import Sequence

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from zope.interface import implementer

from tcpproxy.admin import MAX_CONNECTIONS as ADMIN_MAX_CONNECTIONS
from tcpproxy.admin import AdminServer
from tcpproxy.app import ProxyServerFactory, buildApp, updateApp
from tcpproxy.applying import Reloader, ReloadResult, owner
from tcpproxy.config import DEFAULT_BALANCE, AppConfig, ProxyConfig, Target, loadConfig
from tcpproxy.describe import quoted
from tcpproxy.dialer import endpointForTarget
from tcpproxy.discovery import Discovery, resolverFor
from tcpproxy.health import HealthChecker
from tcpproxy.limits import (
    DESCRIPTOR_MARGIN,
    DESCRIPTORS_PER_CONNECTION,
    AcceptGate,
    descriptorBudget,
    openDescriptors,
    raiseFileLimit,
)
from tcpproxy.listening import ISocketAcceptor, SocketPort, bindAll
from tcpproxy.pool import stopPool
from tcpproxy.proxysend import sendingEndpoints
from tcpproxy.tls import AppTLS, loadAppTLS
from tcpproxy.transport.engine import IEngine, defaultEngine
from tcpproxy.triggers import IReloadTrigger


@implementer(ISocketAcceptor)
class _PortFactory:
    """
    What a listening port keeps for as long as it listens: it hands each
    new client to the app that owns the port now.

    A reload that moves the port to another app swaps L{appFactory}; the
    socket stays open throughout, so no client is refused in between, and
    the connections already accepted stay with the app that accepted them.

    @ivar appFactory: the L{ProxyServerFactory} of the port's app.
    @ivar port: the port number.
    @ivar host: the address the port listens on (an L{IAddress}), once it
        does (see L{listeningOn}).
    """

    def __init__(self, appFactory: ProxyServerFactory, port: int, engine: IEngine) -> None:
        self.appFactory = appFactory
        self.port = port
        self.engine = engine
        self.host = None

    def listeningOn(self, address: IPv4Address | IPv6Address) -> None:
        """
        The port listens on C{address}, which its connections are given
        (C{getHost}: a system call saved per connection on a specific
        address; on a wildcard one, C{0.0.0.0} or C{::}, the default
        C{BindAddress}, a connection asks its socket which address of the
        host's the client dialled, for the PROXY header's destination, and
        takes the port from C{address}).
        """
        self.host = address

    def socketAccepted(self, sock: socket.socket, address: tuple) -> None:
        """
        Serve the client on the engine, with the app's protocol (behind TLS
        termination if the app has it).
        """
        self.engine.adopt(sock, address, self.appFactory.front, self.host)


class ProxyService(Service):
    """
    Serve a L{ProxyConfig}, and apply a new one on L{reload}.

    Sockets are bound by L{bind} (which C{twistd} start-up calls early, see
    L{tcpproxy.tap}) and adopted by the reactor in L{startService}.  Stopping
    closes every listener at once, waits up to C{config.drainTimeout} seconds
    for open connections to end by themselves, then aborts the rest.

    @ivar config: the configuration that runs now.  After a reload in which
        a new port could not be bound, that is the file's configuration
        without that port (so the next reload tries it again).
    @ivar configPath: where L{reload} reads the configuration from.
    @ivar factories: app name to its L{ProxyServerFactory}, for the apps of
        L{config}.  An app removed by a reload keeps its factory elsewhere
        until its last connection ends, so that stopping drains it too.
    @ivar listeningPorts: port number to its L{IListeningPort}.
    @ivar admin: the admin endpoint (L{AdminServer}), on if the
        configuration has C{Admin}.
    @ivar reloadCounts: reloads of the file, by result (C{tcpproxy_reloads_total}).
    @ivar loadedAt: when the configuration was last loaded (the reactor's
        time: a Unix time).
    """

    log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        reactor,
        configPath: str | None = None,
        triggers: Sequence[IReloadTrigger] = (),
        engine: IEngine | None = None,
        resolverFactory=resolverFor,
    ) -> None:
        """
        @param configPath: the file L{reload} reads; by default the one
            C{config} was read from.
        @param resolverFactory: makes the DNS resolver of the apps' targets
            found in DNS, from C{"Resolvers"} and the reactor
            (L{tcpproxy.discovery.resolverFor}).
        @param triggers: what calls L{reload} while the service runs
            (L{tcpproxy.triggers}).
        @param engine: where connections run (L{tcpproxy.transport.engine});
            by default the fast one where the platform has it.
        """
        self.config = config
        self.configPath = configPath if configPath is not None else config.source
        self.reactor = reactor
        self.engine = engine if engine is not None else defaultEngine(reactor)
        self._triggers = tuple(triggers)
        self.reloader = Reloader(self)
        self.gate = AcceptGate(config.maxConnections, lambda: list(self.listeningPorts.values()), reactor)
        self._checkers: dict[str, HealthChecker] = {}
        self.discovery = Discovery(reactor, config.resolvers, self.targetsFound, resolverFactory)
        self.factories: dict[str, ProxyServerFactory] = {
            app.name: self.newFactory(self.discovery.track(app)) for app in config.apps
        }
        self.retired: set[ProxyServerFactory] = set()
        self._sockets: dict[int, socket.socket] = {}
        self.portFactories: dict[int, _PortFactory] = {}
        self.listeningPorts: dict[int, IListeningPort] = {}
        self.admin = AdminServer(self, reactor)
        self.reloadCounts: Counter[str] = Counter()
        self.loadedAt = reactor.seconds()

    def newFactory(self, app: AppConfig, tls: AppTLS | None = None) -> ProxyServerFactory:
        """
        @param tls: C{app}'s TLS, already loaded; loaded here if not given.
        @raise ConfigError: a TLS file of C{app} is refused.
        """
        if tls is None:
            tls = loadAppTLS(app, self.config.source)
        return buildApp(app, tls, self.engine, self.reactor, self.gate)

    def targetsFound(self, app: AppConfig) -> None:
        """
        The targets of C{app} found in DNS changed (L{Discovery}): apply them
        as a reload applies new targets (L{updateApp}); active checks, if
        any, go on over the new list.
        """
        factory = self.factories.get(app.name)
        if factory is None or factory.app == app:
            return
        updateApp(factory, app, factory.tls, self.engine)
        if app.healthCheck is not None and self.running:
            self.startChecks(app)

    def startChecks(self, app: AppConfig) -> None:
        """
        Start (or restart, with new settings) the active health checks of
        C{app}, if it has any.
        """
        self.stopChecks(app.name)
        if app.healthCheck is not None:
            checker = HealthChecker(
                self.factories[app.name].health,
                self.reactor,
                app.healthCheck,
                endpointFactory=sendingEndpoints(endpointForTarget, app.sendProxy, app.targetSendProxy),
            )
            self._checkers[app.name] = checker
            checker.start()

    def stopChecks(self, name: str) -> None:
        checker = self._checkers.pop(name, None)
        if checker is not None:
            checker.stop()

    def bind(self) -> None:
        """
        Bind every port of every app, or none; a second call does nothing.

        @raise ListenError: naming the file, the app and the port that could
            not be bound.
        """
        if self._sockets or self.listeningPorts:
            return
        listeners = self.config.listeners()
        address = self.config.bindAddress
        source = self.config.source
        wanted = [(f"{source}: {owner(app.name)}", address, port) for app, port in listeners]
        sockets = self.bindListeners(wanted)
        self._sockets = {port: sock for (app, port), sock in zip(listeners, sockets, strict=True)}
        try:
            self.admin.bind(self.config.admin)
        except BaseException:
            self.unbind()
            raise

    def bindListeners(self, wanted: list[tuple[str, str, int]]) -> list[socket.socket]:
        """
        The listening sockets for C{(owner, address, port)}, all or none:
        bound here (L{bindAll}); a worker process takes those its main
        process bound (L{tcpproxy.worker}).

        @raise ListenError: as L{bindAll}.
        """
        return bindAll(wanted)

    def readConfig(self) -> ProxyConfig:
        """
        Read L{configPath} for a reload (L{tcpproxy.applying.Reloader}).

        @raise ConfigError: the file is refused.
        """
        return loadConfig(self.configPath)

    def unbind(self) -> None:
        """
        Close the sockets bound by L{bind} and not yet listening.
        """
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self.admin.unbind()

    def privilegedStartService(self) -> None:
        self.bind()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        self.bind()
        limit = raiseFileLimit(self.log)
        Service.startService(self)
        self.engine.start()
        self.log.info(
            "connections run on {description}", engine=self.engine.name, description=self.engine.description
        )
        for app, port in self.config.listeners():
            self.listen(port, self.factories[app.name], self._sockets.pop(port))
        for app in self.config.apps:
            self.log.info(
                "app {quoted}: listening on {address} port(s) {portList}, relaying to {targetList}",
                app=app.name,
                quoted=quoted(app.name),
                address=self.config.bindAddress,
                ports=list(app.ports),
                targets=[str(t) for t in app.targets],
                portList=", ".join(map(str, app.ports)) + (" (TLS)" if app.tls else ""),
                targetList=", ".join([*map(_describeTarget, app.targets), *map(str, app.discover)])
                + (" (TLS)" if app.targetTLS else "")
                + (f", {app.balance}" if app.balance != DEFAULT_BALANCE else ""),
            )
        self._budgetDescriptors(limit)
        self.admin.start()
        self.discovery.start()
        for app in self.config.apps:
            self.startChecks(self.factories[app.name].app)
        for trigger in self._triggers:
            trigger.start(self.reload)

    def _budgetDescriptors(self, limit: int) -> None:
        """
        Accept no more clients at once than the descriptors left allow
        (see L{AcceptGate}), and say so when that is below C{MaxConnections}.
        """
        inUse = openDescriptors()
        if inUse is None or limit in (resource.RLIM_INFINITY, -1):
            return
        margin = DESCRIPTOR_MARGIN + (ADMIN_MAX_CONNECTIONS if self.config.admin is not None else 0)
        budget = descriptorBudget(limit, inUse, margin)
        self.gate.setBudget(budget)
        if self.config.maxConnections is None or budget < self.config.maxConnections:
            self.log.info(
                "at most {budget} connections at once: {limit} descriptors, {inUse} in use at start,"
                " {each} per connection",
                budget=budget,
                limit=limit,
                inUse=inUse,
                each=DESCRIPTORS_PER_CONNECTION,
            )

    def listen(self, port: int, appFactory: ProxyServerFactory, sock: socket.socket) -> None:
        portFactory = self.portFactories[port] = _PortFactory(appFactory, port, self.engine)
        self.listeningPorts[port] = SocketPort(self.reactor, sock, portFactory)
        portFactory.listeningOn(self.listeningPorts[port].getHost())
        self.gate.portAdded(self.listeningPorts[port])

    def openConnections(self) -> int:
        return sum(len(factory.relays) for factory in self._allFactories())

    def _allFactories(self) -> list[ProxyServerFactory]:
        """
        The factories of the apps, and of removed apps with connections open.
        """
        return [*self.factories.values(), *self.retired]

    # Reload: applied by tcpproxy.applying

    def reload(self) -> Deferred[ReloadResult]:
        """
        Read L{configPath} again and apply the difference (see
        L{Reloader.reload}).
        """
        return self.reloader.reload()

    def apply(self, new: ProxyConfig) -> Deferred[ReloadResult]:
        """
        Change what runs from L{config} to C{new} (see L{Reloader.apply}).
        """
        return self.reloader.apply(new)

    # Stop

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting now; give open connections the drain period to end.

        The admin endpoint stays until the drain is over: its C{/ready}
        answers 503 from now on (L{running} is false).

        The reload triggers stop only once the drain is over: until then a
        C{SIGHUP} (a configuration tool reloading as it always does) is
        still ours, and only logged, instead of ending the process with the
        default action and dropping the connections being drained.
        """
        Service.stopService(self)
        self.gate.stop()
        self.discovery.stop()
        pools = []
        for factory in self._allFactories():
            # Idle pooled connections are no client's: closed at once (and
            # waited for with the drain: a TLS close takes a round trip).
            pools.append(stopPool(factory.dialer))
            if factory.scaler is not None:
                factory.scaler.shutdown()
        for name in list(self._checkers):
            self.stopChecks(name)
        self.unbind()
        ports, self.listeningPorts = list(self.listeningPorts.values()), {}
        self.portFactories.clear()
        stopped = gatherResults([maybeDeferred(port.stopListening) for port in ports])
        stopped.addCallback(lambda _: self._drain())
        stopped.addCallback(lambda _: gatherResults(pools).addCallback(lambda _: None))
        stopped.addBoth(self._stopped)
        return stopped

    def _stopped(self, result: object) -> object:
        """
        The drain is over: nothing is relayed or reloaded any more.
        """
        for trigger in self._triggers:
            trigger.stop()
        self.engine.stop()
        self.admin.stop()
        return result

    def _drain(self) -> Deferred[None]:
        """
        Wait for every open connection to end; abort those still open when
        the drain period is over.
        """
        timeout = self.config.drainTimeout
        count = self.openConnections()
        if count:
            self.log.info(
                "stopped listening; {count} connection(s) open, draining for up to {timeout:g}s",
                count=count,
                timeout=timeout,
            )
        deadline = self.reactor.callLater(timeout, self._abortRemaining)
        idle = self._allIdle()

        def disarm(result: None) -> None:
            if deadline.active():
                deadline.cancel()

        return idle.addCallback(disarm)

    def _allIdle(self) -> Deferred[None]:
        return gatherResults([f.whenIdle() for f in self._allFactories()]).addCallback(lambda _: None)

    def _abortRemaining(self) -> None:
        self.log.warn(
            "drain period over: aborting {count} connection(s) still open",
            count=self.openConnections(),
        )
        for factory in self._allFactories():
            factory.abortAll()


def _describeTarget(target: Target) -> str:
    """
    A target as the start-up line names it: its address, and what its
    object form set (C{weight 3}, C{at most 100}, C{backup}).
    """
    settings = []
    if target.weight != 1:
        settings.append(f"weight {target.weight}")
    if target.maxConnections is not None:
        settings.append(f"at most {target.maxConnections}")
    if target.backup:
        settings.append("backup")
    return f"{target} ({', '.join(settings)})" if settings else str(target)
