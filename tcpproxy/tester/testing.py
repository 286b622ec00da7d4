"""
Test support: a real proxy and its echo backends in this process, on free
loopback ports, for the tester's own tests (and anyone else's).

Like L{twisted.internet.testing}, this lives beside the code it serves so
that tests elsewhere can use it too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol

from tcpproxy.config import ProxyConfig, parseConfig
from tcpproxy.demo import DemoBackendsService
from tcpproxy.service import ProxyService
from tcpproxy.tester.targets import ProxyPort, targetFor
from tcpproxy.tests.loopback import freePorts


class InProcessProxy:
    """
    A L{ProxyService} and L{DemoBackendsService} echo backends, configured on
    free loopback ports.

    @ivar document: the configuration as JSON would hold it (see L{writeConfig}).
    @ivar config: the parsed configuration.
    @ivar down: targets listed in the configuration where nothing listens.
    """

    def __init__(
        self,
        reactor,
        apps: Iterable[tuple[str, int, int]],
        downApps: Iterable[str] = (),
        drainTimeout: float = 0.5,
    ) -> None:
        """
        @param apps: C{(name, ports, targets)} for each app.
        @param downApps: apps none of whose targets is served.
        """
        apps = list(apps)
        downApps = set(downApps)
        numbers = iter(freePorts(sum(ports + targets for _, ports, targets in apps)))
        self.document: dict = {"BindAddress": "127.0.0.1", "DrainTimeout": drainTimeout, "Apps": []}
        down = []
        for name, ports, targets in apps:
            entry = {
                "Name": name,
                "Ports": [next(numbers) for _ in range(ports)],
                "Targets": [f"127.0.0.1:{next(numbers)}" for _ in range(targets)],
                "ConnectTimeout": 1,
            }
            self.document["Apps"].append(entry)
            if name in downApps:
                down.extend(entry["Targets"])
        self.down = frozenset(down)
        self.config: ProxyConfig = parseConfig(self.document, "<test config>")
        self.proxy = ProxyService(self.config, reactor)
        self.backends = DemoBackendsService(self.config, reactor, self.down)

    def start(self) -> None:
        self.backends.bind()
        self.proxy.bind()
        self.backends.startService()
        self.proxy.startService()

    def stop(self) -> Deferred:
        """
        Stop the proxy (draining it) and then the backends.
        """
        stopped = maybeDeferred(self.proxy.stopService)
        stopped.addCallback(lambda _: self.backends.stopService())
        return stopped

    def ports(self, apps: Iterable[str] = ()) -> list[ProxyPort]:
        """
        The proxy's ports (of C{apps}, or of all), as the tester sees them.
        """
        wanted = set(apps)
        return [
            ProxyPort(app.name, port, targetFor("127.0.0.1", port))
            for app in self.config.apps
            for port in app.ports
            if not wanted or app.name in wanted
        ]

    def writeConfig(self, path: str, extraApps: Iterable[dict] = ()) -> None:
        """
        Write the configuration (plus C{extraApps}, not served) to C{path}.
        """
        document = dict(self.document, Apps=self.document["Apps"] + list(extraApps))
        with open(path, "w") as f:
            json.dump(document, f)


class DelayedEcho(Protocol):
    """
    An echo that sends each chunk back after C{factory.delay} seconds, or
    never if that is C{None}: a slow backend, for tests of ending a run.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self._calls = []

    def dataReceived(self, data: bytes) -> None:
        if self.factory.delay is not None:
            self._calls.append(self.factory.clock.callLater(self.factory.delay, self.transport.write, data))

    def connectionLost(self, reason) -> None:
        self.factory.connections.remove(self)
        for call in self._calls:
            if call.active():
                call.cancel()
        if not self.factory.connections:
            waiting, self.factory.idle = self.factory.idle, []
            for d in waiting:
                d.callback(None)


class DelayedEchoFactory(Factory):
    protocol = DelayedEcho
    noisy = False

    def __init__(self, clock, delay: float | None) -> None:
        self.clock = clock
        self.delay = delay
        self.connections: list[DelayedEcho] = []
        self.idle: list[Deferred] = []

    def whenIdle(self) -> Deferred:
        """
        Fires once every connection to it has ended.
        """
        if not self.connections:
            return succeed(None)
        d: Deferred = Deferred()
        self.idle.append(d)
        return d
