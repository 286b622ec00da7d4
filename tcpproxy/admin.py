"""
The admin endpoint: HTTP on its own address (the top-level C{"Admin"}
key), served by C{twisted.web} in the proxy's own reactor.

  - C{GET /metrics}: Prometheus' text format (L{tcpproxy.metrics}).
  - C{GET /status}: every app, its ports, limits, connections and targets,
    as JSON (L{statusOf}); C{GET /} the same as an HTML page that
    refreshes itself (L{tcpproxy.statuspage}).
  - C{GET /ready}: 200 while the proxy serves, 503 from the moment it
    begins to stop (the drain), so a balancer in front stops sending new
    clients before the listeners close; C{GET /live}: 200 while the
    reactor runs.
  - C{POST /apps/{app}/targets/{target}/drain} and C{.../ready}: take a
    target out of rotation, and put it back (HAProxy's C{set server state
    drain} and C{ready}); see L{tcpproxy.health.HealthTracker.drain}.

Only clients in C{Allow} (loopback by default) are served; the others get
403.  Everything is read and done in the reactor thread, when asked: the
relay does nothing for the admin endpoint between two requests.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tcpproxy.config import AdminConfig, Network, ProxyConfig, parseTarget
from tcpproxy.listening import bindAll
from tcpproxy.metrics import CONNECT_ERRORS, ProxyCollector, bytesTotals, idleByTarget, openByTarget, refusals
from tcpproxy.statuspage import renderPage

if TYPE_CHECKING:
    from tcpproxy.service import ProxyService

log = Logger(namespace="tcpproxy.admin")


def allowed(host: str, networks: Sequence[Network]) -> bool:
    """
    Whether a client at C{host} (an IP address) is in one of C{networks};
    an IPv4 client seen through an IPv6 socket (C{::ffff:a.b.c.d}) counts
    as its IPv4 address.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return any(address in network for network in networks)


def sameOrigin(request) -> bool:
    """
    Whether a request comes from no web page (C{curl}, a script) or from a
    page of the admin endpoint itself.

    A browser sends C{Origin} with a cross-site C{POST} (RFC 6454 section
    7.3; the Fetch standard), and a page on any site may make one to a
    loopback address: without this check, a page an operator happens to
    visit could drain targets through the operator's browser.
    """
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host")
    return host is not None and origin == b"http://" + host


def statusOf(service: ProxyService) -> dict:
    """
    What C{/status} answers: for every app of the running configuration,
    its ports, the limits in force, its connections and each target's
    state (C{up}, C{down}, C{draining} or C{stopped}), open connections,
    totals and last error, and, for an app with a warm pool (its C{pool}
    is not C{null}), the idle connections its pool holds to it
    (C{pooled}); the configuration file's path and load time.

    Times are Unix times (seconds); counts are since the app was started.
    """
    config = service.config
    apps = []
    for app in config.apps:
        factory = service.factories[app.name]
        open = openByTarget(factory)
        idle = idleByTarget(factory)
        bytesIn, bytesOut = bytesTotals(factory)
        targets = []
        # The targets as they run: with those found in DNS.
        for target in factory.app.targets:
            stats = factory.stats.targets.get(target)
            last = stats.lastError if stats is not None else None
            targets.append(
                {
                    "target": str(target),
                    "state": factory.health.stateOf(target),
                    "active": open[target],
                    "connections": stats.connections if stats is not None else 0,
                    "errors": {kind: stats.errors[kind] for kind in CONNECT_ERRORS} if stats else {},
                    "lastError": None if last is None else {"at": last[0], "reason": last[1]},
                    "pooled": idle[target] if idle is not None else 0,
                }
            )
        apps.append(
            {
                "name": app.name,
                "ports": list(app.ports),
                "tls": app.tls is not None,
                "targetTLS": app.targetTLS is not None,
                "pool": None if app.pool is None else {"size": app.pool.size, "maxIdle": app.pool.maxIdle},
                "limits": {
                    "maxConnections": app.maxConnections,
                    "maxConnectionsPerClient": app.maxConnectionsPerClient,
                    "bandwidthLimit": app.bandwidthLimit,
                    "connectTimeout": app.connectTimeout,
                    "idleTimeout": app.idleTimeout,
                },
                "connections": {
                    "active": factory.counter.total,
                    "total": factory.counter.opened,
                    "refused": refusals(factory),
                },
                "bytesReceived": bytesIn,
                "bytesSent": bytesOut,
                "targets": targets,
            }
        )
    return statusDocument(service, config, apps)


def statusDocument(source, config: ProxyConfig, apps: list[dict]) -> dict:
    """
    The C{/status} document around C{apps} (each app's entry): whether
    C{source} (the service, or the main process of workers) serves, its
    configuration file and when it was loaded, and the proxy-wide limits.
    """
    return {
        "ready": bool(source.running),
        "config": {"path": source.configPath, "loadedAt": source.loadedAt},
        "bindAddress": config.bindAddress,
        "limits": {"maxConnections": config.maxConnections, "drainTimeout": config.drainTimeout},
        "apps": apps,
    }


class AdminResource(Resource):
    """
    Every page of the admin endpoint, on one leaf resource that routes by
    path (the paths are few and fixed; C{/apps/...} carries two names).
    """

    isLeaf = True

    def __init__(self, service: ProxyService, allow: Sequence[Network]) -> None:
        Resource.__init__(self)
        self.service = service
        self.allow = tuple(allow)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(service))
        ProcessCollector(namespace="", registry=self.registry)

    def render(self, request) -> bytes:
        """
        The page C{request} asks for; to a C{HEAD}, the status and headers
        of the C{GET} with its C{Content-Length}, and no body (RFC 9110
        section 9.3.2): twisted.web would drop a body itself, but log a
        warning for each such request.
        """
        body = self._render(request)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def _render(self, request) -> bytes:
        if not allowed(request.getClientAddress().host, self.allow):
            return self._answer(
                request, 403, "forbidden: this address is not in the admin endpoint's Allow\n"
            )
        parts = [unquote(part) for part in request.path.decode("latin-1").split("/")[1:]]
        method = request.method.decode("latin-1")
        if (
            len(parts) == 5
            and parts[0] == "apps"
            and parts[2] == "targets"
            and parts[4] in ("drain", "ready")
        ):
            if method != "POST":
                request.setHeader(b"allow", b"POST")
                return self._answer(request, 405, "use POST\n")
            if not sameOrigin(request):
                return self._answer(request, 403, "forbidden: a POST from another site's page\n")
            return self._control(request, parts[1], parts[3], parts[4])
        page = {
            "": self._page,
            "status": self._status,
            "metrics": self._metrics,
            "ready": self._ready,
            "live": self._live,
        }.get("/".join(parts))
        if page is None:
            return self._answer(request, 404, "not found\n")
        if method not in ("GET", "HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._answer(request, 405, "use GET\n")
        return page(request)

    def _answer(
        self, request, code: int, text: str, contentType: bytes = b"text/plain; charset=utf-8"
    ) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", contentType)
        request.setHeader(b"cache-control", b"no-store")
        return text.encode("utf-8")

    def _json(self, request, code: int, value: object, indent: int | None = None) -> bytes:
        return self._answer(request, code, json.dumps(value, indent=indent) + "\n", b"application/json")

    def _metrics(self, request) -> bytes:
        # generate_latest here, in the reactor thread: prometheus_client's
        # own Twisted resource runs it in a thread of the pool, which would
        # read the proxy's counters while the reactor changes them.
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metricsText()

    def metricsText(self) -> bytes:
        """
        The C{/metrics} page: Prometheus' text format.
        """
        return generate_latest(self.registry)

    def _status(self, request) -> bytes:
        return self._json(request, 200, statusOf(self.service), indent=1)

    def _page(self, request) -> bytes:
        html = renderPage(statusOf(self.service), self.service.reactor.seconds())
        return self._answer(request, 200, html, b"text/html; charset=utf-8")

    def _ready(self, request) -> bytes:
        if self.service.running:
            return self._answer(request, 200, "ready\n")
        return self._answer(request, 503, "draining: the proxy is stopping\n")

    def _live(self, request) -> bytes:
        return self._answer(request, 200, "live\n")

    def _control(self, request, appName: str, targetText: str, action: str) -> bytes:
        factory = self.service.factories.get(appName)
        if factory is None:
            return self._json(request, 404, {"error": f"no app named {appName!r}"})
        try:
            target = parseTarget(targetText)
        except ValueError as e:
            return self._json(request, 404, {"error": f"target {targetText!r} {e}"})
        if target not in factory.health.states:
            return self._json(request, 404, {"error": f"{target} is not a target of app {appName!r}"})
        who = request.getClientAddress().host
        why = f"set by the admin endpoint (POST from {who})"
        change = factory.health.drain if action == "drain" else factory.health.ready
        changed = change(target, why)
        return self._json(
            request,
            200,
            {
                "app": appName,
                "target": str(target),
                "state": factory.health.stateOf(target),
                "changed": changed,
            },
        )


MAX_ALLOWED_CONNECTIONS = 16
"""
Connections open at once to the admin endpoint from clients in C{Allow}:
Prometheus keeps one, a browser up to six per host (the HTML living
standard's usual limit), an operator's C{curl} one each.
"""

MAX_OTHER_CONNECTIONS = 4
"""
Connections open at once from clients outside C{Allow} (each gets its 403):
few, so that they can take neither the descriptors the relay needs nor the
places of the allowed clients.
"""

MAX_CONNECTIONS = MAX_ALLOWED_CONNECTIONS + MAX_OTHER_CONNECTIONS
"""
Descriptors the admin endpoint's clients may hold at most: kept out of the
relay's descriptor budget (L{tcpproxy.limits.descriptorBudget}).
"""


MAX_BODY = 64 * 1024
"""
Bytes of a request's body kept: no page reads a body.
"""


class _AdminRequest(Request):
    """
    A request to the admin endpoint: its body is kept in memory up to
    L{MAX_BODY} and the rest dropped as it arrives.  twisted.web would
    write a body over 100,000 bytes to a temporary file, whole, before the
    page (and C{Allow}) is even looked at: any client that can connect,
    allowed or not, could fill the disk with a C{POST} of a large
    C{Content-Length}.
    """

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        room = MAX_BODY - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


class _AdminChannel(HTTPChannel):
    """
    An HTTP connection to the admin endpoint, counted by its site while open.
    """

    counted: str | None = None

    def connectionLost(self, reason) -> None:
        if self.counted is not None:
            self.site.open[self.counted] -= 1
            self.counted = None
        HTTPChannel.connectionLost(self, reason)


class _AdminSite(Site):
    """
    The admin endpoint's site: at most L{MAX_ALLOWED_CONNECTIONS} clients
    in C{Allow} and L{MAX_OTHER_CONNECTIONS} others open at once; one more
    is closed as soon as it is accepted.  Without a cap, idle connections
    (a scanner, a stuck scraper) would each hold a descriptor until
    twisted.web's idle timeout, outside the relay's descriptor budget, and
    could leave the proxy none to accept its own clients with.
    """

    noisy = False
    protocol = _AdminChannel
    requestFactory = _AdminRequest

    def __init__(self, resource: AdminResource) -> None:
        Site.__init__(self, resource)
        self.open = {"allowed": 0, "other": 0}

    def buildProtocol(self, addr):
        kind = "allowed" if allowed(addr.host, self.resource.allow) else "other"
        if self.open[kind] >= (MAX_ALLOWED_CONNECTIONS if kind == "allowed" else MAX_OTHER_CONNECTIONS):
            return None
        channel = Site.buildProtocol(self, addr)
        channel.counted = kind
        self.open[kind] += 1
        return channel

    def logPrefix(self) -> str:
        return "admin endpoint"

    def log(self, request) -> None:
        # A line per scrape would drown the proxy's own log.
        pass


class AdminServer:
    """
    The admin endpoint's listener, through the service's life: bound early
    (L{bind}, with the proxy's ports, so a port in use is refused before
    C{twistd} forks), served from L{start}, moved or turned on or off by a
    reload (L{reconfigure}), closed once the drain is over (L{stop}): the
    readiness page must answer 503 throughout the drain.

    @ivar config: the L{AdminConfig} served, or C{None} (off).
    @ivar port: the L{IListeningPort}, while listening.
    """

    resourceFactory = AdminResource
    """
    What serves the pages: given the service and C{Allow}.
    """

    def __init__(self, service: ProxyService, reactor) -> None:
        self.service = service
        self.reactor = reactor
        self.config: AdminConfig | None = None
        self.port: IListeningPort | None = None
        self._socket: socket.socket | None = None
        self.resource: AdminResource | None = None

    def bind(self, config: AdminConfig | None) -> None:
        """
        Bind C{config}'s address, to be served from L{start}.

        @raise ListenError: naming the configuration file.
        """
        self.config = config
        if config is not None and self._socket is None and self.port is None:
            [self._socket] = bindAll([(f"{self.service.config.source}: Admin", config.host, config.port)])

    def unbind(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def start(self) -> None:
        """
        Serve on the socket L{bind} made, if any.
        """
        if self._socket is None:
            return
        self._listen(self.config, self._socket)
        self._socket = None

    def _listen(self, config: AdminConfig, sock: socket.socket) -> None:
        self.resource = self.resourceFactory(self.service, config.allow)
        site = _AdminSite(self.resource)
        family = socket.AF_INET6 if isIPv6Address(config.host) else socket.AF_INET
        try:
            self.port = self.reactor.adoptStreamPort(sock.fileno(), family, site)
        finally:
            sock.close()  # the port has a duplicate of its own
        self.config = config
        if not config.loopback and not config.allowGiven:
            log.warn(
                "admin endpoint on {address}, which is not a loopback address, with no Allow:"
                ' only loopback clients are served, others get 403 (give "Allow" to let them in)',
                address=str(config),
            )
        log.info("admin endpoint listening on http://{address}/", address=str(config))

    def reconfigure(self, config: AdminConfig | None) -> Deferred[None]:
        """
        Serve C{config} from now on (a reload): bind a new address first,
        so that a failure changes nothing; a change of C{Allow} alone keeps
        the listener.

        @return: fires once the old listener, if any, is closed.
        @raise ListenError: the new address cannot be bound (nothing changed).
        """
        old = self.config
        if config == old:
            return succeed(None)
        if old is not None and config is not None and (old.host, old.port) == (config.host, config.port):
            self.config = config
            if self.resource is not None:
                self.resource.allow = config.allow
            return succeed(None)
        sock = None
        if config is not None:
            [sock] = bindAll([(f"{self.service.config.source}: Admin", config.host, config.port)])
        stopped = self.stop()
        self.config = None
        if sock is not None:
            self._listen(config, sock)
        return stopped

    def stop(self) -> Deferred[None]:
        """
        Stop listening (or close what L{bind} bound).
        """
        self.unbind()
        port, self.port = self.port, None
        self.resource = None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)
