"""
A DNS server for tests, on 127.0.0.1: L{twisted.names}' own server
answering from a zone the test changes while it runs.  Tests of targets
found in DNS ask it, and never the machine's name servers.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.names.server import DNSServerFactory


class Zone(ResolverBase):
    """
    Records by name, changed by the test at will: C{srv(name, [(priority,
    weight, port, host)])}, C{a(name, [addresses])}.  A name it has no
    record of is answered "no such name" (NXDOMAIN).

    It is also a resolver itself (an C{IResolver}, answering at once), for
    tests on a L{Clock}; with C{down} set it fails every lookup as a
    timeout would.
    """

    def __init__(self, ttl: int = 1) -> None:
        ResolverBase.__init__(self)
        self.ttl = ttl
        self.records: dict[tuple[bytes, int], list[dns.RRHeader]] = {}
        self.queries: list[tuple[str, int]] = []
        self.down = False

    def srv(self, name: str, records: list[tuple[int, int, int, str]]) -> None:
        self.records[(name.encode(), dns.SRV)] = [
            dns.RRHeader(
                name.encode(), dns.SRV, ttl=self.ttl, payload=dns.Record_SRV(p, w, port, host, self.ttl)
            )
            for p, w, port, host in records
        ]

    def a(self, name: str, addresses: list[str]) -> None:
        self.records[(name.encode(), dns.A)] = [
            dns.RRHeader(name.encode(), dns.A, ttl=self.ttl, payload=dns.Record_A(address, self.ttl))
            for address in addresses
        ]

    def aaaa(self, name: str, addresses: list[str]) -> None:
        self.records[(name.encode(), dns.AAAA)] = [
            dns.RRHeader(name.encode(), dns.AAAA, ttl=self.ttl, payload=dns.Record_AAAA(address, self.ttl))
            for address in addresses
        ]

    def answer(self, name: str, type: int, records: list[dns.RRHeader]) -> None:
        """
        Answer the question C{name}, C{type} with C{records} as they are,
        whatever their owner names, types and classes: a server that puts
        in records not asked for.
        """
        self.records[(name.encode(), type)] = list(records)

    def remove(self, name: str) -> None:
        for key in [key for key in self.records if key[0] == name.encode()]:
            del self.records[key]

    def _lookup(self, name, cls, type, timeout):
        self.queries.append((name.decode(), type))
        if self.down:
            # Asked directly (as a fake resolver): as a server not answering.
            return fail(error.DNSQueryTimeoutError(name))
        found = self.records.get((name, type))
        if found is None:
            if any(key[0] == name for key in self.records):
                return succeed(([], [], []))  # the name, without this type
            return fail(error.DNSNameError(name))
        return succeed((list(found), [], []))


class _RecordingFactory(DNSServerFactory):
    """
    A server that notes the address each query came from (its C{peers}),
    and sends its C{forgeries} before each reply.
    """

    def messageReceived(self, message, proto, address=None):
        self.peers.append(address)
        return DNSServerFactory.messageReceived(self, message, proto, address)

    def sendReply(self, protocol, message, address):
        for queries, answers in self.forgeries:
            forged = dns.Message(id=message.id, answer=1)
            forged.queries = list(queries)
            forged.answers = list(answers)
            protocol.writeMessage(forged, address)
        DNSServerFactory.sendReply(self, protocol, message, address)


class DNSServer:
    """
    A L{Zone} served over UDP on 127.0.0.1, on a free port, until the test
    ends (or L{stop}).  C{peers} lists the C{(address, port)} each query
    came from.  C{forgeries} lists C{(queries, answers)}: before each
    reply, a reply with the same id (from the same address and port) but
    these question and answer sections is sent, as a forger who guessed
    the id and port, or a buggy server, would.
    """

    def __init__(self, testCase, zone: Zone) -> None:
        self.zone = zone
        self.factory = _RecordingFactory(clients=[zone])
        self.factory.noisy = False
        self.peers: list[tuple[str, int]] = []
        self.factory.peers = self.peers
        self.forgeries: list[tuple[list[dns.Query], list[dns.RRHeader]]] = []
        self.factory.forgeries = self.forgeries
        self.protocol = dns.DNSDatagramProtocol(self.factory)
        self.port = reactor.listenUDP(0, self.protocol, interface="127.0.0.1")
        self.number = self.port.getHost().port
        testCase.addCleanup(self.stop)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.number}"

    def stop(self):
        """
        Stop answering: the port is closed, queries go unanswered.
        """
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
