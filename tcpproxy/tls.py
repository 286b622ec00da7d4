"""
TLS for the proxy: terminating it for an app's clients (with SNI), and
originating it towards an app's targets (with verification).

TLS runs in the proxy's own layer (L{tcpproxy.tlslayer}, which gives TLS
1.3's half-close to the relay), configured with Twisted's
L{CertificateOptions} and L{optionsForClientTLS}, so the relay sees a TLS
side as just another transport.  What this module adds:

  - L{loadAppTLS}: the PEM files of an app's C{TLS} and C{TargetTLS}
    settings, read and checked at start-up (and reload), so that a missing
    file, a key that is not the certificate's, or an unusable certificate is
    refused with a L{ConfigError} naming the app, key and path.

  - A handshake gate (L{_HandshakeGate}): the application protocol (the
    relay) is only built and connected once the TLS handshake is complete.
    A client that sends garbage, plaintext or nothing at all is dropped and
    logged without a target ever being dialled; a target whose certificate
    does not verify is a failed connect attempt, so the dialer fails over to
    the next target as it does for a refused connection.

  - L{TLSCloser}: how to close a TLS transport for certain (resumed first,
    aborted if the peer never answers C{close_notify}).
"""

from __future__ import annotations

import datetime
import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcpproxy.access import IConnectionRecord
from tcpproxy.config import AppConfig, ConfigError, Target, TargetTLSConfig, TLSConfig, normalName
from tcpproxy.connid import newConnectionId
from tcpproxy.describe import describeAddress
from tcpproxy.proxysend import carryProxyHeader
from tcpproxy.tlslayer import TLSLayerFactory
from tcpproxy.transport.tcp import IWriteBuffer

log = Logger()

CLOSE_TIMEOUT = 5.0
"""
Seconds a closing TLS transport may go without its peer answering
C{close_notify} (and without anything left to flush to it) before it is
aborted.
"""

MODERN_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"
)
"""
TLS 1.2 suites with forward secrecy and authenticated encryption only (TLS
1.3 suites are all of that kind and are not affected by this list).
"""

_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


# Reading and checking PEM files


class _Refuse:
    """
    Builds the L{ConfigError} for one app and key, as the config module does.
    """

    def __init__(self, source: str, app: str, key: str) -> None:
        self.prefix = f"{source}: app {json.dumps(app)}: key {json.dumps(key)}"

    def __call__(self, path: str | None, message: str) -> ConfigError:
        where = f"{self.prefix}: {path}" if path else self.prefix
        return ConfigError(f"{where}: {message}")


def _read(refuse: _Refuse, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise refuse(path, f"cannot read the file: {e.strerror or e}") from None


def _loadCertificates(refuse: _Refuse, path: str) -> list[x509.Certificate]:
    """
    The certificates of a PEM file, in the file's order (a chain file works).
    """
    data = _read(refuse, path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise refuse(path, "is not a PEM certificate (no valid BEGIN CERTIFICATE block)")
    return certificates


def _loadKey(refuse: _Refuse, path: str):
    data = _read(refuse, path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise refuse(path, "is an encrypted private key; give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        reason = str(e).split("\n")[0] or type(e).__name__
        raise refuse(path, f"is not a PEM private key ({reason})") from None


def _publicBytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificateNames(certificate: x509.Certificate) -> list[str]:
    """
    The DNS names a certificate is valid for: its subjectAltName entries, or
    its common name if it has none.
    """
    try:
        san = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return list(san.value.get_values_for_type(x509.DNSName))


def nameMatches(pattern: str, name: str) -> bool:
    """
    Whether C{name} is covered by a certificate name (a wildcard covers
    exactly one leftmost label); both are compared in their L{normalName}
    form, so a client's SNI in capitals or with a trailing dot still finds
    its certificate.
    """
    pattern, name = normalName(pattern), normalName(name)
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


@dataclass
class _KeyPair:
    """
    A certificate (with its chain) and the private key that goes with it.
    """

    chain: list[x509.Certificate]
    key: object
    names: list[str]

    def options(self, **kwargs) -> CertificateOptions:
        return CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.key),
            certificate=crypto.X509.from_cryptography(self.chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in self.chain[1:]] or None,
            **kwargs,
        )

    def privateCertificate(self) -> PrivateCertificate:
        pem = self.chain[0].public_bytes(serialization.Encoding.PEM)
        keyPEM = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return PrivateCertificate.loadPEM(pem + keyPEM)


def _loadKeyPair(refuse: _Refuse, certPath: str, keyPath: str, now: datetime.datetime) -> _KeyPair:
    """
    A certificate file and its key.  The leaf is the certificate that
    matches the key, wherever it is in the file (some tools write the
    intermediates first); the others follow it, in the file's order, as
    its chain.

    @raise ConfigError: a file cannot be read or is not PEM, or the key
        matches no certificate of the file.
    """
    certificates = _loadCertificates(refuse, certPath)
    key = _loadKey(refuse, keyPath)
    try:
        public = _publicBytes(key.public_key())
    except (AttributeError, ValueError):
        public = None
    leaf = None
    for certificate in certificates:
        try:
            if public is not None and _publicBytes(certificate.public_key()) == public:
                leaf = certificate
                break
        except (UnsupportedAlgorithm, ValueError):
            continue
    if leaf is None:
        if len(certificates) == 1:
            raise refuse(keyPath, f"is not the private key of the certificate {certPath}")
        raise refuse(
            keyPath,
            f"is not the private key of any of the {len(certificates)} certificates in {certPath}",
        )
    chain = [leaf, *(c for c in certificates if c is not leaf)]
    expires = leaf.not_valid_after_utc
    if expires < now:
        log.warn(
            "{where}: {path}: the certificate expired on {expires}; clients will refuse it",
            where=refuse.prefix,
            path=certPath,
            expires=expires.strftime("%Y-%m-%d %H:%M UTC"),
        )
    return _KeyPair(chain, key, certificateNames(leaf))


# Server side


def selectALPN(context: SSL.Context, protocols: Sequence[bytes]) -> None:
    """
    Make C{context} (a server's) answer a client's ALPN offer with the first
    of C{protocols} the client offers, or with no protocol at all.

    RFC 7301 section 3.2: the server picks by its own preference among the
    client's offers, hence the order of C{protocols} and not the client's.
    When none is in common (always, with C{protocols} empty) the handshake
    goes on without ALPN, as from a server that does not support it
    (OpenSSL's C{SSL_TLSEXT_ERR_NOACK}, pyOpenSSL's
    L{SSL.NO_OVERLAPPING_PROTOCOLS}).  Section 3.2 would have a server
    that supports ALPN send a fatal C{no_application_protocol} alert
    instead; a layer-4 proxy does not speak the application protocol, so it
    leaves that judgement to the target rather than turn a mismatch into a
    refusal.

    This replaces the callback Twisted's L{CertificateOptions} always
    installs: its empty answer for "no protocol" makes OpenSSL abort every
    handshake of a client that offers ALPN (curl, browsers) with an
    C{internal_error} alert.

    @param protocols: protocol names, the proxy's preferred first.
    """
    preferred = tuple(protocols)
    # Not about ALPN, but set here as it is on every server context before
    # its first connection: OpenSSL frees a connection's read and write
    # buffers (some 34 KiB) whenever they are empty.  Twisted sets it too;
    # saying so here keeps it if that default changes.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)

    def select(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
        for protocol in preferred:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    context.set_alpn_select_callback(select)


def serverOptions(pairs: list[_KeyPair], minVersion: str, alpn: Sequence[str] = ()) -> CertificateOptions:
    """
    Options for terminating TLS with C{pairs}: the first is the default, and
    a client's SNI name picks the first whose names cover it.  Every one of
    their contexts answers ALPN the same way (L{selectALPN} with C{alpn}).
    """
    common = {"raiseMinimumTo": _VERSIONS[minVersion], "acceptableCiphers": MODERN_CIPHERS}
    protocols = [name.encode("ascii") for name in alpn]
    contexts = [(pair.names, pair.options(**common).getContext()) for pair in pairs[1:]]
    for _, context in contexts:
        selectALPN(context, protocols)

    def contextForServerName(serverName: bytes | None) -> SSL.Context | None:
        if not serverName:
            return None
        name = serverName.decode("ascii", "replace")
        if any(nameMatches(p, name) for p in pairs[0].names):
            return None
        for names, context in contexts:
            if any(nameMatches(p, name) for p in names):
                return context
        return None

    options = pairs[0].options(contextForServerName=contextForServerName, **common)
    selectALPN(options.getContext(), protocols)
    return options


# The handshake gate, on both sides


@implementer(IHandshakeListener)
class _HandshakeGate(Protocol):
    """
    Stands in for the application protocol until the TLS handshake is
    complete; then builds it, hands it the TLS transport, and steps aside
    (the TLS transport delivers straight to the application from then on).

    @ivar factory: the L{_GateFactory} that made it.
    @ivar connectionId: a client's connection id (L{tcpproxy.connid}),
        given from its accept on, and to the protocol it is passed on to;
        C{None} towards a target.
    """

    factory: _GateFactory
    passedOn = False
    reported = False
    connectionId: str | None = None

    def __init__(self, addr) -> None:
        self.addr = addr

    def connectionMade(self) -> None:
        if self.factory.pending is not None:
            self.factory.pending.add(self)

    def drop(self, why: str) -> None:
        """
        Give up on this client's handshake (L{PendingHandshakes} says so):
        log C{why} and abort the connection.
        """
        self.reported = True  # Here, not again by connectionLost.
        self.factory.handshakeFailed(self, why)
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        try:
            self._passOn()
        finally:
            # Only now: the protocol passed on has counted the client in by
            # then (an accept gate never sees it gone in between).
            if self.factory.pending is not None:
                self.factory.pending.remove(self)

    def _passOn(self) -> None:
        transport = self.transport
        if transport.disconnecting:
            # Verification failed inside the handshake: connectionLost follows.
            return
        protocol = self.factory.wrappedFactory.buildProtocol(self.addr)
        if protocol is None:
            transport.loseConnection()
            return
        if IConnectionRecord.providedBy(protocol):
            # A client's relay: its record gets the session's fields and
            # the id its log lines had.  (Towards a target there is none.)
            protocol.tlsFields = sessionFields(transport)
            if self.connectionId is not None:
                protocol.connectionId = self.connectionId
        self.passedOn = True
        transport.wrappedProtocol = protocol
        protocol.makeConnection(transport)
        self.factory.handshakeDone(protocol)

    def dataReceived(self, data: bytes) -> None:
        # TLS delivers application data only after handshakeCompleted, which
        # replaced this gate as the TLS transport's protocol.
        raise AssertionError("application data before the TLS handshake completed")

    def connectionLost(self, reason: Failure) -> None:
        if self.factory.pending is not None:
            self.factory.pending.remove(self)
        if not self.passedOn and not self.reported:
            self.factory.handshakeFailed(self, describeTLSFailure(reason), reason)


class PendingHandshakes:
    """
    The TLS handshakes under way at one app's ports: capped in number, and
    expired by one timer rather than one per client.

    Each holds some 60 KiB of OpenSSL state once its ClientHello has been
    answered (measured with OpenSSL 3.0 and C{SSL_MODE_RELEASE_BUFFERS},
    which Twisted sets and L{serverOptions} makes sure of), so a flood of
    clients that never finish would hold memory without bound: at
    C{maxPending}, the oldest handshake is dropped for the newcomer.  The
    oldest rather than the newcomer, because a client that completes its
    handshake does so in a few round trips, so under a flood the ones that
    wait longest are the least likely to be real; turning newcomers away
    would let a flood that keeps C{maxPending} clients stalled refuse every
    real one.

    Handshakes that run out of time are dropped by one timer, at most
    L{BATCH} per turn of the reactor: thousands of clients of a flood,
    connected in the same second, would otherwise time out in one turn, and
    dropping each (an abort and a log line, some 0.1 ms) stalled every
    other connection of the proxy for that long.

    All handshakes get the same timeout, so the order they started in is the
    order they expire in: an L{OrderedDict} of gate to deadline is the whole
    schedule (its oldest entry found, and removed, in constant time).
    """

    BATCH = 64
    """
    Handshakes dropped per turn of the reactor at most.
    """

    def __init__(
        self, clock: IReactorTime, timeout: float, maxPending: int | None, acceptGate=None
    ) -> None:
        """
        @param timeout: seconds a handshake may take.
        @param maxPending: handshakes under way at most, or C{None}.
        @param acceptGate: the proxy-wide L{tcpproxy.limits.AcceptGate}, if
            any: a handshake under way holds a descriptor and counts as a
            connection there, from its start to its end, or clients would
            be accepted past the limit while their handshakes run (the
            relay counts the client itself once it is handed over).
        """
        self.clock = clock
        self.timeout = timeout
        self.maxPending = maxPending
        self.acceptGate = acceptGate
        self._deadlines: OrderedDict[_HandshakeGate, float] = OrderedDict()
        self._timer = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, gate: _HandshakeGate) -> None:
        """
        A handshake starts; if that makes one too many, the oldest is
        dropped.
        """
        if self.maxPending is not None and len(self._deadlines) >= self.maxPending:
            oldest = next(iter(self._deadlines))
            self.remove(oldest)
            oldest.drop(f"{self.maxPending} TLS handshakes under way (MaxPendingHandshakes), this the oldest")
        self._deadlines[gate] = self.clock.seconds() + self.timeout
        if self.acceptGate is not None:
            self.acceptGate.connectionOpened()
        if self._timer is None:
            self._timer = self.clock.callLater(self.timeout, self._sweep)

    def remove(self, gate: _HandshakeGate) -> None:
        """
        A handshake is over (done, failed or dropped); unknown gates are
        ignored.  The timer stays while a handshake is left (when it fires
        it finds the next deadline), and goes with the last one.
        """
        if self._deadlines.pop(gate, None) is not None:
            self._ended()
        if not self._deadlines and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        dropped = 0
        while self._deadlines:
            gate, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                self._timer = self.clock.callLater(deadline - now, self._sweep)
                return
            if dropped == self.BATCH:
                self._timer = self.clock.callLater(0, self._sweep)  # the rest next turn
                return
            dropped += 1
            del self._deadlines[gate]
            self._ended()
            gate.drop(f"no TLS handshake within {self.timeout:g}s")

    def _ended(self) -> None:
        if self.acceptGate is not None:
            self.acceptGate.connectionClosed()


class _GateFactory(Factory):
    """
    Builds L{_HandshakeGate}s in front of C{wrappedFactory}'s protocols.
    """

    noisy = False
    protocol = _HandshakeGate

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        handshakeTimeout: float | None,
        maxPending: int | None = None,
        acceptGate=None,
        refusals: Counter[str] | None = None,
    ) -> None:
        """
        @param handshakeTimeout: seconds a handshake may take, or C{None}
            for no limit (then C{maxPending} is ignored too).
        @param refusals: where a client whose handshake failed is counted,
            under C{"tls_handshake"} (the app's refusals, for its metrics).
        @param maxPending: handshakes under way at most (see
            L{PendingHandshakes}), or C{None} for no cap.
        @param acceptGate: what the handshakes under way count into (see
            L{PendingHandshakes}).
        """
        self.wrappedFactory = wrappedFactory
        self.clock = clock
        self.handshakeTimeout = handshakeTimeout
        self.refusals = refusals
        self.pending: PendingHandshakes | None = None
        if handshakeTimeout is not None:
            self.pending = PendingHandshakes(clock, handshakeTimeout, maxPending, acceptGate)

    def buildProtocol(self, addr) -> _HandshakeGate:
        gate = _HandshakeGate(addr)
        gate.factory = self
        return gate

    def handshakeDone(self, protocol: Protocol) -> None:
        pass

    def handshakeFailed(self, gate: _HandshakeGate, why: str, reason: Failure | None = None) -> None:
        pass


class _ServerGateFactory(_GateFactory):
    def buildProtocol(self, addr) -> _HandshakeGate:
        gate = _GateFactory.buildProtocol(self, addr)
        gate.connectionId = newConnectionId()
        return gate

    def handshakeFailed(self, gate: _HandshakeGate, why: str, reason: Failure | None = None) -> None:
        if self.refusals is not None:
            self.refusals["tls_handshake"] += 1
        log.warn(
            "[{connectionId}] {client}: TLS client dropped: {why}",
            connectionId=gate.connectionId,
            client=describeAddress(gate.transport.getPeer()),
            why=why,
            event="tls-handshake-failed",
        )


class _ClientGateFactory(_GateFactory):
    """
    One connect attempt to a TLS target: C{result} fires with the
    application protocol once the handshake is complete, or fails with
    L{TLSHandshakeFailed}.
    """

    def __init__(self, wrappedFactory, clock, result: Deferred) -> None:
        _GateFactory.__init__(self, wrappedFactory, clock, None)
        self.result = result
        self.gate: _HandshakeGate | None = None

    def buildProtocol(self, addr) -> _HandshakeGate:
        self.gate = _GateFactory.buildProtocol(self, addr)
        return self.gate

    def handshakeDone(self, protocol: Protocol) -> None:
        if not self.result.called:
            self.result.callback(protocol)

    def handshakeFailed(self, gate, why: str, reason: Failure | None = None) -> None:
        if not self.result.called:
            self.result.errback(TLSHandshakeFailed(why))


# Client side


class TLSHandshakeFailed(Exception):
    """
    The TLS handshake with a target failed (its certificate did not verify,
    it does not speak TLS, ...).
    """

    def __str__(self) -> str:
        return f"TLS handshake failed: {self.args[0]}"


def serverTLSFactory(
    creator,
    wrappedFactory: IProtocolFactory,
    clock: IReactorTime,
    handshakeTimeout: float,
    maxPending: int | None = None,
    acceptGate=None,
    refusals: Counter[str] | None = None,
) -> TLSLayerFactory:
    """
    A factory that terminates TLS with C{creator} and hands each client
    whose handshake completes within C{handshakeTimeout} seconds to
    C{wrappedFactory}'s protocol, with at most C{maxPending} handshakes
    under way (see L{PendingHandshakes}), each counted in C{acceptGate};
    a client whose handshake fails is counted in C{refusals}.
    """
    gates = _ServerGateFactory(wrappedFactory, clock, handshakeTimeout, maxPending, acceptGate, refusals)
    return TLSLayerFactory(creator, False, gates, clock)


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    Like L{twisted.internet.endpoints.wrapClientTLS}, except that C{connect}
    fires only once the handshake is complete (and the certificate verified),
    so that a target failing verification is a failed connect: the dialer
    tries the next one.  Cancelling the attempt aborts it at any stage.
    """

    def __init__(self, creator, endpoint: IStreamClientEndpoint, clock: IReactorTime) -> None:
        self.creator = creator
        self.endpoint = endpoint
        self.clock = clock

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        connecting: Deferred | None = None
        gates: _ClientGateFactory | None = None

        def cancel(result: Deferred) -> None:
            if connecting is not None and not connecting.called:
                connecting.cancel()
            elif gates is not None and gates.gate is not None and gates.gate.transport is not None:
                gates.gate.transport.abortConnection()

        def release(outcome: object) -> object:
            # The attempt is over: undo the links that would keep it (and
            # its TLS layer, through the gate) in cycles, so that it is freed
            # by reference counting.
            nonlocal connecting, gates
            if gates is not None:
                gates.gate = None
            connecting = gates = None
            return outcome

        result: Deferred = Deferred(cancel)
        gates = _ClientGateFactory(protocolFactory, self.clock, result)
        tlsFactory = TLSLayerFactory(self.creator, True, gates, self.clock)
        # A PROXY header is sent under TLS, first on the TCP connection.
        carryProxyHeader(protocolFactory, tlsFactory)
        connecting = self.endpoint.connect(tlsFactory)

        def failed(reason: Failure) -> None:
            if not result.called:
                result.errback(reason)

        # Connected, the TLS layer is not kept as the result: the gate's
        # result is the one that counts.
        connecting.addCallbacks(lambda layer: None, failed)
        result.addBoth(release)
        return result


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """
    Client TLS without verification of the target (C{"Verify": false}); it
    still sends C{ServerName} as SNI and may present a client certificate.
    """

    def __init__(self, options: CertificateOptions, serverName: str | None) -> None:
        self._options = options
        self._serverName = serverName

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if self._serverName and not _isIPAddress(self._serverName):
            connection.set_tlsext_host_name(self._serverName.encode("idna"))
        connection.set_connect_state()
        return connection


def _isIPAddress(text: str) -> bool:
    return isIPAddress(text) or isIPv6Address(text)


# What an app needs


@dataclass
class AppTLS:
    """
    An app's TLS, loaded: what the service wraps its listener and its
    dialer's endpoints with.

    @ivar server: the server-side connection creator, or C{None} if the app
        does not terminate TLS.
    @ivar client: the client-side creator for a target, or C{None} if the
        app speaks plain TCP to its targets.
    """

    server: CertificateOptions | None = None
    handshakeTimeout: float = 10.0
    client: Callable[[Target], object] | None = None
    maxPendingHandshakes: int | None = None

    def serverFactory(
        self, wrappedFactory: IProtocolFactory, clock: IReactorTime, acceptGate=None, refusals=None
    ) -> IProtocolFactory:
        """
        C{wrappedFactory}, behind TLS termination if the app has it; its
        handshakes under way count into C{acceptGate}, if given, and the
        failed ones into C{refusals}.
        """
        if self.server is None:
            return wrappedFactory
        return serverTLSFactory(
            self.server,
            wrappedFactory,
            clock,
            self.handshakeTimeout,
            self.maxPendingHandshakes,
            acceptGate,
            refusals,
        )

    def endpointFactory(self, endpointForTarget, clock: IReactorTime):
        """
        C{endpointForTarget} (reactor, target -> endpoint), with TLS towards
        the target if the app originates it.
        """
        if self.client is None:
            return endpointForTarget
        creatorFor = self.client

        def endpoint(reactor, target: Target) -> IStreamClientEndpoint:
            return TLSClientEndpoint(creatorFor(target), endpointForTarget(reactor, target), clock)

        return endpoint


def _serverSide(source: str, app: str, settings: TLSConfig, now) -> tuple[CertificateOptions, float]:
    refuse = _Refuse(source, app, "TLS")
    pairs = [_loadKeyPair(refuse, cert, key, now) for cert, key in settings.certificates]
    try:
        options = serverOptions(pairs, settings.minVersion, settings.alpn)
    except (SSL.Error, ValueError) as e:
        raise refuse(settings.certificates[0][0], f"cannot be used for TLS: {describeError(e)}") from None
    return options, settings.handshakeTimeout


def _clientSide(source: str, app: str, settings: TargetTLSConfig, now) -> Callable[[Target], object]:
    refuse = _Refuse(source, app, "TargetTLS")
    trustRoot = platformTrust()
    if settings.ca is not None:
        authorities = _loadCertificates(refuse, settings.ca)
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authorities)
        trustRoot = Certificate.loadPEM(pem) if len(authorities) == 1 else _trustRootOf(authorities)
    clientCertificate = None
    if settings.cert is not None:
        clientCertificate = _loadKeyPair(refuse, settings.cert, settings.key, now).privateCertificate()
    if not settings.verify:
        log.warn(
            "{where}: Verify is false: the targets' certificates are not checked",
            where=refuse.prefix,
            event="tls-verify-off",
        )
        extra = {}
        if clientCertificate is not None:
            extra = {
                "privateKey": clientCertificate.privateKey.original,
                "certificate": clientCertificate.original,
            }
        options = CertificateOptions(
            verify=False, raiseMinimumTo=TLSVersion.TLSv1_2, acceptableCiphers=MODERN_CIPHERS, **extra
        )

        def unverified(target: Target) -> object:
            return _UnverifiedClientCreator(options, settings.serverName or target.host)

        return unverified

    cache: dict[str, object] = {}

    def verified(target: Target) -> object:
        name = settings.serverName or target.host
        creator = cache.get(name)
        if creator is None:
            creator = cache[name] = optionsForClientTLS(
                name,
                trustRoot=trustRoot,
                clientCertificate=clientCertificate,
                extraCertificateOptions={
                    "raiseMinimumTo": TLSVersion.TLSv1_2,
                    "acceptableCiphers": MODERN_CIPHERS,
                },
            )
        return creator

    return verified


def _trustRootOf(authorities: list[x509.Certificate]):
    return trustRootFromCertificates(
        [Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in authorities]
    )


def loadAppTLS(app: AppConfig, source: str, now: datetime.datetime | None = None) -> AppTLS:
    """
    Read and check the files of C{app}'s C{TLS} and C{TargetTLS} settings.

    @param source: the configuration file, named in messages.
    @raise ConfigError: a file is missing, unreadable, not PEM, or a key is
        not its certificate's.  (An expired certificate is only a warning:
        a proxy refusing to start over it would be worse than one serving it.)
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    result = AppTLS()
    if app.tls is not None:
        result.server, result.handshakeTimeout = _serverSide(source, app.name, app.tls, now)
        result.maxPendingHandshakes = app.tls.maxPendingHandshakes
    if app.targetTLS is not None:
        result.client = _clientSide(source, app.name, app.targetTLS, now)
    return result


# Describing sessions and failures


def sessionFields(transport) -> dict[str, str | None]:
    """
    The TLS version, cipher, SNI name and ALPN protocol (C{None} when none
    was selected) of a connection whose handshake is complete, for the
    access log.
    """
    connection = transport.getHandle()
    sni = connection.get_servername()
    alpn = connection.get_alpn_proto_negotiated()
    return {
        "tlsVersion": connection.get_protocol_version_name(),
        "cipher": connection.get_cipher_name(),
        "sni": sni.decode("ascii", "replace") if sni else None,
        "alpn": alpn.decode("ascii", "replace") if alpn else None,
    }


def describeError(error: BaseException) -> str:
    """
    An OpenSSL error in a few words (its reason strings), not its repr.
    """
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [entry[-1] for entry in error.args[0] if isinstance(entry, tuple) and entry[-1]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return str(error) or type(error).__name__


def describeTLSFailure(reason: Failure) -> str:
    """
    Why a connection ended before its handshake completed.
    """
    error = reason.value
    if isinstance(error, SSL.Error):
        return describeError(error)
    if reason.check(ConnectionDone):
        return "closed the connection before completing a TLS handshake"
    if reason.check(VerificationError):
        names = []
        for mismatch in error.errors:
            wanted = getattr(mismatch, "mismatched_id", None)
            name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            names.append(name.decode("ascii", "replace") if isinstance(name, bytes) else str(name))
        return f"the certificate is not for {', '.join(names) or 'the expected name'}"
    return f"connection lost during the TLS handshake ({reason.getErrorMessage()})"


# Closing


class TLSCloser:
    """
    Closes a TLS transport for certain.

    Unless told otherwise it is resumed first: a paused TLS transport never
    reads the peer's C{close_notify}, so it would never finish closing
    (Twisted #8901).  Then it is aborted if the peer has not answered
    C{close_notify} within C{timeout} seconds (#7926) of the last sign of
    life: the clock restarts whenever C{activity()} (by default, what is
    left to send under the TLS transport, L{unsent}) changes, so a slow
    reader still gets every byte.
    """

    def __init__(
        self,
        transport,
        clock: IReactorTime,
        activity: Callable[[], object] | None = None,
        resume: bool = True,
        timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._timeout = timeout
        # (No closure over self for the default: the closer would be a
        # cycle, left to the cyclic garbage collector.)
        self._activity = activity
        self._call = None
        if resume:
            transport.resumeProducing()
        transport.loseConnection()
        if transport.connected:
            self._last = self._sign()
            self._call = clock.callLater(timeout, self._check)

    def _sign(self) -> object:
        return self._activity() if self._activity is not None else self.unsent(self._transport)

    @staticmethod
    def unsent(transport) -> int:
        """
        Bytes the transport under a TLS transport still has to send, where
        it says (L{IWriteBuffer}: the fast engine's); 0 where it does not.
        """
        under = getattr(transport, "transport", None)
        return under.bufferedBytes if IWriteBuffer.providedBy(under) else 0

    def _check(self) -> None:
        self._call = None
        if not self._transport.connected:
            return
        now = self._sign()
        if now != self._last:
            self._last = now
            self._call = self._clock.callLater(self._timeout, self._check)
            return
        self._transport.abortConnection()

    def cancel(self) -> None:
        """
        The transport is gone: no abort is due.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
