"""
Which ports the tester talks to, chosen from the proxy's configuration.

The proxy listens on C{BindAddress}; the tester connects there, except that
a wildcard address (which cannot be connected to) means this machine's
loopback of the same family.  C{--app} and C{--port} narrow the choice, and
a name or number the configuration does not have is refused with a message
that lists what it does have.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from twisted.internet.abstract import isIPv6Address
from twisted.internet.interfaces import IStreamClientEndpoint

from tcpproxy.config import ProxyConfig, Target, parseTarget
from tcpproxy.dialer import endpointForTarget

TLS_SKIPPED = "the app terminates TLS here, and the tester speaks plain TCP only"
"""
Why a TLS port is not tested: plaintext sent to it would only be refused
by the TLS handshake, which would read as a broken proxy.
"""


class SelectionError(Exception):
    """
    C{--app}, C{--port} or C{--host} names nothing the tester can talk to;
    the text says what is wrong for a person.
    """


@dataclass(frozen=True)
class ProxyPort:
    """
    One port of one app, and where to connect to reach it.

    @ivar app: the app's name.
    @ivar port: the port, as configured.
    @ivar target: the address the tester connects to.
    @ivar tls: the app terminates TLS on it (the tester speaks plain TCP
        only, so such a port is left out, saying so: see L{TLS_SKIPPED}).
    """

    app: str
    port: int
    target: Target
    tls: bool = False

    def __str__(self) -> str:
        return f"app {json.dumps(self.app)} port {self.port} ({self.target})"

    def endpoint(self, reactor) -> IStreamClientEndpoint:
        """
        The client endpoint that reaches this port.
        """
        return endpointForTarget(reactor, self.target)


def connectHost(bindAddress: str) -> str:
    """
    The address to connect to for a proxy bound to C{bindAddress}.
    """
    if bindAddress in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bindAddress == "::":
        return "::1"
    return bindAddress


def targetFor(host: str, port: int) -> Target:
    """
    The address of C{port} on C{host} (a hostname or an IP literal).

    @raise SelectionError: C{host} is not a valid host.
    """
    text = f"[{host}]:{port}" if isIPv6Address(host) else f"{host}:{port}"
    try:
        return parseTarget(text)
    except ValueError as e:
        raise SelectionError(f"--host {host!r}: {text} {e}") from None


def selectPorts(
    config: ProxyConfig,
    apps: tuple[str, ...] = (),
    ports: tuple[int, ...] = (),
    host: str | None = None,
) -> list[ProxyPort]:
    """
    The ports of C{config} to test, in configuration order.

    @param apps: only these apps (all when empty).
    @param ports: only these ports (all of the chosen apps' when empty).
    @param host: connect here instead of the configuration's bind address.
    @raise SelectionError: an app or port is unknown, or the two leave nothing.
    """
    names = [app.name for app in config.apps]
    for name in apps:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
            raise SelectionError(
                f"--app {json.dumps(name)}: no such app in {config.source}{hint}; "
                f"its apps are {', '.join(names)}"
            )
    chosen = [app for app in config.apps if not apps or app.name in apps]
    chosenPorts = {port for app in chosen for port in app.ports}
    for port in ports:
        if port not in chosenPorts:
            owner = [app.name for app in config.apps if port in app.ports]
            if owner:
                why = f"it belongs to app {json.dumps(owner[0])}, which --app left out"
            else:
                why = f"no app in {config.source} listens on it"
            raise SelectionError(f"--port {port}: {why}")
    address = host if host is not None else connectHost(config.bindAddress)
    return [
        ProxyPort(app.name, port, targetFor(address, port), app.tls is not None)
        for app in chosen
        for port in app.ports
        if not ports or port in ports
    ]
