"""
Targets discovered in DNS: an app's C{"srv:_service._tcp.name"} targets
(RFC 2782 SRV records) and its hostnames with C{"Resolve": "all"} (every A
and AAAA address), looked up again every C{"Refresh"} seconds.

Nothing here relays or dials.  A lookup's answer becomes a list of
L{Target}s; when the app's list changes it is handed to the service, which
applies it exactly as a configuration reload applies new targets
(L{tcpproxy.app.updateApp}): open connections go on, targets that stay keep
their health and counts, the rotation goes on.

The lookups are asynchronous (L{twisted.names}, UDP on the reactor, no
thread), asked of the top-level C{"Resolvers"} or of the name servers of
C{/etc/resolv.conf}.  A lookup that fails or comes back empty keeps the
source's last good answer for C{"Hold"} seconds (a DNS server restarting
must not empty a pool of healthy targets); each change of a source's state
is logged once, not at every retry.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Sequence

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSQueryTimeoutError, DNSServerError
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpproxy.config import (
    HOSTNAME,
    IPV4,
    IPV6,
    MAX_REFRESH,
    MAX_WEIGHT,
    MIN_REFRESH,
    AppConfig,
    DNSSource,
    Target,
    normalName,
)
from tcpproxy.describe import quoted
from tcpproxy.resolve import nameServers

LOOKUP_TIMEOUT = (1, 3)
"""
Seconds before each retry of one query (L{Resolver}'s C{timeout}): a
lookup gives up after 4 s, well before the next refresh is due.
"""
RETRY = 5.0
"""
Seconds before a source that has never answered is asked again when the
app has no C{"Refresh"}: there is no TTL to go by.
"""

MAX_ALIASES = 8
"""
CNAME records followed at most from the name asked to its addresses
(RFC 1034 section 3.6.2 lets an answer carry the chain); a longer chain,
or one that loops, gives no address.
"""

OK = "ok"
HELD = "held"
EXPIRED = "expired"
UNRESOLVED = "unresolved"


def clampTTL(ttl: float) -> float:
    """
    The refresh period a TTL gives: kept within L{MIN_REFRESH} and
    L{MAX_REFRESH} seconds (a TTL of 0 would ask in a loop; a day-long one
    would keep a removed target for a day).
    """
    return min(MAX_REFRESH, max(MIN_REFRESH, float(ttl)))


def srvWeight(weight: int) -> int:
    """
    A target's weight from its SRV record's: the same, kept within 1 and
    L{MAX_WEIGHT}.  RFC 2782 gives a weight of 0 "a very small chance" of
    being chosen, not none, so it becomes 1, not a drain.
    """
    return min(MAX_WEIGHT, max(1, weight))


def _target(host: str, port: int, weight: int = 1, backup: bool = False) -> Target:
    if isIPAddress(host):
        kind = IPV4
    elif isIPv6Address(host):
        kind = IPV6
    else:
        kind = HOSTNAME
    return Target(host, port, kind, weight, backup=backup)


def _address(record: dns.RRHeader) -> str | None:
    if record.type == dns.A:
        return record.payload.dottedQuad()
    if record.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, record.payload.address)
    return None


def _nameKey(name: dns.Name) -> bytes:
    # Twisted's Name compares without regard to case but hashes with it.
    return name.name.lower().rstrip(b".")


def answering(
    records: Sequence[dns.RRHeader], name: bytes | str, type: int, aliases: int = MAX_ALIASES
) -> tuple[list[dns.RRHeader], int]:
    """
    The records of an answer section that answer the question asked of it:
    of class IN, of C{type}, and owned by C{name} or by a name reached from
    it through at most C{aliases} CNAME records of the same section (RFC
    1034 section 3.6.2), without a loop.  Names compare without regard to
    case (RFC 4343).

    Why: a server, buggy or hostile, or a forger, may put in any record;
    one for a name never asked about must not become a target.

    @param records: the answer section (L{dns.RRHeader}s).
    @param name: the name asked.
    @param aliases: 0 for no alias (an SRV name's own records only).
    @return: the records used, in the server's order, and how many records
        of the section were neither used nor a CNAME on the way to them.
    """
    chain: dict[bytes, bytes] = {}
    for record in records:
        if record.type == dns.CNAME and record.cls == dns.IN:
            chain.setdefault(_nameKey(record.name), _nameKey(record.payload.name))
    owner = _nameKey(dns.Name(name))
    owners = [owner]
    for _ in range(aliases):
        owner = chain.get(owner)
        if owner is None or owner in owners:
            break
        owners.append(owner)
    used = [r for r in records if r.type == type and r.cls == dns.IN and _nameKey(r.name) in owners]
    followed = sum(
        1 for r in records if r.type == dns.CNAME and r.cls == dns.IN and _nameKey(r.name) in owners[:-1]
    )
    return used, len(records) - len(used) - followed


class Answer:
    """
    One source's lookup, answered.

    @ivar targets: in order: SRV records by priority (lowest first, the
        others as backup targets), then by weight (heaviest first);
        addresses in the order the server gave.
    @ivar ttl: the smallest TTL of the records used (seconds).
    @ivar ignored: how many records of the answer section were left out as
        not answering the question asked (L{answering}): another name,
        class or type.
    """

    def __init__(self, targets: Sequence[Target], ttl: float, ignored: int = 0) -> None:
        self.targets = tuple(dict.fromkeys(targets))
        self.ttl = ttl
        self.ignored = ignored


def lookUp(resolver, source: DNSSource) -> Deferred[Answer]:
    """
    Ask C{resolver} (an L{twisted.names} C{IResolver}) for C{source}'s targets.

    An SRV record's host is resolved from the answer's additional section
    when the server put its addresses there (Consul and Kubernetes do),
    else with A and AAAA queries to the same resolver: the system's resolver
    would not know a name only the discovery server serves.

    @return: a L{Deferred} firing with an L{Answer} (possibly empty), or
        failing as the resolver's lookup failed.
    """
    if source.kind == "srv":
        return resolver.lookupService(source.name, timeout=LOOKUP_TIMEOUT).addCallback(
            _fromSRV, source.name, resolver
        )
    ignored: list[int] = []

    def answer(found: list[tuple[str, float]]) -> Answer:
        return Answer(
            [_target(a, source.port) for a, _ in found], min((t for _, t in found), default=0), sum(ignored)
        )

    return _addresses(resolver, source.name, ignored).addCallback(answer)


def _addresses(resolver, name: str, ignored: list[int] | None = None) -> Deferred[list[tuple[str, float]]]:
    """
    The A and AAAA addresses of C{name}, each with its TTL; a failure if
    both lookups failed (an empty list if the name has none).  Only the
    records that answer the question asked are used (L{answering}).

    @param ignored: if given, the count of records left out of each answer
        is appended to it.
    """
    lookups = [
        resolver.lookupAddress(name, timeout=LOOKUP_TIMEOUT),
        resolver.lookupIPV6Address(name, timeout=LOOKUP_TIMEOUT),
    ]
    failures: list[Failure] = []

    def caught(reason: Failure) -> None:
        if not reason.check(DNSNameError):
            failures.append(reason)
        return None

    def combine(results: list) -> list[tuple[str, float]]:
        found: list[tuple[str, float]] = []
        for result, type in zip(results, (dns.A, dns.AAAA), strict=True):
            if result is not None:
                used, left = answering(result[0], name, type)
                if ignored is not None:
                    ignored.append(left)
                for record in used:
                    address = _address(record)
                    if address is not None:
                        found.append((address, record.ttl))
        if not found and len(failures) == len(lookups):
            failures[0].raiseException()
        return found

    return gatherResults([d.addErrback(caught) for d in lookups]).addCallback(combine)


def _fromSRV(result: tuple, name: str, resolver) -> Deferred[Answer]:
    answers, _authority, additional = result
    # Only the SRV records of the name asked (an alias is not followed).
    records, ignored = answering(answers, name, dns.SRV, aliases=0)
    # RFC 2782: lowest priority first; within one, heavier first.
    records.sort(key=lambda r: (r.payload.priority, -r.payload.weight))
    known: dict[str, list[tuple[str, float]]] = {}
    for record in additional:
        address = _address(record) if record.cls == dns.IN else None
        if address is not None:
            known.setdefault(normalName(str(record.name)), []).append((address, record.ttl))
    ttls = [r.ttl for r in records]
    # RFC 2782: a client must try the lowest priority first and the others
    # only if those cannot be reached; they are the app's backup targets.
    lowest = records[0].payload.priority if records else 0

    def each(record: dns.RRHeader) -> Deferred[list[Target]]:
        srv = record.payload
        host = normalName(str(srv.target))
        if host in ("", "."):
            # "." says the service is decidedly not available (RFC 2782).
            return succeed([])
        if isIPAddress(host) or isIPv6Address(host):
            found: Deferred = succeed([(host, record.ttl)])
        elif host in known:
            found = succeed(known[host])
        else:
            found = _addresses(resolver, host).addErrback(lambda _: [])

        def targets(addresses: list[tuple[str, float]]) -> list[Target]:
            ttls.extend(t for _, t in addresses)
            backup = srv.priority > lowest
            return [_target(a, srv.port, srvWeight(srv.weight), backup) for a, _ in addresses]

        return found.addCallback(targets)

    def answer(lists: list[list[Target]]) -> Answer:
        return Answer([t for targets in lists for t in targets], min(ttls, default=0), ignored)

    return gatherResults([each(r) for r in records]).addCallback(answer)


class _Source:
    """
    What is known of one source: its last good answer and its state.
    """

    def __init__(self) -> None:
        self.targets: tuple[Target, ...] = ()
        self.goodAt: float | None = None
        self.ttl: float | None = None
        self.state: str | None = None


def describeLookupFailure(reason: Failure | None, ignored: int = 0) -> str:
    """
    Why a lookup gave no target, for the log: C{reason} the lookup's
    failure, or C{None} if it was answered without a usable record, of
    which C{ignored} records were left out as answering another question
    (L{answering}).
    """
    if reason is None:
        if ignored:
            return f"no usable record: {ignored} record(s) for another name, class or type ignored"
        return "no usable record"
    if reason.check(DNSNameError):
        return "no such name"
    if reason.check(DNSQueryTimeoutError):
        return "no answer from the name servers"
    if reason.check(DNSServerError):
        return "the name server failed"
    return reason.getErrorMessage() or reason.type.__name__


class AppDiscovery:
    """
    The DNS sources of one app, looked up every C{"Refresh"} seconds on
    C{clock}.

    @ivar targets: the targets found now, every source's in the order of
        the app's C{"Targets"} (duplicates left out).
    """

    log = Logger()

    def __init__(
        self,
        app: AppConfig,
        resolver,
        clock: IReactorTime,
        changed: Callable[[str], None],
    ) -> None:
        """
        @param resolver: an L{twisted.names} C{IResolver}.
        @param changed: called with the app's name when L{targets} changed.
        """
        self.app = app
        self.resolver = resolver
        self.clock = clock
        self._changed = changed
        self._sources: dict[DNSSource, _Source] = {s: _Source() for s in app.discover}
        self._call: IDelayedCall | None = None
        self._pending: Deferred | None = None
        self._running = False
        self.targets: tuple[Target, ...] = ()

    def configure(self, app: AppConfig, resolver) -> None:
        """
        New settings (a reload): sources that stay keep what they found;
        new ones are looked up at once.
        """
        added = [s for s in app.discover if s not in self._sources]
        self._sources = {s: self._sources.get(s) or _Source() for s in app.discover}
        self.app = app
        self.resolver = resolver
        self.targets = self._combined()
        if self._running and added:
            self._lookUpNow()

    def start(self) -> None:
        self._running = True
        self._lookUpNow()

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _lookUpNow(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pending is None:
            self.lookUp()

    def lookUp(self) -> Deferred[None]:
        """
        Ask for every source now; the next round is scheduled once all
        have answered or failed.
        """
        self._call = None
        sources = list(self._sources)

        def ask(source: DNSSource) -> Deferred:
            try:
                d = lookUp(self.resolver, source)
            except Exception:
                d = Deferred()
                d.errback(Failure())
            # Each source's outcome, answer or failure, as a value: one
            # source failing must not hide another's answer.
            return d.addCallbacks(lambda answer: (answer, None), lambda reason: (None, reason))

        d = gatherResults([ask(s) for s in sources])
        self._pending = d

        def answered(results: list) -> None:
            self._pending = None
            if not self._running:
                return
            for source, (answer, reason) in zip(sources, results, strict=True):
                if source in self._sources:
                    self._answered(source, self._sources[source], answer, reason)
            self._update()
            self._schedule()

        return d.addCallback(answered)

    def _answered(
        self, source: DNSSource, known: _Source, result: Answer | None, reason: Failure | None
    ) -> None:
        """
        Keep C{source}'s new answer, or its last good one for C{Hold}
        seconds after a lookup that failed (C{reason}) or found nothing;
        log each change of its state once.
        """
        now = self.clock.seconds()
        app = self.app
        if result is not None and result.targets:
            known.ttl = result.ttl
            if known.state != OK or known.targets != result.targets:
                self.log.info(
                    "app {quoted}: {source} gives {count} target(s): {targetList}",
                    app=app.name,
                    quoted=quoted(app.name),
                    source=str(source),
                    count=len(result.targets),
                    targets=[str(t) for t in result.targets],
                    targetList=", ".join(map(str, result.targets)),
                    discovery=OK,
                )
            known.targets = result.targets
            known.goodAt = now
            known.state = OK
            return
        why = describeLookupFailure(reason, result.ignored if result is not None else 0)
        if known.goodAt is None:
            if known.state != UNRESOLVED:
                known.state = UNRESOLVED
                self.log.warn(
                    "app {quoted}: {source} does not resolve ({why}): no targets from it until it does",
                    app=app.name,
                    quoted=quoted(app.name),
                    source=str(source),
                    why=why,
                    discovery=UNRESOLVED,
                )
            return
        if now - known.goodAt >= app.hold:
            if known.state != EXPIRED:
                known.state = EXPIRED
                self.log.warn(
                    "app {quoted}: {source} has not answered for {hold:g} s ({why}):"
                    " its {count} target(s) removed",
                    app=app.name,
                    quoted=quoted(app.name),
                    source=str(source),
                    why=why,
                    hold=app.hold,
                    count=len(known.targets),
                    discovery=EXPIRED,
                )
            known.targets = ()
            return
        if known.state != HELD:
            known.state = HELD
            self.log.warn(
                "app {quoted}: lookup of {source} failed ({why}): keeping its {count} last target(s)"
                " for up to {hold:g} s",
                app=app.name,
                quoted=quoted(app.name),
                source=str(source),
                why=why,
                hold=app.hold,
                count=len(known.targets),
                discovery=HELD,
            )

    def _combined(self) -> tuple[Target, ...]:
        return tuple(dict.fromkeys(t for known in self._sources.values() for t in known.targets))

    def _update(self) -> None:
        combined = self._combined()
        # Targets are equal by address: a change of weight is a change too.
        if [dataclasses.astuple(t) for t in combined] != [dataclasses.astuple(t) for t in self.targets]:
            self.targets = combined
            self._changed(self.app.name)

    def nextDelay(self) -> float:
        """
        Seconds until the next round: the app's C{"Refresh"}, or the
        smallest TTL of the answers clamped (L{clampTTL}), or L{RETRY} if
        no source has answered yet; never past the moment a held answer
        expires.
        """
        if self.app.refresh is not None:
            delay = self.app.refresh
        else:
            ttls = [k.ttl for k in self._sources.values() if k.ttl is not None]
            delay = clampTTL(min(ttls)) if ttls else RETRY
        now = self.clock.seconds()
        for known in self._sources.values():
            if known.state == HELD and known.goodAt is not None:
                delay = min(delay, max(MIN_REFRESH, known.goodAt + self.app.hold - now))
        return delay

    def _schedule(self) -> None:
        if self._running and self._sources:
            self._call = self.clock.callLater(self.nextDelay(), self.lookUp)


class _Unsolicited:
    """
    The controller of L{DiscoveryResolver}'s protocols: a message that
    answers no query of ours is dropped.
    """

    def messageReceived(self, message, protocol, address=None) -> None:
        pass


def asks(message: dns.Message, query: dns.Query) -> bool:
    """
    Whether C{message}'s question section is C{query}: one question, of the
    same name (without regard to case), type and class.
    """
    if len(message.queries) != 1:
        return False
    question = message.queries[0]
    return _nameKey(question.name) == _nameKey(query.name) and (question.type, question.cls) == (
        query.type,
        query.cls,
    )


class _QuestionProtocol(dns.DNSDatagramProtocol):
    """
    A L{dns.DNSDatagramProtocol} for the queries of one question: a
    datagram whose question section is not that question (L{asks}) is
    dropped as if it had not come, before the protocol matches its id.

    Why: RFC 5452 section 9.1 accepts a reply only if its question matches
    the query's.  Twisted's protocol checks the id and the server; were a
    reply with the right id but another question handed to it, it would
    take it and stop waiting for the true one.

    @ivar question: the L{dns.Query} asked.
    """

    def __init__(self, controller, question: dns.Query, reactor) -> None:
        dns.DNSDatagramProtocol.__init__(self, controller, reactor=reactor)
        self.question = question

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        message = dns.Message()
        try:
            message.fromStr(data)
        except (EOFError, ValueError):
            pass  # not a message: the protocol drops it (and says why)
        else:
            if not asks(message, self.question):
                return
        dns.DNSDatagramProtocol.datagramReceived(self, data, addr)


@implementer(IReadDescriptor)
class _QuerySocket:
    """
    One UDP socket on a port the kernel picks at random, for the queries of
    one lookup, closed when the lookup is done: the transport of a
    L{dns.DNSDatagramProtocol}, read through the reactor's public
    L{IReactorFDSet}.

    Twisted's own UDP port (C{listenUDP}) logs a line when it opens and
    another when it closes, whatever the protocol's C{noisy}: with a socket
    per lookup and C{"Refresh": 1} that would be several lines a second in
    the proxy's log.  This socket logs nothing.

    @param family: C{AF_INET} or C{AF_INET6}, that of the servers asked.
    """

    MAX_READS = 16
    """Datagrams read at most per readiness (then back to the reactor)."""

    def __init__(self, reactor, family: int, protocol: dns.DNSDatagramProtocol) -> None:
        self.reactor = reactor
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        # Port 0: the kernel picks a free ephemeral port at random for each
        # socket (Linux randomises it), as RFC 5452 section 9.2 asks.
        self.socket.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        self.protocol = protocol
        protocol.makeConnection(self)
        reactor.addReader(self)

    def getHost(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            self.socket.sendto(data, address)
        except OSError:
            pass  # as a datagram lost: the query times out, the next server is asked

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "DNSQuery"

    def doRead(self) -> None:
        for _ in range(self.MAX_READS):
            try:
                data, address = self.socket.recvfrom(512)
            except OSError:
                return
            self.protocol.datagramReceived(data, address[:2])
            if self.protocol.transport is None:
                return

    def connectionLost(self, reason) -> None:
        self.close()

    def close(self) -> None:
        if self.protocol.transport is not None:
            self.reactor.removeReader(self)
            self.socket.close()
            self.protocol.doStop()


class DiscoveryResolver(ResolverBase):
    """
    Asks name servers over UDP, each lookup from a new socket on a random
    source port.

    A forged answer must match the query's random 16-bit id and come to its
    source port: with one long-lived socket the port is known and only the
    id is left to guess.  RFC 5452 section 9.2 asks for an unpredictable
    source port, and different ports for queries outstanding at once; here
    each lookup has its own socket
    (L{_QuerySocket}, logging nothing), closed when it is answered or gives
    up.  An answer is taken only from the server asked, with the id asked
    (L{dns.DNSDatagramProtocol}), and with the question asked (RFC 5452
    section 9.1, L{_QuestionProtocol}): any other reply is ignored, the
    query still waits.  The servers are tried in turn, each with
    each timeout of L{LOOKUP_TIMEOUT}.

    @param servers: C{(address, port)} of each name server.
    """

    def __init__(self, servers: Sequence[tuple[str, int]], reactor) -> None:
        ResolverBase.__init__(self)
        self.servers = list(servers)
        self.reactor = reactor
        self._open: set[_QuerySocket] = set()

    def _socket(self, family: int, query: dns.Query) -> _QuerySocket:
        protocol = _QuestionProtocol(_Unsolicited(), query, self.reactor)
        protocol.noisy = False
        each = _QuerySocket(self.reactor, family, protocol)
        self._open.add(each)
        return each

    def _lookup(self, name: bytes, cls: int, type: int, timeout):
        query = dns.Query(name, type, cls)
        attempts = [(server, seconds) for seconds in (timeout or LOOKUP_TIMEOUT) for server in self.servers]
        sockets: dict[int, _QuerySocket] = {}

        def answered(message: dns.Message):
            if message.rCode == dns.ENAME:
                raise DNSNameError(message)
            if message.rCode != dns.OK:
                raise DNSServerError(message)
            return (message.answers, message.authority, message.additional)

        def attempt(index: int) -> Deferred:
            server, seconds = attempts[index]
            family = socket.AF_INET6 if isIPv6Address(server[0]) else socket.AF_INET
            if family in sockets and sockets[family].protocol.transport is None:
                return fail(DNSQueryTimeoutError(name))  # closed: the resolver stopped
            if family not in sockets:
                try:
                    sockets[family] = self._socket(family, query)
                except OSError:
                    return fail()

            def unanswered(reason: Failure):
                reason.trap(DNSQueryTimeoutError)
                if index + 1 < len(attempts):
                    return attempt(index + 1)
                return reason

            return sockets[family].protocol.query(server, [query], seconds).addCallbacks(answered, unanswered)

        def close(result):
            for each in sockets.values():
                self._open.discard(each)
                each.close()
            return result

        return attempt(0).addBoth(close)

    def stop(self) -> None:
        """
        Close the sockets of the lookups under way (the service stops);
        their queries then go unanswered.
        """
        while self._open:
            self._open.pop().close()


def resolverFor(servers: Sequence[tuple[str, int]], reactor) -> DiscoveryResolver:
    """
    The resolver of targets found in DNS: asking C{servers}, or the name
    servers of C{/etc/resolv.conf} if none is given.
    """
    return DiscoveryResolver(list(servers) or nameServers(), reactor)


class Discovery:
    """
    The DNS sources of every app of a service.

    @param changed: called with an app's name when its discovered targets
        changed; L{runtime} then gives the app as it now runs.
    @param resolverFactory: makes the resolver from the top-level
        C{"Resolvers"} and the reactor (L{resolverFor}; tests give a fake).
    """

    def __init__(
        self,
        reactor,
        servers: Sequence[tuple[str, int]],
        changed: Callable[[AppConfig], None],
        resolverFactory: Callable = resolverFor,
    ) -> None:
        self.reactor = reactor
        self._servers = tuple(servers)
        self._resolverFactory = resolverFactory
        self._resolver = None
        self._changed = changed
        self.apps: dict[str, AppDiscovery] = {}
        self._running = False

    @property
    def resolver(self):
        if self._resolver is None:
            self._resolver = self._resolverFactory(self._servers, self.reactor)
        return self._resolver

    def setServers(self, servers: Sequence[tuple[str, int]]) -> None:
        """
        Ask C{servers} from the next lookup on (a reload).
        """
        servers = tuple(servers)
        if servers != self._servers:
            self._servers = servers
            self._closeResolver()
            for each in self.apps.values():
                each.configure(each.app, self.resolver)

    def runtime(self, app: AppConfig) -> AppConfig:
        """
        C{app} as it runs: its written targets, then those found in DNS for
        the sources it has now.
        """
        if not app.discover:
            return app
        each = self.apps.get(app.name)
        found: tuple[Target, ...] = ()
        if each is not None:
            wanted = set(app.discover)
            found = tuple(
                dict.fromkeys(t for s, k in each._sources.items() if s in wanted for t in k.targets)
            )
        return dataclasses.replace(app, targets=tuple(dict.fromkeys((*app.targets, *found))))

    def track(self, app: AppConfig) -> AppConfig:
        """
        Look C{app}'s sources up from now on (or stop, if it has none), and
        give it as it runs (L{runtime}).
        """
        each = self.apps.get(app.name)
        if not app.discover:
            self.forget(app.name)
            return app
        if each is None:
            each = self.apps[app.name] = AppDiscovery(app, self.resolver, self.reactor, self._found)
            if self._running:
                each.start()
        else:
            each.configure(app, self.resolver)
        return self.runtime(app)

    def forget(self, name: str) -> None:
        each = self.apps.pop(name, None)
        if each is not None:
            each.stop()

    def start(self) -> None:
        self._running = True
        for each in self.apps.values():
            each.start()

    def stop(self) -> None:
        self._running = False
        for each in self.apps.values():
            each.stop()
        self._closeResolver()

    def _closeResolver(self) -> None:
        resolver, self._resolver = self._resolver, None
        stop = getattr(resolver, "stop", None)
        if stop is not None:
            stop()

    def _found(self, name: str) -> None:
        each = self.apps.get(name)
        if each is not None:
            self._changed(self.runtime(each.app))
