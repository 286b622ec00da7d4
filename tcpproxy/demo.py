"""
Echo backends for trying the proxy on one machine, with no network.

C{twistd -n tcpproxy --demo-backends} serves an echo server on each loopback
target of the configuration, so that the shipped C{config.json} answers at
once; C{--demo-down TARGET} leaves a target dead on purpose, to watch failover.
The echo honours backpressure and half-close, so it also serves the tester's
and the test suite's checks.
"""

from __future__ import annotations

import ipaddress

from twisted.application.service import Service
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from tcpproxy.config import HOSTNAME, ProxyConfig, Target
from tcpproxy.listening import adoptTCP, bindAll


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Send back every byte; after the peer's EOF, send what is left then close.

    The transport is its own producer, so a peer that does not read stops
    this side from reading instead of growing its buffer.
    """

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


def echoFactory() -> Factory:
    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    return factory


def isLoopback(target: Target) -> bool:
    """
    Whether C{target} names this machine's loopback interface by address.
    """
    if target.kind == HOSTNAME:
        return False
    return ipaddress.ip_address(target.host).is_loopback


class DemoBackendsService(Service):
    """
    Echo servers on the loopback targets of a configuration.

    @ivar targets: the targets served, in configuration order.
    """

    log = Logger()

    def __init__(self, config: ProxyConfig, reactor, down: frozenset[str] = frozenset()) -> None:
        self._reactor = reactor
        self.targets: list[Target] = []
        for app in config.apps:
            for target in app.targets:
                if isLoopback(target) and str(target) not in down and target not in self.targets:
                    self.targets.append(target)
        self.down = sorted(down)
        self._sockets: list = []
        self._ports: list = []

    def bind(self) -> None:
        """
        Bind every echo port, or none.

        @raise ListenError: naming the target that could not be bound.
        """
        if not (self._sockets or self._ports):
            self._sockets = bindAll([("demo backend", t.host, t.port) for t in self.targets])

    def unbind(self) -> None:
        """
        Close the sockets bound by L{bind} and not yet listening.
        """
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def startService(self) -> None:
        self.bind()
        Service.startService(self)
        factory = echoFactory()
        self._ports = [adoptTCP(self._reactor, sock, factory) for sock in self._sockets]
        self._sockets = []
        self.log.info(
            "demo: echo backends on {served}; left down on purpose: {downList}",
            served=", ".join(map(str, self.targets)) or "none",
            downList=", ".join(self.down) or "none",
            targets=[str(t) for t in self.targets],
            down=self.down,
        )

    def stopService(self):
        Service.stopService(self)
        ports, self._ports = self._ports, []
        for port in ports:
            port.stopListening()
