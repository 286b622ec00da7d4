"""
Hostname resolution that blocks neither the reactor nor a thread.

Twisted's default resolver runs C{getaddrinfo} in the reactor's thread pool
(ten threads): a lookup that never answers keeps its thread after its
connect has timed out, so a few slow names stall every other app's lookups
as well.  L{NameResolver} asks C{/etc/hosts} first, then the name servers of
C{/etc/resolv.conf}, with L{twisted.names}: each lookup is a UDP query on
the reactor, and a slow one holds nothing but a timer.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.names import dns, hosts
from twisted.names.client import Resolver
from zope.interface import implementer

RESOLV_CONF = "/etc/resolv.conf"
HOSTS = "/etc/hosts"
TIMEOUTS = (1, 3, 11)
"""
Seconds before each retry of a DNS query (L{Resolver}'s C{timeout}); the
dial gives up sooner, at the app's C{ConnectTimeout}.
"""


def nameServers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """
    The IPv4 name servers of a C{resolv.conf(5)} file; the local one (as
    the C library assumes) if it names none or cannot be read.
    """
    servers = []
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver" and ":" not in words[1]:
                    servers.append((words[1], dns.PORT))
    except OSError:
        pass
    return servers or [("127.0.0.1", dns.PORT)]


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        # The answer, if it ever comes, goes to a receiver that ignores it.
        pass


@implementer(IHostnameResolver)
class NameResolver:
    """
    Resolves a host name to its IPv4 and IPv6 addresses, for
    L{twisted.internet.endpoints.HostnameEndpoint}.

    As the C library's C{files dns} order does: a name that C{/etc/hosts}
    knows is answered from there alone (in whichever families it has), any
    other is asked of the name servers, A and AAAA at once.

    @param hostsResolver: looks names up in a hosts file (by default
        C{/etc/hosts}, read at each lookup).
    @param dnsResolver: asks name servers (by default those of
        C{/etc/resolv.conf}, read once, here).
    """

    def __init__(self, hostsResolver=None, dnsResolver=None, reactor=None) -> None:
        self._hosts = hostsResolver if hostsResolver is not None else hosts.Resolver(HOSTS.encode())
        if dnsResolver is None:
            dnsResolver = Resolver(servers=nameServers(), timeout=TIMEOUTS, reactor=reactor)
        self._dns = dnsResolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        kinds = [
            kind
            for kind, address in ((dns.A, IPv4Address), (dns.AAAA, IPv6Address))
            if addressTypes is None or address in addressTypes
        ]

        def fromDNS(found: list[IAddress]) -> object:
            if found:
                return found
            return self._lookup(self._dns, hostName, kinds, portNumber)

        def deliver(found: list[IAddress]) -> None:
            for address in found:
                resolutionReceiver.addressResolved(address)
            resolutionReceiver.resolutionComplete()

        self._lookup(self._hosts, hostName, kinds, portNumber).addCallback(fromDNS).addCallback(deliver)
        return resolution

    def _lookup(self, resolver, name: str, kinds: list[int], port: int):
        """
        Ask C{resolver} for each kind of record at once.

        @return: a L{Deferred} firing with the addresses found (failed and
            empty lookups give none).
        """
        lookups = [
            (resolver.lookupAddress if kind == dns.A else resolver.lookupIPV6Address)(name) for kind in kinds
        ]

        def addresses(results: list) -> list[IAddress]:
            found: list[IAddress] = []
            for kind, (ok, result) in zip(kinds, results, strict=True):
                if ok:
                    found.extend(_addresses(result[0], kind, port))
            return found

        return DeferredList(lookups, consumeErrors=True).addCallback(addresses)


def _addresses(answers, kind: int, port: int) -> list[IAddress]:
    found: list[IAddress] = []
    for record in answers:
        if record.type != kind:
            continue  # a CNAME on the way
        if kind == dns.A:
            found.append(IPv4Address("TCP", record.payload.dottedQuad(), port))
        else:
            found.append(IPv6Address("TCP", socket.inet_ntop(socket.AF_INET6, record.payload.address), port))
    return found
