"""
The proxy as a Twisted service: one listener per port of every app, and an
orderly stop that drains open connections before aborting what is left.
"""

from __future__ import annotations

import json
import socket

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from tcpproxy.balancer import RoundRobin
from tcpproxy.config import ProxyConfig
from tcpproxy.dialer import FailoverDialer
from tcpproxy.listening import adoptTCP, bindAll
from tcpproxy.relay import ProxyServerFactory


class ProxyService(Service):
    """
    Serve a L{ProxyConfig}.

    Sockets are bound by L{bind} (which C{twistd} start-up calls early, see
    L{tcpproxy.tap}) and adopted by the reactor in L{startService}.  Stopping
    closes every listener at once, waits up to C{config.drainTimeout} seconds
    for open connections to end by themselves, then aborts the rest.

    @ivar factories: app name to its L{ProxyServerFactory}.
    """

    log = Logger()

    def __init__(self, config: ProxyConfig, reactor) -> None:
        self.config = config
        self._reactor = reactor
        self.factories: dict[str, ProxyServerFactory] = {
            app.name: ProxyServerFactory(
                app,
                RoundRobin(app.targets),
                FailoverDialer(reactor, app.connectTimeout),
                reactor,
            )
            for app in config.apps
        }
        self._sockets: dict[int, socket.socket] = {}
        self.listeningPorts: dict[int, IListeningPort] = {}

    def bind(self) -> None:
        """
        Bind every port of every app, or none; a second call does nothing.

        @raise ListenError: naming the app and port that could not be bound.
        """
        if self._sockets or self.listeningPorts:
            return
        listeners = self.config.listeners()
        address = self.config.bindAddress
        sockets = bindAll([(f"app {json.dumps(app.name)}", address, port) for app, port in listeners])
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
        Service.startService(self)
        for app, port in self.config.listeners():
            factory = self.factories[app.name]
            self.listeningPorts[port] = adoptTCP(self._reactor, self._sockets.pop(port), factory)
        for app in self.config.apps:
            self.log.info(
                "app {quoted}: listening on {address} port(s) {portList}, relaying to {targetList}",
                app=app.name,
                quoted=json.dumps(app.name),
                address=self.config.bindAddress,
                ports=list(app.ports),
                targets=[str(t) for t in app.targets],
                portList=", ".join(map(str, app.ports)),
                targetList=", ".join(map(str, app.targets)),
            )

    def openConnections(self) -> int:
        return sum(len(factory.relays) for factory in self.factories.values())

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting now; give open connections the drain period to end.
        """
        Service.stopService(self)
        self.unbind()
        ports, self.listeningPorts = list(self.listeningPorts.values()), {}
        stopped = gatherResults([maybeDeferred(port.stopListening) for port in ports])
        stopped.addCallback(lambda _: self._drain())
        return stopped

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
        return gatherResults([f.whenIdle() for f in self.factories.values()]).addCallback(lambda _: None)

    def _abortRemaining(self) -> None:
        self.log.warn(
            "drain period over: aborting {count} connection(s) still open",
            count=self.openConnections(),
        )
        for factory in self.factories.values():
            factory.abortAll()
