"""
Applying a reload: a running L{tcpproxy.service.ProxyService} moved from
its configuration to a new one without a restart and without dropping a
connection.  What changed is planned by L{tcpproxy.reload} (a pure
difference of two configurations); this module carries it out on the
service's ports and apps, and logs one line for it.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed

from tcpproxy.app import ProxyServerFactory, updateApp
from tcpproxy.config import ConfigError, ProxyConfig
from tcpproxy.describe import quoted
from tcpproxy.listening import ListenError, SocketPort
from tcpproxy.pool import stopPool
from tcpproxy.reload import ReloadPlan, planReload, withoutPorts
from tcpproxy.tls import loadAppTLS

if TYPE_CHECKING:
    from tcpproxy.service import ProxyService

APPLIED = "applied"
APPLIED_WITH_ERRORS = "applied with errors"
NOT_APPLIED = "not applied"
UNCHANGED = "no change"
REFUSED = "refused"

_WILDCARDS = ("0.0.0.0", "::")


def owner(name: str) -> str:
    """
    Whose port it is, for a L{ListenError}: as at start-up.
    """
    return f"app {quoted(name)}"


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


class Reloader:
    """
    Reloads one L{ProxyService}'s configuration file, and applies it.

    Events are logged as the service's own (its C{log}).
    """

    def __init__(self, service: ProxyService) -> None:
        self._service = service

    def reload(self) -> Deferred[ReloadResult]:
        """
        Read L{configPath} again and apply the difference (see L{apply}).

        A file that is refused (by L{loadConfig}, the very validator used at
        start-up) is logged, naming the app, key and value, and changes
        nothing.  Never fails: whatever happens is in the result and the log.

        @return: fires with the L{ReloadResult} once the listeners of
            removed ports are closed.
        """
        return self._reload().addCallback(self._count)

    def _count(self, result: ReloadResult) -> ReloadResult:
        """
        Count a reload by its result (the metrics' C{tcpproxy_reloads_total}),
        and note when the file was last loaded: a reload that changed
        something, or found nothing to change.
        """
        service = self._service
        service.reloadCounts[result.status.replace(" ", "_")] += 1
        if result.status in (APPLIED, APPLIED_WITH_ERRORS, UNCHANGED):
            service.loadedAt = service.reactor.seconds()
        return result

    def _reload(self) -> Deferred[ReloadResult]:
        service = self._service
        if not service.running:
            service.log.info("reload ignored: the proxy is stopping", path=service.configPath, result=REFUSED)
            return succeed(ReloadResult(REFUSED, errors=("the proxy is stopping",)))
        try:
            # One validator for start-up and reload; applying can refuse too
            # (a TLS file of a changed app), before anything has changed.
            return self.apply(service.readConfig())
        except ConfigError as e:
            service.log.error(
                "reload refused, nothing changed: {error}",
                path=service.configPath,
                result=REFUSED,
                error=str(e),
            )
            return succeed(ReloadResult(REFUSED, errors=(str(e),)))
        except Exception:
            service.log.failure("reload of {path} failed unexpectedly", path=service.configPath)
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
          - C{Admin}: the endpoint is turned on, off or moved (a new
            address that cannot be bound leaves it as it was, logged).
          - C{BindAddress}: see L{_rebind}.

        @return: fires with the L{ReloadResult} once the listeners of removed
            (or re-bound) ports are closed.
        """
        service = self._service
        old = service.config
        plan = planReload(old, new)
        errors: list[str] = []
        # The TLS files of new and changed apps are read first: one refused
        # refuses the whole reload, before anything is changed.
        tls = {
            app.name: loadAppTLS(app, new.source)
            for app in new.apps
            if app.name not in service.factories
            or service.factories[app.name].app != service.discovery.runtime(app)
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
                [bound[port]] = service.bindListeners([(owner(name), address, port)])
            except ListenError as e:
                errors.append(str(e))
        failed = {port for port, _ in plan.addedPorts} - set(bound)
        admin = new.admin
        closing = []
        if plan.admin is not None:
            # Turned on, off or moved: bound before the old one closes, and
            # left as it was if the new address cannot be bound.
            try:
                closing.append(service.admin.reconfigure(new.admin))
            except ListenError as e:
                errors.append(str(e))
                admin = old.admin
        running = withoutPorts(dataclasses.replace(new, bindAddress=address, admin=admin), failed)

        # Apps before ports, so that a port always finds its app's factory.
        service.discovery.setServers(new.resolvers)
        for app in running.apps:
            # As it runs: with the targets found in DNS (tcpproxy.discovery).
            app = service.discovery.track(app)
            factory = service.factories.get(app.name)
            if factory is None:
                service.factories[app.name] = service.newFactory(app, tls[app.name])
                service.startChecks(app)
            elif factory.app != app:
                before = factory.app
                restartChecks = (
                    before.targets,
                    before.healthCheck,
                    before.sendProxy,
                    before.targetSendProxy,
                ) != (
                    app.targets,
                    app.healthCheck,
                    app.sendProxy,
                    app.targetSendProxy,
                )
                updateApp(factory, app, tls[app.name], service.engine)
                if restartChecks:
                    service.startChecks(app)
        for app in plan.removedApps:
            service.discovery.forget(app.name)
            service.stopChecks(app.name)
            factory = service.factories.pop(app.name)
            stopPool(factory.dialer)
            if factory.scaler is not None:
                factory.scaler.shutdown("a reload removed the app")
            self._retire(factory)
        service.gate.setMaximum(new.maxConnections)

        for move in plan.movedPorts:
            service.portFactories[move.port].appFactory = service.factories[move.toApp]
        for port, name in plan.addedPorts:
            if port in bound:
                service.listen(port, service.factories[name], bound[port])
        for port, _ in plan.removedPorts:
            del service.portFactories[port]
            closing.append(maybeDeferred(service.listeningPorts.pop(port).stopListening))
        for port, sock in (rebound or {}).items():
            previous = service.listeningPorts[port]
            service.listeningPorts[port] = SocketPort(service.reactor, sock, service.portFactories[port])
            service.portFactories[port].listeningOn(service.listeningPorts[port].getHost())
            service.gate.portAdded(service.listeningPorts[port])
            closing.append(maybeDeferred(previous.stopListening))

        service.config = running
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
        service = self._service
        if plan.bindAddress is None:
            return {}
        old, new = plan.bindAddress
        kept = [(app.name, port) for app, port in plan.new.listeners() if port in service.listeningPorts]
        try:
            sockets = service.bindListeners([(owner(name), new, port) for name, port in kept])
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

    def _retire(self, factory: ProxyServerFactory) -> None:
        """
        Keep a removed app's factory until its last connection has ended.
        """
        service = self._service
        if factory.relays:
            service.retired.add(factory)
            factory.whenIdle().addCallback(lambda _: service.retired.discard(factory))

    def _logResult(self, result: ReloadResult) -> None:
        service = self._service
        plan = result.plan
        parts = [result.status, *plan.describe(), *(f"error: {e}" for e in result.errors)]
        emit = service.log.warn if result.errors else service.log.info
        emit(
            "reload of {path}: {summary}",
            path=service.configPath,
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
