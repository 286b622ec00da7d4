"""
The proxy as a Twisted service: one listener per port of every app, a
reload that applies a changed configuration without dropping a connection,
and an orderly stop that drains open connections before aborting what is
left.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from zope.interface import implementer

from tcpproxy.app import ProxyServerFactory, buildApp, buildDialer
from tcpproxy.config import AppConfig, ConfigError, ProxyConfig, loadConfig
from tcpproxy.describe import quoted
from tcpproxy.health import HealthChecker
from tcpproxy.limits import AcceptGate, raiseFileLimit
from tcpproxy.listening import ISocketAcceptor, ListenError, SocketPort, bindAll
from tcpproxy.reload import ReloadPlan, planReload, withoutPorts
from tcpproxy.tls import AppTLS, loadAppTLS
from tcpproxy.transport.engine import IEngine, defaultEngine
from tcpproxy.triggers import IReloadTrigger

APPLIED = "applied"
APPLIED_WITH_ERRORS = "applied with errors"
NOT_APPLIED = "not applied"
UNCHANGED = "no change"
REFUSED = "refused"

_WILDCARDS = ("0.0.0.0", "::")


def _owner(name: str) -> str:
    """
    Whose port it is, for a L{ListenError}: as at start-up.
    """
    return f"app {quoted(name)}"


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
    @ivar host: the address the port listens on (an L{IAddress}), once
        listening.
    """

    def __init__(self, appFactory: ProxyServerFactory, port: int, engine: IEngine) -> None:
        self.appFactory = appFactory
        self.port = port
        self._engine = engine
        self.host = None

    def socketAccepted(self, sock: socket.socket, address: tuple) -> None:
        """
        Serve the client on the engine, with the app's protocol (behind TLS
        termination if the app has it).
        """
        self._engine.adopt(sock, address, self.appFactory.front, self.host)


@dataclass(frozen=True)
class ReloadResult:
    """
    How one reload went.

    @ivar status: L{APPLIED}; L{APPLIED_WITH_ERRORS} (some of it could
        not be done); L{NOT_APPLIED} (nothing could be done); L{UNCHANGED}
        (the file asks for nothing new); L{REFUSED} (the file is invalid).
    @ivar plan: what changed, as applied (a port that could not be bound is
        not in it); C{None} if the reload was refused.
    @ivar errors: one line per thing that could not be done.
    """

    status: str
    plan: ReloadPlan | None = None
    errors: tuple[str, ...] = ()


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
    """

    log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        reactor,
        configPath: str | None = None,
        triggers: Sequence[IReloadTrigger] = (),
        engine: IEngine | None = None,
    ) -> None:
        """
        @param configPath: the file L{reload} reads; by default the one
            C{config} was read from.
        @param triggers: what calls L{reload} while the service runs
            (L{tcpproxy.triggers}).
        @param engine: where connections run (L{tcpproxy.transport.engine});
            by default the fast one where the platform has it.
        """
        self.config = config
        self.configPath = configPath if configPath is not None else config.source
        self._reactor = reactor
        self._engine = engine if engine is not None else defaultEngine(reactor)
        self._triggers = tuple(triggers)
        self.gate = AcceptGate(config.maxConnections, lambda: list(self.listeningPorts.values()))
        self._checkers: dict[str, HealthChecker] = {}
        self.factories: dict[str, ProxyServerFactory] = {
            app.name: self._newFactory(app) for app in config.apps
        }
        self._retired: set[ProxyServerFactory] = set()
        self._sockets: dict[int, socket.socket] = {}
        self._portFactories: dict[int, _PortFactory] = {}
        self.listeningPorts: dict[int, IListeningPort] = {}

    def _newFactory(self, app: AppConfig, tls: AppTLS | None = None) -> ProxyServerFactory:
        """
        @param tls: C{app}'s TLS, already loaded; loaded here if not given.
        @raise ConfigError: a TLS file of C{app} is refused.
        """
        if tls is None:
            tls = loadAppTLS(app, self.config.source)
        return buildApp(app, tls, self._engine, self._reactor, self.gate)

    def _startChecks(self, app: AppConfig) -> None:
        """
        Start (or restart, with new settings) the active health checks of
        C{app}, if it has any.
        """
        self._stopChecks(app.name)
        if app.healthCheck is not None:
            checker = HealthChecker(self.factories[app.name].health, self._reactor, app.healthCheck)
            self._checkers[app.name] = checker
            checker.start()

    def _stopChecks(self, name: str) -> None:
        checker = self._checkers.pop(name, None)
        if checker is not None:
            checker.stop()

    def bind(self) -> None:
        """
        Bind every port of every app, or none; a second call does nothing.

        @raise ListenError: naming the app and port that could not be bound.
        """
        if self._sockets or self.listeningPorts:
            return
        listeners = self.config.listeners()
        address = self.config.bindAddress
        sockets = bindAll([(_owner(app.name), address, port) for app, port in listeners])
        self._sockets = {port: sock for (app, port), sock in zip(listeners, sockets, strict=True)}

    def unbind(self) -> None:
        """
        Close the sockets bound by L{bind} and not yet listening.
        """
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def privilegedStartService(self) -> None:
        self.bind()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        self.bind()
        raiseFileLimit(self.log)
        Service.startService(self)
        self._engine.start()
        for app, port in self.config.listeners():
            self._listen(port, self.factories[app.name], self._sockets.pop(port))
        for app in self.config.apps:
            self.log.info(
                "app {quoted}: listening on {address} port(s) {portList}, relaying to {targetList}",
                app=app.name,
                quoted=quoted(app.name),
                address=self.config.bindAddress,
                ports=list(app.ports),
                targets=[str(t) for t in app.targets],
                portList=", ".join(map(str, app.ports)) + (" (TLS)" if app.tls else ""),
                targetList=", ".join(map(str, app.targets)) + (" (TLS)" if app.targetTLS else ""),
            )
        for app in self.config.apps:
            self._startChecks(app)
        for trigger in self._triggers:
            trigger.start(self.reload)

    def _listen(self, port: int, appFactory: ProxyServerFactory, sock: socket.socket) -> None:
        portFactory = self._portFactories[port] = _PortFactory(appFactory, port, self._engine)
        self.listeningPorts[port] = SocketPort(self._reactor, sock, portFactory)
        portFactory.host = self.listeningPorts[port].getHost()
        self.gate.portAdded(self.listeningPorts[port])

    def openConnections(self) -> int:
        return sum(len(factory.relays) for factory in self._allFactories())

    def _allFactories(self) -> list[ProxyServerFactory]:
        """
        The factories of the apps, and of removed apps with connections open.
        """
        return [*self.factories.values(), *self._retired]

    # Reload

    def reload(self) -> Deferred[ReloadResult]:
        """
        Read L{configPath} again and apply the difference (see L{apply}).

        A file that is refused (by L{loadConfig}, the very validator used at
        start-up) is logged, naming the app, key and value, and changes
        nothing.  Never fails: whatever happens is in the result and the log.

        @return: fires with the L{ReloadResult} once the listeners of
            removed ports are closed.
        """
        if not self.running:
            self.log.info("reload ignored: the proxy is stopping", path=self.configPath, result=REFUSED)
            return succeed(ReloadResult(REFUSED, errors=("the proxy is stopping",)))
        try:
            # One validator for start-up and reload; applying can refuse too
            # (a TLS file of a changed app), before anything has changed.
            return self.apply(loadConfig(self.configPath))
        except ConfigError as e:
            self.log.error(
                "reload refused, nothing changed: {error}",
                path=self.configPath,
                result=REFUSED,
                error=str(e),
            )
            return succeed(ReloadResult(REFUSED, errors=(str(e),)))
        except Exception:
            self.log.failure("reload of {path} failed unexpectedly", path=self.configPath)
            return succeed(ReloadResult(REFUSED, errors=("unexpected error (see the log)",)))

    def apply(self, new: ProxyConfig) -> Deferred[ReloadResult]:
        """
        Change what runs from L{config} to C{new}, without a restart.

          - A new port is bound and listens; a port that cannot be bound is
            logged and left out, and the rest still applies.
          - A removed port stops listening; its open connections go on.
          - A port moved to another app keeps its socket: the next client it
            accepts goes to the other app.
          - An app's settings (targets, connect timeout) apply to its next
            new connection; open ones keep their target.  The round-robin
            rotation goes on for the targets that stay.
          - A removed app's open connections go on, and are drained (or
            aborted) with the others when the proxy stops.
          - C{DrainTimeout} applies to the next stop.
          - C{BindAddress}: see L{_rebind}.

        @return: fires with the L{ReloadResult} once the listeners of removed
            (or re-bound) ports are closed.
        """
        old = self.config
        plan = planReload(old, new)
        errors: list[str] = []
        # The TLS files of new and changed apps are read first: one refused
        # refuses the whole reload, before anything is changed.
        tls = {
            app.name: loadAppTLS(app, new.source)
            for app in new.apps
            if app.name not in self.factories or self.factories[app.name].app != app
        }

        # Everything that can fail comes first, so a failure can still be
        # left out of what is applied.
        address = new.bindAddress
        rebound = self._rebind(plan, errors)
        if rebound is None:
            address = old.bindAddress
        bound: dict[int, socket.socket] = {}
        for port, name in plan.addedPorts:
            try:
                [bound[port]] = bindAll([(_owner(name), address, port)])
            except ListenError as e:
                errors.append(str(e))
        failed = {port for port, _ in plan.addedPorts} - set(bound)
        running = withoutPorts(dataclasses.replace(new, bindAddress=address), failed)

        # Apps before ports, so that a port always finds its app's factory.
        for app in running.apps:
            factory = self.factories.get(app.name)
            if factory is None:
                self.factories[app.name] = self._newFactory(app, tls[app.name])
                self._startChecks(app)
            elif factory.app != app:
                check = app.healthCheck
                factory.health.update(app.name, app.targets, *((check.rise, check.fall) if check else (2, 3)))
                restartChecks = (factory.app.targets, factory.app.healthCheck) != (app.targets, check)
                dialer = self._dialerFor(factory, app, tls[app.name])
                factory.reconfigure(app, self._balancerFor(factory, app), dialer, tls[app.name])
                if restartChecks:
                    self._startChecks(app)
        for app in plan.removedApps:
            self._stopChecks(app.name)
            self._retire(self.factories.pop(app.name))
        self.gate.setMaximum(new.maxConnections)

        for move in plan.movedPorts:
            self._portFactories[move.port].appFactory = self.factories[move.toApp]
        for port, name in plan.addedPorts:
            if port in bound:
                self._listen(port, self.factories[name], bound[port])
        closing = []
        for port, _ in plan.removedPorts:
            del self._portFactories[port]
            closing.append(maybeDeferred(self.listeningPorts.pop(port).stopListening))
        for port, sock in (rebound or {}).items():
            previous = self.listeningPorts[port]
            self.listeningPorts[port] = SocketPort(self._reactor, sock, self._portFactories[port])
            self._portFactories[port].host = self.listeningPorts[port].getHost()
            self.gate.portAdded(self.listeningPorts[port])
            closing.append(maybeDeferred(previous.stopListening))

        self.config = running
        applied = planReload(old, running)
        if errors:
            status = APPLIED_WITH_ERRORS if applied else NOT_APPLIED
        else:
            status = APPLIED if applied else UNCHANGED
        result = ReloadResult(status, applied, tuple(errors))
        self._logResult(result)
        done = gatherResults(closing, consumeErrors=True)
        return done.addBoth(lambda _: result)

    def _rebind(self, plan: ReloadPlan, errors: list[str]) -> dict[int, socket.socket] | None:
        """
        A change of C{BindAddress} re-binds every port, all or nothing.

        Every port still configured gets a new socket on the new address,
        bound before the old one closes, so no port refuses a client in
        between; the old sockets then close (the connections they accepted
        go on).  If one port cannot be bound, none changes: every port stays
        on the old address, the reason is logged, and the rest of the reload
        applies.  (The alternative, refusing the whole change with "restart
        needed", would be worse for the user a hot reload is for: a restart
        is exactly what drops long connections.  A proxy half on one address
        and half on the other is what nobody wants.)

        The kernel allows no second listener on a port beside one on an
        overlapping address (the wildcard C{0.0.0.0} or C{::} and a specific
        one), so such a change cannot be made without a moment of refusal:
        it is refused, saying that a restart is needed for it.

        @return: port to its new socket, C{{}} if the address did not change,
            or C{None} if it could not be changed.
        """
        if plan.bindAddress is None:
            return {}
        old, new = plan.bindAddress
        kept = [(app.name, port) for app, port in plan.new.listeners() if port in self.listeningPorts]
        try:
            sockets = bindAll([(_owner(name), new, port) for name, port in kept])
        except ListenError as e:
            hint = ""
            # bindAll raised from the OSError, which is kept as the context.
            inUse = getattr(e.__context__, "errno", None) == errno.EADDRINUSE
            if inUse and (old in _WILDCARDS or new in _WILDCARDS):
                hint = (
                    f" ({old} and {new} overlap, and the kernel allows no second listener on a port"
                    " beside this proxy's own: restart tcpproxy to make this change)"
                )
            errors.append(f"BindAddress not changed, every port stays on {old}: {e}{hint}")
            return None
        return {port: sock for (name, port), sock in zip(kept, sockets, strict=True)}

    def _balancerFor(self, factory: ProxyServerFactory, app: AppConfig):
        if factory.app.targets == app.targets:
            return factory.balancer
        return factory.balancer.withTargets(app.targets)

    def _dialerFor(self, factory: ProxyServerFactory, app: AppConfig, tls: AppTLS):
        """
        @param tls: the app's TLS, as loaded for this reload.
        """
        same = (factory.app.connectTimeout, factory.app.targetTLS) == (app.connectTimeout, app.targetTLS)
        if same and tls.client is None:
            return factory.dialer
        return buildDialer(app, tls, self._engine, factory.health)

    def _retire(self, factory: ProxyServerFactory) -> None:
        """
        Keep a removed app's factory until its last connection has ended.
        """
        if factory.relays:
            self._retired.add(factory)
            factory.whenIdle().addCallback(lambda _: self._retired.discard(factory))

    def _logResult(self, result: ReloadResult) -> None:
        plan = result.plan
        parts = [result.status, *plan.describe(), *(f"error: {e}" for e in result.errors)]
        emit = self.log.warn if result.errors else self.log.info
        emit(
            "reload of {path}: {summary}",
            path=self.configPath,
            summary="; ".join(parts),
            result=result.status,
            portsAdded=[port for port, _ in plan.addedPorts],
            portsRemoved=[port for port, _ in plan.removedPorts],
            portsMoved=[[m.port, m.fromApp, m.toApp] for m in plan.movedPorts],
            appsAdded=[app.name for app in plan.addedApps],
            appsRemoved=[app.name for app in plan.removedApps],
            appsChanged={c.name: list(c.keys) for c in plan.changedApps},
            errors=list(result.errors),
        )

    # Stop

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting now; give open connections the drain period to end.

        The reload triggers stop only once the drain is over: until then a
        C{SIGHUP} (a configuration tool reloading as it always does) is
        still ours, and only logged, instead of ending the process with the
        default action and dropping the connections being drained.
        """
        Service.stopService(self)
        for name in list(self._checkers):
            self._stopChecks(name)
        self.unbind()
        ports, self.listeningPorts = list(self.listeningPorts.values()), {}
        self._portFactories.clear()
        stopped = gatherResults([maybeDeferred(port.stopListening) for port in ports])
        stopped.addCallback(lambda _: self._drain())
        stopped.addBoth(self._stopped)
        return stopped

    def _stopped(self, result: object) -> object:
        """
        The drain is over: nothing is relayed or reloaded any more.
        """
        for trigger in self._triggers:
            trigger.stop()
        self._engine.stop()
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
        deadline = self._reactor.callLater(timeout, self._abortRemaining)
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
