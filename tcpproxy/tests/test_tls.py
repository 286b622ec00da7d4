"""
TLS on real loopback sockets: termination with SNI, origination with
verification, the relay's guarantees through TLS, clients that never
complete a handshake, and every refusal of a TLS file at start.

Certificates are made at test time (L{tcpproxy.tests.certs}).  Clients are
Twisted's own TLS, except where a test needs an old protocol version, for
which Python's C{ssl} module runs in a thread with a bounded timeout.
"""

from __future__ import annotations

import json
import os
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.internet.testing import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from tcpproxy import relay as relayModule
from tcpproxy import tls as tlsModule
from tcpproxy.access import END_DONE, END_NO_TARGET, END_TARGET_LOST
from tcpproxy.applying import APPLIED, REFUSED
from tcpproxy.config import ConfigError, loadConfig
from tcpproxy.demo import Echo, echoFactory
from tcpproxy.limits import AcceptGate
from tcpproxy.service import ProxyService
from tcpproxy.tests.certs import ALPHA, BETA, GAMMA, pki, writePKI
from tcpproxy.tests.loopback import (
    Collector,
    CollectorFactory,
    captureEvents,
    collectCyclesOnly,
    connectClient,
    deadPort,
    engineFor,
    eventually,
    leftForTheCollector,
    listen,
    unansweredPort,
)
from tcpproxy.tests.test_relay_loopback import _isReset, _Pusher, _SendsThenResets, _SlowReader
from tcpproxy.tls import (
    PendingHandshakes,
    TLSCloser,
    _UnverifiedClientCreator,
    certificateNames,
    loadAppTLS,
)
from tcpproxy.transport.tcp import IWriteBuffer

MiB = 1024 * 1024


@implementer(IHandshakeListener)
class TLSCollector(Collector):
    """
    A L{Collector} over TLS: C{handshake} fires once the handshake is
    complete, or fails with the reason the connection was lost before.
    C{until(n)} fires once C{n} bytes have arrived.
    """

    def __init__(self) -> None:
        Collector.__init__(self)
        self.handshake: Deferred = Deferred()
        self._until: list[tuple[int, Deferred]] = []

    def handshakeCompleted(self) -> None:
        self.handshake.callback(self)

    def dataReceived(self, data: bytes) -> None:
        Collector.dataReceived(self, data)
        for n, d in list(self._until):
            if len(self.data) >= n:
                self._until.remove((n, d))
                d.callback(bytes(self.data))

    def until(self, n: int) -> Deferred:
        d: Deferred = Deferred()
        self._until.append((n, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        for _, d in self._until:
            d.errback(reason)
        self._until = []
        Collector.connectionLost(self, reason)

    def peerNames(self) -> list[str]:
        return certificateNames(self.transport.getPeerCertificate().to_cryptography())


def trusting(name: str, ca: str = "ca.pem"):
    """
    A client TLS creator that verifies C{name} against our test CA.
    """
    return optionsForClientTLS(name, trustRoot=Certificate.loadPEM(pki()[ca]))


def unverified(sni: str | None = None):
    """
    A client TLS creator that checks nothing and sends C{sni} (if any).
    """
    return _UnverifiedClientCreator(CertificateOptions(verify=False), sni)


def connectTLS(port: int, creator, protocol=None) -> Deferred:
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
    return connectProtocol(endpoint, protocol if protocol is not None else TLSCollector())


def keyPair(stem: str, chain: str | None = None) -> PrivateCertificate:
    files = pki()
    return PrivateCertificate.loadPEM(files[chain or f"{stem}.pem"] + files[f"{stem}.key"])


def tlsBackend(testCase, stem: str = "alpha", requireClient: bool = False, factory=None) -> int:
    """
    A TLS echo backend (or C{factory} behind TLS) serving C{stem}'s
    certificate; with C{requireClient}, it demands a client certificate
    issued by the test CA.
    """
    pair = keyPair(stem)
    extra = {}
    if requireClient:
        extra = {
            "verify": True,
            "requireCertificate": True,
            "caCerts": [Certificate.loadPEM(pki()["ca.pem"]).original],
        }
    options = CertificateOptions(privateKey=pair.privateKey.original, certificate=pair.original, **extra)
    tlsFactory = TLSMemoryBIOFactory(options, False, factory or echoFactory())
    # Not the buffering transport: an echo written just before the peer's
    # close_notify is read must still go out.
    tlsFactory.protocol = TLSMemoryBIOProtocol
    return listen(testCase, tlsFactory)


def relayEvents(events: list[dict]) -> list[dict]:
    return [e for e in events if "bytesIn" in e]


class TLSServiceMixin:
    """
    A L{ProxyService} from a configuration file in a folder that also holds
    the test certificates, named relative to it as a user would.
    """

    timeout = 30

    def setUp(self):
        self.folder = writePKI(os.path.abspath(self.mktemp()))
        self.path = os.path.join(self.folder, "config.json")
        self.events = captureEvents(self, "tcpproxy")

    bindAddress = "127.0.0.1"

    def config(self, apps: list[dict]):
        with open(self.path, "w") as f:
            json.dump({"BindAddress": self.bindAddress, "Apps": apps}, f)
        return loadConfig(self.path)

    def serve(self, apps: list[dict]) -> ProxyService:
        self.service = ProxyService(self.config(apps), reactor, engine=engineFor(self))
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service

    def idle(self) -> Deferred:
        from twisted.internet.defer import gatherResults

        return gatherResults([f.whenIdle() for f in self.service._allFactories()])

    def terminating(self, targets: list[int], certificates=("alpha", "beta"), **tls) -> tuple[dict, int]:
        port = deadPort()
        app = {
            "Name": "secure",
            "Ports": [port],
            "Targets": [f"127.0.0.1:{t}" for t in targets],
            "TLS": {"Certificates": [{"Cert": f"{c}.pem", "Key": f"{c}.key"} for c in certificates], **tls},
        }
        return app, port

    def originating(self, targets: list[int], **targetTLS) -> tuple[dict, int]:
        port = deadPort()
        app = {
            "Name": "origin",
            "Ports": [port],
            "Targets": [f"127.0.0.1:{t}" for t in targets],
            "TargetTLS": {"CA": "ca.pem", **targetTLS},
        }
        return app, port

    @inlineCallbacks
    def echoThrough(self, port: int, creator, payload: bytes = b"hello through TLS"):
        """
        Send C{payload} through a TLS client, wait for its echo, then close;
        return the client.
        """
        client = yield connectTLS(port, creator)
        yield client.handshake
        client.transport.write(payload)
        echoed = yield client.until(len(payload))
        self.assertEqual(echoed, payload)
        client.transport.loseConnection()
        yield client.lost
        return client


class _RawTLSClient(Protocol):
    """
    A TLS client done by hand (pyOpenSSL over memory BIOs) on a plain TCP
    connection, to tell what ended the stream: C{close_notify}, or the
    connection itself (Twisted's TLS transport reports the TCP end's
    reason either way).

    @ivar done: fires once the TCP connection is lost (the reason is kept
        in C{reason}).
    """

    def __init__(self, serverName: str) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.tls = SSL.Connection(context, None)
        self.tls.set_tlsext_host_name(serverName.encode("ascii"))
        self.tls.set_connect_state()
        self.data = b""
        self.closeNotify = False
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        self.tls.bio_write(data)
        self._pump()

    def _pump(self) -> None:
        try:
            while True:
                self.data += self.tls.recv(65536)
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self.closeNotify = True
        try:
            outgoing = self.tls.bio_read(65536)
        except SSL.WantReadError:
            outgoing = b""
        if outgoing:
            self.transport.write(outgoing)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


def clientContext(version: int = SSL.TLS1_3_VERSION) -> SSL.Context:
    """
    A client context for L{HandTLS} that checks nothing, with C{version}
    as the only TLS version.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    return context


def serverContext(stem: str = "alpha", version: int = SSL.TLS1_3_VERSION) -> SSL.Context:
    """
    A server context for L{HandTLS} serving C{stem}'s certificate, with
    C{version} as the only TLS version.
    """
    pair = keyPair(stem)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(pair.original)
    context.use_privatekey(pair.privateKey.original)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    return context


class HandTLS(Protocol):
    """
    A TLS peer done by hand (pyOpenSSL over memory BIOs) on a plain TCP
    connection, whose every close is the test's to make: C{closeNotify}
    sends C{close_notify} alone (as Go's C{tls.Conn.CloseWrite}), and
    nothing is answered by itself.

    @ivar handshake: fires once the handshake is complete.
    @ivar closeNotified: fires with the bytes received so far once the
        peer's C{close_notify} has come (C{onCloseNotify} is called first).
    @ivar done: fires once the TCP connection is lost (its reason is kept
        in C{reason}).
    @ivar events: what came, in order: C{"data"}, C{"close_notify"}.
    """

    def __init__(self, context: SSL.Context, serverName: str | None = None, onCloseNotify=None) -> None:
        self.tls = SSL.Connection(context, None)
        if serverName is None:
            self.tls.set_accept_state()
        else:
            self.tls.set_tlsext_host_name(serverName.encode("ascii"))
            self.tls.set_connect_state()
        self.onCloseNotify = onCloseNotify
        self.data = b""
        self.events: list[str] = []
        self.handshake: Deferred = Deferred()
        self.closeNotified: Deferred = Deferred()
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        self.tls.bio_write(data)
        self._pump()

    def _pump(self) -> None:
        if not self.handshake.called:
            try:
                self.tls.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            self._flush()
            self.handshake.callback(self)
        notified = False
        try:
            while True:
                chunk = self.tls.recv(65536)
                self.data += chunk
                if self.events[-1:] != ["data"]:
                    self.events.append("data")
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            notified = "close_notify" not in self.events
            if notified:
                self.events.append("close_notify")
        self._flush()
        if notified:
            if self.onCloseNotify is not None:
                self.onCloseNotify(self)
            self.closeNotified.callback(self.data)

    def _flush(self) -> None:
        try:
            outgoing = self.tls.bio_read(1 << 20)
        except SSL.WantReadError:
            return
        if self.transport is not None and self.transport.connected:
            self.transport.write(outgoing)

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)
        self._flush()

    def closeNotify(self) -> None:
        try:
            self.tls.shutdown()
        except SSL.Error:
            pass
        self._flush()

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


class TerminationTests(TLSServiceMixin, TestCase):
    """
    An app with C{"TLS"} serves the certificate the client's SNI asks for,
    and relays byte-exact.
    """

    @inlineCallbacks
    def test_sniPicksCertificate(self):
        app, port = self.terminating([listen(self, echoFactory())])
        self.serve([app])
        client = yield self.echoThrough(port, trusting(BETA))
        self.assertEqual(client.peerNames(), [BETA])
        client = yield self.echoThrough(port, trusting(ALPHA))
        self.assertIn(ALPHA, client.peerNames())
        yield self.idle()
        logged = relayEvents(self.events)
        self.assertEqual([e["sni"] for e in logged], [BETA, ALPHA])
        self.assertEqual([e["end"] for e in logged], [END_DONE, END_DONE])
        for event in logged:
            self.assertIn(event["tlsVersion"], ("TLSv1.2", "TLSv1.3"))
            self.assertTrue(event["cipher"])
            self.assertEqual((event["bytesIn"], event["bytesOut"]), (17, 17))

    @inlineCallbacks
    def test_connectionIdFromAccept(self):
        """
        A client's connection id is given when it is accepted, before its
        handshake, and its record carries that one, the only one made.
        """
        gateIds = iter(["GATE-1", "GATE-2"])
        relayIds: list[str] = []
        self.patch(tlsModule, "newConnectionId", lambda: next(gateIds))
        self.patch(relayModule, "newConnectionNumber", lambda: relayIds.append("RELAY") or 1)
        app, port = self.terminating([listen(self, echoFactory())])
        self.serve([app])
        yield self.echoThrough(port, trusting(BETA))
        yield self.idle()
        [event] = relayEvents(self.events)
        self.assertEqual(event["connectionId"], "GATE-1")
        self.assertTrue(formatEvent(event).startswith("[GATE-1] 127.0.0.1:"))
        # No id is made for nothing (the ids of a process go up one by one).
        self.assertEqual(relayIds, [])

    @inlineCallbacks
    def test_defaultCertificate(self):
        """
        Without SNI, or with a name no certificate covers, the first
        certificate is served.
        """
        app, port = self.terminating([listen(self, echoFactory())], certificates=("beta", "alpha"))
        self.serve([app])
        for sni in (None, "nobody.test"):
            client = yield self.echoThrough(port, unverified(sni))
            self.assertEqual(client.peerNames(), [BETA])
        yield self.idle()
        self.assertEqual([e["sni"] for e in relayEvents(self.events)], [None, "nobody.test"])

    @inlineCallbacks
    def test_chainFile(self):
        """
        A certificate file holding the leaf and its intermediate CA: a
        client that trusts only the root verifies it.
        """
        app, port = self.terminating([listen(self, echoFactory())], certificates=())
        app["TLS"]["Certificates"] = [{"Cert": "gamma-chain.pem", "Key": "gamma.key"}]
        self.serve([app])
        client = yield self.echoThrough(port, trusting(GAMMA))
        self.assertEqual(client.peerNames(), [GAMMA])

    @inlineCallbacks
    def test_chainFileIntermediateFirst(self):
        """
        A chain file written the other way round (intermediate first, then
        the leaf): the leaf is the certificate that matches the key, and
        the intermediate is still sent as its chain.
        """
        leaf, intermediate = x509.load_pem_x509_certificates(pki()["gamma-chain.pem"])
        with open(os.path.join(self.folder, "gamma-reversed.pem"), "wb") as f:
            f.write(b"".join(c.public_bytes(Encoding.PEM) for c in (intermediate, leaf)))
        app, port = self.terminating([listen(self, echoFactory())], certificates=())
        app["TLS"]["Certificates"] = [{"Cert": "gamma-reversed.pem", "Key": "gamma.key"}]
        self.serve([app])
        client = yield self.echoThrough(port, trusting(GAMMA))
        self.assertEqual(client.peerNames(), [GAMMA])

    def renew(self, stem: str, cert: bytes | None = None) -> None:
        """
        Overwrite C{served.pem} and C{served.key} in place (same file, new
        contents), as ACME clients renew a certificate.
        """
        for suffix, content in ((".pem", cert or pki()[stem + ".pem"]), (".key", pki()[stem + ".key"])):
            with open(os.path.join(self.folder, "served" + suffix), "r+b") as f:
                f.truncate(0)
                f.write(content)

    @inlineCallbacks
    def test_renewedInPlace(self):
        """
        Certificate and key rewritten in place, then a reload: new clients
        get the new certificate, a connection open throughout goes on.  A
        renewed file that does not load is refused, and the certificate
        served stays the last good one.
        """
        for suffix in (".pem", ".key"):
            with open(os.path.join(self.folder, "served" + suffix), "wb") as f:
                f.write(pki()["alpha" + suffix])
        app, port = self.terminating([listen(self, echoFactory())], certificates=("served",))
        self.serve([app])
        held = yield connectTLS(port, unverified())
        yield held.handshake
        self.assertEqual(held.peerNames()[0], ALPHA)
        held.transport.write(b"before")
        yield held.until(6)

        self.renew("beta")
        result = yield self.service.reload()
        self.assertEqual(result.status, APPLIED)
        [summary] = [e for e in self.events if e.get("result") == APPLIED]
        self.assertEqual(summary["appsChanged"], {"secure": ["TLS"]})
        client = yield self.echoThrough(port, unverified())
        self.assertEqual(client.peerNames(), [BETA])
        held.transport.write(b" after")
        self.assertEqual((yield held.until(12)), b"before after")
        self.assertEqual(held.peerNames()[0], ALPHA)

        self.renew("alpha", cert=b"-----BEGIN CERTIFICATE-----\ntruncated\n")
        result = yield self.service.reload()
        self.assertEqual(result.status, REFUSED)
        self.assertIn("served.pem: is not a PEM certificate", result.errors[0])
        client = yield self.echoThrough(port, unverified())
        self.assertEqual(client.peerNames(), [BETA])
        held.transport.loseConnection()
        yield held.lost

    def handshakeWith(self, port: int, version) -> Deferred:
        """
        A handshake by Python's C{ssl} (in a thread), allowing only
        C{version}; fires with the version agreed, or fails with the error.
        """

        def handshake():
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_ciphers("ALL:@SECLEVEL=0")
            context.minimum_version = context.maximum_version = version
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=ALPHA) as tls:
                    return tls.version()

        return deferToThread(handshake)

    @inlineCallbacks
    def test_oldVersionsRefused(self):
        """
        TLS 1.1 is refused by default (a client offering only 1.2 is
        served); with C{"MinVersion": "1.3"}, 1.2 is refused too.
        """
        app, port = self.terminating([listen(self, echoFactory())])
        strict, strictPort = self.terminating([listen(self, echoFactory())])
        strict.update(Name="strict", TLS={**strict["TLS"], "MinVersion": "1.3"})
        self.serve([app, strict])
        self.assertEqual((yield self.handshakeWith(port, ssl.TLSVersion.TLSv1_2)), "TLSv1.2")
        yield self.assertFailure(self.handshakeWith(port, ssl.TLSVersion.TLSv1_1), ssl.SSLError, OSError)
        yield self.assertFailure(
            self.handshakeWith(strictPort, ssl.TLSVersion.TLSv1_2), ssl.SSLError, OSError
        )
        self.assertEqual((yield self.handshakeWith(strictPort, ssl.TLSVersion.TLSv1_3)), "TLSv1.3")
        # A TLS 1.3 client is done before the proxy has read its Finished:
        # its handshakes may still be under way here.
        factories = [self.service.factories[name].front.wrappedFactory for name in ("secure", "strict")]

        def handshakesOver() -> bool:
            """no handshake under way"""
            return all(len(f.pending) == 0 for f in factories)

        yield eventually(handshakesOver)
        yield self.idle()
        dropped = [e for e in self.events if e.get("event") == "tls-handshake-failed"]
        self.assertEqual([e["why"] for e in dropped], ["unsupported protocol"] * 2)
        self.assertTrue(all(e["client"].startswith("127.0.0.1:") for e in dropped))
        self.assertEqual(len({e["connectionId"] for e in dropped}), 2)
        self.assertEqual(
            [formatEvent(e) for e in dropped],
            [
                f"[{e['connectionId']}] {e['client']}: TLS client dropped: unsupported protocol"
                for e in dropped
            ],
        )

    @inlineCallbacks
    def test_targetResetReachesTLSClientAsReset(self):
        """
        A target that sends 16 bytes and resets: the TLS client gets the 16
        bytes, then a reset -- not C{close_notify}, which would pass the
        cut-off reply for a complete one (Twisted's TLS transport sent it
        before aborting; the proxy aborts the TCP connection under it).
        """
        target = listen(self, Factory.forProtocol(_SendsThenResets))
        app, port = self.terminating([target])
        self.serve([app])
        client = _RawTLSClient(ALPHA)
        yield connectClient(port, client)
        yield client.done
        self.assertEqual(client.data, _SendsThenResets.reply)
        self.assertFalse(client.closeNotify, "close_notify came: a clean end")
        self.assertTrue(_isReset(client.reason), client.reason)
        yield self.idle()

    @inlineCallbacks
    def test_sendThenCloseWhileDialling(self):
        """
        A TLS client that sends its request, then C{close_notify}, and
        closes without waiting (as C{openssl s_client} does with its input
        on a pipe), while its target is still being dialled: the request
        reaches the target, then EOF -- it used to be dropped as "client left
        while dialling".
        """
        request = b"GET /x HTTP/1.0\r\n\r\n"
        backend = CollectorFactory()
        app, port = self.terminating([unansweredPort(self), listen(self, backend)])
        app["ConnectTimeout"] = 0.5
        self.serve([app])
        client = HandTLS(clientContext(), serverName=ALPHA)
        yield connectClient(port, client)
        yield client.handshake
        client.send(request)
        client.closeNotify()
        client.transport.loseConnection()
        yield client.done
        target = yield backend.accepted.get()
        self.assertEqual((yield target.readDone), request)
        target.transport.loseConnection()
        yield target.lost
        yield self.idle()
        [event] = [e for e in self.events if "bytesIn" in e]
        self.assertEqual((event["end"], event["bytesIn"]), (END_DONE, len(request)))

    @inlineCallbacks
    def test_multiMiBByteExact(self):
        payload = os.urandom(4 * MiB + 7)
        app, port = self.terminating([listen(self, echoFactory())])
        self.serve([app])
        yield self.echoThrough(port, trusting(ALPHA), payload)
        yield self.idle()
        [event] = relayEvents(self.events)
        self.assertEqual((event["bytesIn"], event["bytesOut"]), (len(payload), len(payload)))

    @inlineCallbacks
    def test_garbageAndStalledClientsDropped(self):
        """
        A plaintext client and one that stalls mid-handshake are dropped and
        logged with their address, without a traceback and without a target
        being dialled; a TLS client is served meanwhile.
        """
        backend = CollectorFactory()
        app, port = self.terminating([listen(self, backend)], HandshakeTimeout=1)
        self.serve([app])
        stalled = yield connectClient(port)
        stalled.transport.write(b"\x16\x03\x01\x00")  # the start of a ClientHello
        stalledAddress = f"127.0.0.1:{stalled.transport.getHost().port}"
        plaintext = yield connectClient(port)
        plainAddress = f"127.0.0.1:{plaintext.transport.getHost().port}"
        plaintext.transport.write(b"GET / HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
        client = yield connectTLS(port, trusting(ALPHA))
        yield client.handshake
        target = yield backend.accepted.get()
        client.transport.write(b"served")
        target.transport.write(b"answer")
        self.assertEqual((yield client.until(6)), b"answer")
        # Both were closed by the proxy (a half-close aware client sees EOF).
        yield plaintext.readDone
        plaintext.transport.loseConnection()
        yield stalled.lost
        client.transport.loseConnection()
        # Its close_notify closes only its side: it is answered once the
        # target's side is closed too.
        target.transport.loseConnection()
        yield client.lost
        yield self.idle()
        self.assertEqual(bytes(target.data), b"served")
        self.assertEqual(len(backend.protocols), 1)
        dropped = {e["client"]: e["why"] for e in self.events if e.get("event") == "tls-handshake-failed"}
        self.assertEqual(set(dropped), {stalledAddress, plainAddress})
        self.assertEqual(dropped[stalledAddress], "no TLS handshake within 1s")
        self.assertIn("http request", dropped[plainAddress])
        self.assertFalse([e for e in self.events if "log_failure" in e])
        self.assertEqual(len(relayEvents(self.events)), 1)

    @inlineCallbacks
    def test_reloadAddsTLS(self):
        """
        A reload that gives an app C{"TLS"} serves its next clients with
        TLS; a connection already open stays plain.
        """
        echoPort = listen(self, echoFactory())
        app, port = self.terminating([echoPort])
        plain = {k: v for k, v in app.items() if k != "TLS"}
        self.serve([plain])
        before = yield connectClient(port)
        before.transport.write(b"plain")
        self.config([app])
        result = yield self.service.reload()
        self.assertEqual(result.status, APPLIED)
        yield self.echoThrough(port, trusting(ALPHA))
        before.transport.loseWriteConnection()
        self.assertEqual((yield before.readDone), b"plain")
        yield before.lost


class _TLSPusher(_Pusher):
    """
    A L{_Pusher} over TLS, which ends with C{close_notify} (TLS has no
    half-close).
    """

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.remaining > 0:
            chunk = self.chunk[: self.remaining]
            self.remaining -= len(chunk)
            self.transport.write(chunk)
            self.samples.append(_buffered(self.factory))
        if self.remaining == 0 and self.transport.connected and not self.transport.disconnecting:
            self.transport.unregisterProducer()
            self.transport.loseConnection()


def _buffered(factory) -> int:
    from tcpproxy.tests.loopback import bufferedBytes

    return bufferedBytes(factory)


def offering(name: str, *protocols: bytes):
    """
    A client TLS creator that verifies C{name} and offers C{protocols} by
    ALPN, in that order.
    """
    return optionsForClientTLS(
        name, trustRoot=Certificate.loadPEM(pki()["ca.pem"]), acceptableProtocols=list(protocols)
    )


class ALPNTests(TLSServiceMixin, TestCase):
    """
    A client offering ALPN completes its handshake: without C{"ALPN"} no
    protocol is selected; with it, the proxy's first choice among the
    client's offers (RFC 7301 section 3.2), whatever certificate SNI picks.
    """

    @inlineCallbacks
    def negotiated(self, port: int, creator) -> Deferred:
        client = yield self.echoThrough(port, creator)
        return client.transport.negotiatedProtocol

    @inlineCallbacks
    def test_noneSelectedWithoutConfiguration(self):
        app, port = self.terminating([listen(self, echoFactory())])
        self.serve([app])
        self.assertIsNone((yield self.negotiated(port, offering(ALPHA, b"h2", b"http/1.1"))))
        self.assertIsNone((yield self.negotiated(port, offering(BETA, b"http/1.1"))))
        yield self.idle()
        self.assertEqual([e["alpn"] for e in relayEvents(self.events)], [None, None])
        self.assertEqual([e["sni"] for e in relayEvents(self.events)], [ALPHA, BETA])

    @inlineCallbacks
    def test_serverPreference(self):
        app, port = self.terminating([listen(self, echoFactory())], ALPN=["http/1.1", "h2"])
        self.serve([app])
        for name in (ALPHA, BETA):  # the default context and an SNI one
            self.assertEqual((yield self.negotiated(port, offering(name, b"h2", b"http/1.1"))), b"http/1.1")
            self.assertEqual((yield self.negotiated(port, offering(name, b"spdy/3", b"h2"))), b"h2")
            self.assertIsNone((yield self.negotiated(port, offering(name, b"imap"))))
            self.assertIsNone((yield self.negotiated(port, trusting(name))))
        yield self.idle()
        self.assertEqual([e["alpn"] for e in relayEvents(self.events)], ["http/1.1", "h2", None, None] * 2)


def clientHello(name: str = ALPHA) -> bytes:
    """
    The first flight of a TLS client (its ClientHello), made by Python's
    C{ssl} in memory: what a client that then stalls has sent.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        connection.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class _StalledClient(Protocol):
    """
    Sends a ClientHello and never goes on: C{answered} fires when the
    proxy's answer (its first flight) arrives; C{lost} when it is closed.
    """

    def __init__(self, hello: bytes) -> None:
        self.hello = hello
        self.answered: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.hello)

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(self)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


def _residentKiB() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _FakePort:
    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class _FakeGate:
    def __init__(self, dropped: list) -> None:
        self.dropped = dropped

    def drop(self, why: str) -> None:
        self.dropped.append((self, why))


class _TurnClock(Clock):
    """
    A L{Clock} whose C{advance} is one turn of the real reactor: it runs the
    calls due when it starts, not those they schedule for now (which the
    reactor leaves to its next turn).
    """

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        for call in [c for c in self.calls if c.getTime() <= self.rightNow]:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class PendingHandshakesTests(SynchronousTestCase):
    """
    L{PendingHandshakes} on a L{Clock}: the cap drops the oldest, and
    handshakes timing out together are dropped a batch per reactor turn.
    """

    def test_capDropsTheOldest(self):
        clock, dropped = Clock(), []
        pending = PendingHandshakes(clock, 10, 3)
        gates = [_FakeGate(dropped) for _ in range(5)]
        for gate in gates[:3]:
            pending.add(gate)
        self.assertEqual(dropped, [])
        pending.remove(gates[1])
        pending.add(gates[3])
        pending.add(gates[4])
        why = "3 TLS handshakes under way (MaxPendingHandshakes), this the oldest"
        self.assertEqual(dropped, [(gates[0], why)])
        self.assertEqual(len(pending), 3)

    def test_countedInTheAcceptGate(self):
        """
        Every handshake under way counts in the proxy-wide accept gate,
        from its start to its end however it ends (completed, failed,
        dropped for the cap, timed out), so clients are not accepted past
        the connection or descriptor limit while their handshakes run.
        """
        clock, dropped = Clock(), []
        ports = [_FakePort()]
        gate = AcceptGate(2, lambda: ports, clock)
        pending = PendingHandshakes(clock, 10, 2, gate)
        first, second, third = (_FakeGate(dropped) for _ in range(3))
        pending.add(first)
        pending.add(second)
        self.assertEqual((gate.count, ports[0].reading), (2, False))
        pending.add(third)  # the cap drops the oldest
        self.assertEqual(gate.count, 2)
        pending.remove(second)
        pending.remove(second)  # known no more: not counted out twice
        self.assertEqual((gate.count, ports[0].reading), (1, True))
        clock.advance(10)  # the third times out
        self.assertEqual(gate.count, 0)
        self.assertEqual([g for g, _ in dropped], [first, third])

    def test_expiryInBatches(self):
        """
        200 handshakes that started together time out together: each turn
        of the reactor drops at most L{PendingHandshakes.BATCH} of them, so
        other connections are served between batches; one timer in all.
        """
        clock, dropped = _TurnClock(), []
        pending = PendingHandshakes(clock, 10, None)
        for _ in range(200):
            pending.add(_FakeGate(dropped))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(9.99)
        self.assertEqual(dropped, [])
        clock.advance(0.01)
        batch = PendingHandshakes.BATCH
        self.assertEqual(len(dropped), batch)
        self.assertEqual({why for _, why in dropped}, {"no TLS handshake within 10s"})
        for turn in range(2, 5):
            clock.advance(0)
            self.assertEqual(len(dropped), min(200, batch * turn))
        self.assertEqual((len(pending), clock.getDelayedCalls()), (0, []))

    def test_timerFollowsTheOldest(self):
        clock, dropped = Clock(), []
        pending = PendingHandshakes(clock, 10, None)
        first, second = _FakeGate(dropped), _FakeGate(dropped)
        pending.add(first)
        clock.advance(4)
        pending.add(second)
        pending.remove(first)
        clock.advance(6)
        self.assertEqual(dropped, [])
        clock.advance(4)
        self.assertEqual(dropped, [(second, "no TLS handshake within 10s")])
        pending.remove(second)
        self.assertEqual(clock.getDelayedCalls(), [])


class HandshakeFloodTests(TLSServiceMixin, TestCase):
    """
    Clients that send a ClientHello and stall: capped, and each costs a
    bounded amount of memory.
    """

    def stalled(self, port: int, hello: bytes) -> Deferred:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        return connectProtocol(endpoint, _StalledClient(hello))

    def noneLeft(self) -> Deferred:
        """
        Fires once the proxy has seen every stalled client go (their
        handshakes no longer pending): the connections are not relays, so
        the service's drain does not wait for them.
        """
        pending = self.service.factories["secure"].front.wrappedFactory.pending

        def gone() -> bool:
            """every pending handshake dropped"""
            return len(pending) == 0

        return eventually(gone)

    @inlineCallbacks
    def test_capDropsTheOldestStalled(self):
        """
        With C{MaxPendingHandshakes} 3, a fourth stalled client closes the
        first (logged as such); a real client still gets served.
        """
        app, port = self.terminating([listen(self, echoFactory())], MaxPendingHandshakes=3)
        self.serve([app])
        hello = clientHello()
        stalled = []
        for _ in range(3):
            client = yield self.stalled(port, hello)
            yield client.answered
            stalled.append(client)
        firstAddress = f"127.0.0.1:{stalled[0].transport.getHost().port}"
        fourth = yield self.stalled(port, hello)
        yield stalled[0].lost
        yield fourth.answered
        self.assertEqual([c.lost.called for c in stalled + [fourth]], [True, False, False, False])
        [dropped] = [e for e in self.events if e.get("event") == "tls-handshake-failed"]
        self.assertEqual(dropped["client"], firstAddress)
        self.assertEqual(dropped["why"], "3 TLS handshakes under way (MaxPendingHandshakes), this the oldest")
        yield self.echoThrough(port, trusting(ALPHA))
        self.assertEqual(sum(c.lost.called for c in stalled + [fourth]), 2)
        for client in stalled[1:] + [fourth]:
            client.transport.abortConnection()
            yield client.lost
        yield self.noneLeft()

    @inlineCallbacks
    def test_memoryPerPendingHandshake(self):
        """
        200 clients whose ClientHello was answered and who then stall cost
        under 80 KiB each (the proxy's TLS state, some 55 KiB with OpenSSL
        3.0, and the test's own client): resident memory measured before
        and after, in this process.
        """
        if _residentKiB() is None:
            raise SkipTest("needs /proc/self/status (Linux)")
        app, port = self.terminating([listen(self, echoFactory())])
        self.serve([app])
        hello = clientHello()
        warm = yield self.stalled(port, hello)  # OpenSSL's one-time set-up
        yield warm.answered
        before = _residentKiB()
        clients = yield gatherResults([self.stalled(port, hello) for _ in range(200)])
        yield gatherResults([c.answered for c in clients])
        perHandshake = (_residentKiB() - before) / 200
        for client in clients + [warm]:
            client.transport.abortConnection()
        yield gatherResults([c.lost for c in clients + [warm]])
        yield self.noneLeft()
        self.assertLess(perHandshake, 80, f"{perHandshake:.1f} KiB per pending handshake")


class TLSBackpressureTests(TLSServiceMixin, TestCase):
    """
    A fast writer towards a slow reader does not grow the proxy's buffers
    when one side is TLS, in either direction.
    """

    timeout = 60
    total = 8 * MiB
    bound = 768 * 1024

    @inlineCallbacks
    def test_slowTarget(self):
        samples: list[int] = []
        backend = CollectorFactory()
        service = None

        def slowProtocol(addr):
            protocol = _SlowReader(service.factories["secure"], samples)
            backend.protocols.append(protocol)
            protocol.whenConnected.addCallback(backend.accepted.put)
            return protocol

        backend.buildProtocol = slowProtocol
        app, port = self.terminating([listen(self, backend)])
        service = self.serve([app])
        yield connectTLS(port, trusting(ALPHA), _TLSPusher(self.total, service.factories["secure"], samples))
        target = yield backend.accepted.get()
        received = yield target.readDone
        self.assertEqual(len(received), self.total)
        target.transport.loseConnection()
        yield self.idle()
        self.assertLess(max(samples), self.bound, f"proxy buffered up to {max(samples)} bytes")
        self.assertGreater(len(samples), 50)

    @inlineCallbacks
    def test_slowClient(self):
        """
        The target writes fast then sends EOF; the TLS client reads slowly
        and still gets every byte before C{close_notify}.
        """
        samples: list[int] = []
        service = None

        class Backend(CollectorFactory):
            def buildProtocol(self, addr):
                return _Pusher(TLSBackpressureTests.total, service.factories["secure"], samples)

        app, port = self.terminating([listen(self, Backend())])
        service = self.serve([app])

        class SlowTLSReader(_SlowReader):
            def dataReceived(self, data):
                Collector.dataReceived(self, data)
                self.samples.append(_buffered(self.factory))
                self.transport.pauseProducing()
                reactor.callLater(0.002, self._resume)

        client = yield connectTLS(port, trusting(ALPHA), SlowTLSReader(service.factories["secure"], samples))
        received = yield client.readDone
        self.assertEqual(len(received), self.total)
        yield client.lost
        yield self.idle()
        self.assertLess(max(samples), self.bound, f"proxy buffered up to {max(samples)} bytes")
        self.assertGreater(len(samples), 50)
        [event] = relayEvents(self.events)
        self.assertEqual((event["bytesOut"], event["end"]), (self.total, END_DONE))


@implementer(IHandshakeListener)
class _NamedEcho(Echo):
    """
    An echo that notes the SNI name each client sent (C{None} for none).
    """

    def handshakeCompleted(self) -> None:
        self.factory.names.append(self.transport.getHandle().get_servername())


class NamesAsWrittenTests(TLSServiceMixin, TestCase):
    """
    A name in capitals or with a trailing dot (fully qualified) works
    wherever names are used: resolving a target, the SNI sent to it
    (without the dot, RFC 6066 section 3), the check of its certificate,
    and a client's SNI picking a certificate.
    """

    def namedBackend(self) -> tuple[int, list]:
        factory = Factory.forProtocol(_NamedEcho)
        factory.names = []
        return tlsBackend(self, factory=factory), factory.names

    @inlineCallbacks
    def test_targetHostname(self):
        """
        A target written C{LOCALHOST.:port} is resolved, sent SNI
        C{localhost}, and its certificate (for C{localhost}) verified.
        """
        backend, names = self.namedBackend()
        app, port = self.originating([])
        app["Targets"] = [f"LOCALHOST.:{backend}"]
        self.serve([app])
        self.assertEqual((yield OriginationTests.echoPlain(self, port)), b"to a TLS target")
        yield self.idle()
        [event] = relayEvents(self.events)
        self.assertEqual((event["end"], event["target"]), (END_DONE, f"localhost:{backend}"))
        self.assertEqual(names, [b"localhost"])

    @inlineCallbacks
    def test_serverName(self):
        backend, names = self.namedBackend()
        app, port = self.originating([backend], ServerName="Alpha.TEST.")
        self.serve([app])
        self.assertEqual((yield OriginationTests.echoPlain(self, port)), b"to a TLS target")
        self.assertEqual(names, [ALPHA.encode("ascii")])
        unverifiedApp, unverifiedPort = self.originating([backend], ServerName="Alpha.TEST.", Verify=False)
        unverifiedApp["Name"] = "unverified"
        self.config([app, unverifiedApp])
        yield self.service.reload()
        self.assertEqual((yield OriginationTests.echoPlain(self, unverifiedPort)), b"to a TLS target")
        self.assertEqual(names, [ALPHA.encode("ascii")] * 2)

    @inlineCallbacks
    def test_clientSNI(self):
        app, port = self.terminating([listen(self, echoFactory())])
        self.serve([app])
        for sent in ("BETA.Test.", "Beta.test"):
            client = yield self.echoThrough(port, unverified(sent))
            self.assertEqual(client.peerNames(), [BETA])


class OriginationTests(TLSServiceMixin, TestCase):
    """
    An app with C{"TargetTLS"} speaks TLS to its targets and verifies them;
    a target that fails verification is a failed attempt (the next target
    is tried).
    """

    @inlineCallbacks
    def echoPlain(self, port: int, payload: bytes = b"to a TLS target"):
        client = yield connectClient(port)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        received = yield client.readDone
        yield client.lost
        return received

    @inlineCallbacks
    def test_verified(self):
        app, port = self.originating([tlsBackend(self)])
        self.serve([app])
        self.assertEqual((yield self.echoPlain(port)), b"to a TLS target")
        yield self.idle()
        [event] = relayEvents(self.events)
        self.assertEqual((event["end"], event["failures"]), (END_DONE, []))

    @inlineCallbacks
    def test_serverName(self):
        app, port = self.originating([tlsBackend(self, "beta")], ServerName=BETA)
        self.serve([app])
        self.assertEqual((yield self.echoPlain(port)), b"to a TLS target")

    @inlineCallbacks
    def test_wrongCA(self):
        app, port = self.originating([tlsBackend(self)], CA="other-ca.pem")
        self.serve([app])
        self.assertEqual((yield self.echoPlain(port)), b"")
        yield self.idle()
        [event] = relayEvents(self.events)
        self.assertEqual(event["end"], END_NO_TARGET)
        [failure] = event["failures"]
        self.assertIn("TLS handshake failed: certificate verify failed", failure)

    @inlineCallbacks
    def test_wrongNameFailsOver(self):
        """
        A target whose certificate is not for the name is skipped; the next
        target, whose certificate is, serves.
        """
        wrong, right = tlsBackend(self, "beta"), tlsBackend(self, "alpha")
        app, port = self.originating([wrong, right], ServerName=ALPHA)
        self.serve([app])
        self.assertEqual((yield self.echoPlain(port)), b"to a TLS target")
        yield self.idle()
        [event] = relayEvents(self.events)
        self.assertEqual(event["target"], f"127.0.0.1:{right}")
        [failure] = event["failures"]
        self.assertEqual(
            failure, f"127.0.0.1:{wrong}: TLS handshake failed: the certificate is not for {ALPHA}"
        )

    @inlineCallbacks
    def test_mutualTLS(self):
        """
        A target that demands a client certificate is refused without one
        and served with C{Cert}/C{Key}.
        """
        demanding = tlsBackend(self, requireClient=True)
        without, withoutPort = self.originating([demanding])
        withCert, withPort = self.originating([demanding], Cert="client.pem", Key="client.key")
        withCert["Name"] = "mutual"
        self.serve([without, withCert])
        self.assertEqual((yield self.echoPlain(withPort)), b"to a TLS target")
        self.assertEqual((yield self.echoPlain(withoutPort)), b"")
        yield self.idle()
        ends = {e["app"]: e["end"] for e in relayEvents(self.events)}
        # With TLS 1.3 the client's handshake completes before the server
        # has checked it: the refusal then comes as the target's reset.
        self.assertIn(ends.pop("origin"), (END_NO_TARGET, END_TARGET_LOST))
        self.assertEqual(ends, {"mutual": END_DONE})

    @inlineCallbacks
    def test_reloadChangesTargetTLS(self):
        """
        A reload that changes C{"TargetTLS"} (here the CA) applies to the
        next connection; a refused TLS file refuses the whole reload.
        """
        app, port = self.originating([tlsBackend(self)], CA="other-ca.pem")
        self.serve([app])
        self.assertEqual((yield self.echoPlain(port)), b"")
        app["TargetTLS"]["CA"] = "ca.pem"
        self.config([app])
        self.assertEqual((yield self.service.reload()).status, APPLIED)
        self.assertEqual((yield self.echoPlain(port)), b"to a TLS target")
        app["TargetTLS"]["CA"] = "missing.pem"
        self.config([app])
        result = yield self.service.reload()
        self.assertEqual(result.status, REFUSED)
        self.assertIn("missing.pem: cannot read the file", result.errors[0])
        self.assertEqual((yield self.echoPlain(port)), b"to a TLS target")

    @inlineCallbacks
    def test_bothSidesByteExact(self):
        """
        TLS terminated and originated on one app: a multi-MiB echo is
        byte-exact.
        """
        app, port = self.terminating([tlsBackend(self)])
        app["TargetTLS"] = {"CA": "ca.pem"}
        self.serve([app])
        payload = os.urandom(3 * MiB + 1)
        yield self.echoThrough(port, trusting(ALPHA), payload)
        yield self.idle()
        [event] = relayEvents(self.events)
        self.assertEqual((event["bytesIn"], event["bytesOut"]), (len(payload), len(payload)))


@implementer(IHalfCloseableProtocol)
class _AnswersAtEOF(Protocol):
    """
    A target that answers only once it has read EOF (C{"reply to "} and
    what it read), then closes.
    """

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"reply to " + self.data)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def _answerCloseNotify(peer: HandTLS) -> None:
    """
    What a TLS 1.3 server that answers after its client's C{close_notify}
    does: reply, then send its own.
    """
    peer.send(b"reply to " + peer.data)
    peer.closeNotify()


class _HandTLSFactory(Factory):
    """
    TLS backends done by hand (L{HandTLS}, server side), kept in
    C{protocols}.
    """

    noisy = False

    def __init__(self, version: int = SSL.TLS1_3_VERSION, onCloseNotify=_answerCloseNotify) -> None:
        self.version = version
        self.onCloseNotify = onCloseNotify
        self.protocols: list[HandTLS] = []

    def buildProtocol(self, addr) -> HandTLS:
        protocol = HandTLS(serverContext(version=self.version), onCloseNotify=self.onCloseNotify)
        self.protocols.append(protocol)
        return protocol


def capped(name: str, version: TLSVersion):
    """
    A client TLS creator that verifies C{name} and speaks C{version} at
    most.
    """
    return optionsForClientTLS(
        name,
        trustRoot=Certificate.loadPEM(pki()["ca.pem"]),
        extraCertificateOptions={"lowerMaximumSecurityTo": version},
    )


class CloseNotifyTests(TLSServiceMixin, TestCase):
    """
    C{close_notify} closes only its sender's side (RFC 8446 section 6.1):
    it is relayed as EOF, and the answer to it still comes back, in both
    directions; a peer that answers C{close_notify} at once with its own
    (the TLS 1.2 habit) still closes cleanly.
    """

    def assertDone(self, bytesIn: int, bytesOut: int) -> None:
        [event] = relayEvents(self.events)
        self.assertEqual((event["end"], event["bytesIn"], event["bytesOut"]), (END_DONE, bytesIn, bytesOut))

    @inlineCallbacks
    def test_clientCloseNotifyIsHalfClose(self):
        """
        A TLS 1.3 client sends its request and C{close_notify} (as Go's
        C{CloseWrite}), and waits: the target gets the request and EOF,
        and its answer reaches the client, then C{close_notify}; then the
        proxy closes the connection, the pair being done.
        """
        app, port = self.terminating([listen(self, Factory.forProtocol(_AnswersAtEOF))])
        self.serve([app])
        client = HandTLS(clientContext(), serverName=ALPHA)
        yield connectClient(port, client)
        yield client.handshake
        client.send(b"request")
        client.closeNotify()
        self.assertEqual((yield client.closeNotified), b"reply to request")
        self.assertEqual(client.events, ["data", "close_notify"])
        yield client.done
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        yield self.idle()
        self.assertDone(7, 16)

    @inlineCallbacks
    def test_clientCloseNotifyWhileDialling(self):
        """
        The same while the target is still being dialled (the first one
        does not answer): the request and EOF are delivered once a target
        is connected, and its answer still reaches the client.
        """
        answering = listen(self, Factory.forProtocol(_AnswersAtEOF))
        app, port = self.terminating([unansweredPort(self), answering])
        app["ConnectTimeout"] = 0.5
        self.serve([app])
        client = HandTLS(clientContext(), serverName=ALPHA)
        yield connectClient(port, client)
        yield client.handshake
        client.send(b"request")
        client.closeNotify()
        self.assertEqual((yield client.closeNotified), b"reply to request")
        yield client.done
        yield self.idle()
        self.assertDone(7, 16)

    @inlineCallbacks
    def test_targetCloseNotifyIsHalfClose(self):
        """
        Towards a TLS target, a plain client's EOF is C{close_notify}, and
        the target's answer to it still reaches the client, then EOF.
        """
        backend = _HandTLSFactory()
        app, port = self.originating([listen(self, backend)], Verify=False)
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(b"request")
        client.transport.loseWriteConnection()
        self.assertEqual((yield client.readDone), b"reply to request")
        yield client.lost
        [target] = backend.protocols
        yield target.done
        self.assertEqual(target.events, ["data", "close_notify"])
        self.assertTrue(target.reason.check(ConnectionDone), target.reason)
        yield self.idle()
        self.assertDone(7, 16)

    @inlineCallbacks
    def test_bothSidesTLS(self):
        """
        TLS on both sides: the client's C{close_notify} becomes the
        target's, the target answers and sends its own, and the client gets
        the answer and C{close_notify}.
        """
        backend = _HandTLSFactory()
        app, port = self.terminating([listen(self, backend)])
        app["TargetTLS"] = {"Verify": False}
        self.serve([app])
        client = HandTLS(clientContext(), serverName=ALPHA)
        yield connectClient(port, client)
        yield client.handshake
        client.send(b"request")
        client.closeNotify()
        self.assertEqual((yield client.closeNotified), b"reply to request")
        yield client.done
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        [target] = backend.protocols
        yield target.done
        self.assertEqual(target.events, ["data", "close_notify"])
        yield self.idle()
        self.assertDone(7, 16)

    @inlineCallbacks
    def test_freedWithoutTheGarbageCollector(self):
        """
        A connection with TLS on both sides that has ended is freed by
        reference counting: no cycle through the TLS layers or their
        OpenSSL connections is left for the cyclic garbage collector.
        """
        from tcpproxy.relay import ProxyClientProtocol, ProxyServerProtocol
        from tcpproxy.tlslayer import TLSLayer

        backend = _HandTLSFactory()
        app, port = self.terminating([listen(self, backend)])
        app["TargetTLS"] = {"Verify": False}
        self.serve([app])
        collectCyclesOnly(self)
        for _ in range(3):
            client = HandTLS(clientContext(), serverName=ALPHA)
            yield connectClient(port, client)
            yield client.handshake
            client.send(b"request")
            client.closeNotify()
            yield client.done
            yield self.idle()
        left = yield leftForTheCollector(ProxyServerProtocol, ProxyClientProtocol, TLSLayer)
        self.assertEqual(left, [])

    @inlineCallbacks
    def test_tls12ClientAnswersAtOnce(self):
        """
        The target sends its answer and closes; the proxy sends the TLS 1.2
        client the answer and C{close_notify}, which it answers at once with
        its own and closes (Twisted's TLS does): a clean end.
        """
        backend = CollectorFactory()
        app, port = self.terminating([listen(self, backend)])
        self.serve([app])
        client = yield connectTLS(port, capped(ALPHA, TLSVersion.TLSv1_2))
        yield client.handshake
        self.assertEqual(client.transport.getHandle().get_protocol_version_name(), "TLSv1.2")
        target = yield backend.accepted.get()
        client.transport.write(b"request")
        yield eventually(lambda: bytes(target.data) == b"request")
        target.transport.write(b"answer")
        target.transport.loseWriteConnection()
        self.assertEqual((yield target.readDone), b"request")
        yield client.lost
        self.assertEqual(bytes(client.data), b"answer")
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        yield target.lost
        yield self.idle()
        self.assertDone(7, 6)

    @inlineCallbacks
    def test_tls12TargetAnswersAtOnce(self):
        """
        A TLS 1.2 target that answers C{close_notify} at once with its own
        (Twisted's TLS echo): the plain client gets the echo, then EOF; a
        clean end.
        """
        pair = keyPair("alpha")
        options = CertificateOptions(
            privateKey=pair.privateKey.original,
            certificate=pair.original,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        )
        tlsFactory = TLSMemoryBIOFactory(options, False, echoFactory())
        tlsFactory.protocol = TLSMemoryBIOProtocol
        app, port = self.originating([listen(self, tlsFactory)])
        self.serve([app])
        client = yield connectClient(port)
        client.transport.write(b"request")
        client.transport.loseWriteConnection()
        self.assertEqual((yield client.readDone), b"request")
        yield client.lost
        yield self.idle()
        self.assertDone(7, 7)


class CloseTests(TestCase):
    """
    L{TLSCloser} on a peer that never answers C{close_notify}.
    """

    timeout = 20

    @inlineCallbacks
    def test_silentPeerAborted(self):
        """
        A peer that completes the handshake, then reads nothing more (so
        never answers C{close_notify}), is aborted after the deadline
        instead of being waited for forever.
        """
        server = Collector()
        pair = keyPair("alpha")
        options = CertificateOptions(privateKey=pair.privateKey.original, certificate=pair.original)
        port = listen(self, TLSMemoryBIOFactory(options, False, Factory.forProtocol(lambda: server)))
        silent = yield connectTLS(port, trusting(ALPHA))
        yield silent.handshake
        yield server.whenConnected
        silent.transport.pauseProducing()
        clock = Clock()
        TLSCloser(server.transport, clock, timeout=2)
        self.assertTrue(server.transport.connected)
        clock.advance(2)
        yield server.lost
        silent.transport.resumeProducing()
        yield silent.lost


class _ClosingTransport:
    """
    What L{TLSCloser} uses of a TLS transport, recorded.
    """

    def __init__(self, closesAtOnce: bool = False) -> None:
        self.connected = True
        self.closesAtOnce = closesAtOnce
        self.calls: list[str] = []

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def loseConnection(self) -> None:
        self.calls.append("lose")
        if self.closesAtOnce:
            self.connected = False

    def abortConnection(self) -> None:
        self.calls.append("abort")
        self.connected = False


class TLSCloserTests(SynchronousTestCase):
    """
    L{TLSCloser} with a clock: resume, close, and abort only after
    C{timeout} seconds without a sign of life.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = _ClosingTransport()

    def test_resumedThenClosed(self) -> None:
        """
        The transport is resumed (a paused TLS transport never completes its
        close), then closed; not resumed when told not to.
        """
        TLSCloser(self.transport, self.clock)
        self.assertEqual(self.transport.calls, ["resume", "lose"])
        other = _ClosingTransport()
        TLSCloser(other, self.clock, resume=False)
        self.assertEqual(other.calls, ["lose"])

    def test_abortedWithoutActivity(self) -> None:
        """
        Still open C{timeout} seconds later, with no change of activity:
        aborted, and no timer is left.
        """
        TLSCloser(self.transport, self.clock, activity=lambda: 0, timeout=2)
        self.clock.advance(1.9)
        self.assertNotIn("abort", self.transport.calls)
        self.clock.advance(0.1)
        self.assertEqual(self.transport.calls[-1], "abort")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_activityRestartsTheClock(self) -> None:
        """
        A peer that still takes bytes (activity changes) gets another
        C{timeout} each time, and is aborted only once it stops.
        """
        sent = [0]
        TLSCloser(self.transport, self.clock, activity=lambda: sent[0], timeout=2)
        for _ in range(3):
            sent[0] += 1000
            self.clock.advance(2)
            self.assertNotIn("abort", self.transport.calls)
        self.clock.advance(2)
        self.assertEqual(self.transport.calls[-1], "abort")

    def test_closedInTime(self) -> None:
        """
        A transport that closes before the deadline is not aborted; one
        closed at once gets no timer at all; C{cancel} drops the timer.
        """
        TLSCloser(self.transport, self.clock, activity=lambda: 0, timeout=2)
        self.transport.connected = False
        self.clock.advance(2)
        self.assertNotIn("abort", self.transport.calls)
        TLSCloser(_ClosingTransport(closesAtOnce=True), self.clock, timeout=2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        transport = _ClosingTransport()
        closer = TLSCloser(transport, self.clock, activity=lambda: 0, timeout=2)
        closer.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2)
        self.assertNotIn("abort", transport.calls)

    def test_unsent(self) -> None:
        """
        The default activity: what the TCP transport under the TLS one still
        has to send, where it says (L{IWriteBuffer}); 0 where it does not.
        """

        @implementer(IWriteBuffer)
        class Buffered:
            bufferedBytes = 1234

        class Over:
            def __init__(self, under) -> None:
                self.transport = under

        self.assertEqual(TLSCloser.unsent(Over(Buffered())), 1234)
        self.assertEqual(TLSCloser.unsent(Over(object())), 0)
        self.assertEqual(TLSCloser.unsent(object()), 0)


class LoadRefusalTests(TestCase):
    """
    The files named by C{"TLS"} and C{"TargetTLS"} are read at start: each
    problem is refused naming the app, the key and the path.
    """

    def setUp(self):
        self.folder = writePKI(os.path.abspath(self.mktemp()))
        self.path = os.path.join(self.folder, "config.json")
        self.events = captureEvents(self, "tcpproxy")

    def load(self, tls=None, targetTLS=None):
        app = {"Name": "secure", "Ports": [1], "Targets": ["127.0.0.1:2"]}
        if tls is not None:
            app["TLS"] = tls
        if targetTLS is not None:
            app["TargetTLS"] = targetTLS
        with open(self.path, "w") as f:
            json.dump({"Apps": [app]}, f)
        config = loadConfig(self.path)
        return loadAppTLS(config.apps[0], config.source)

    def assertRefused(self, key: str, path: str, fragment: str, **settings) -> str:
        error = self.assertRaises(ConfigError, self.load, **settings)
        message = str(error)
        self.assertTrue(message.startswith(f'{self.path}: app "secure": key "{key}": '), message)
        self.assertIn(os.path.join(self.folder, path), message)
        self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        return message

    def certs(self, *pairs):
        return {"Certificates": [{"Cert": c, "Key": k} for c, k in pairs]}

    def test_missingFile(self):
        self.assertRefused(
            "TLS", "nope.pem", "cannot read the file: No such file", tls=self.certs(("nope.pem", "alpha.key"))
        )
        self.assertRefused(
            "TLS",
            "nope.key",
            "cannot read the file",
            tls=self.certs(("alpha.pem", "alpha.key"), ("beta.pem", "nope.key")),
        )
        self.assertRefused("TargetTLS", "nope.pem", "cannot read the file", targetTLS={"CA": "nope.pem"})

    def test_notPEM(self):
        self.assertRefused(
            "TLS", "alpha.key", "is not a PEM certificate", tls=self.certs(("alpha.key", "alpha.key"))
        )
        self.assertRefused(
            "TLS", "alpha.pem", "is not a PEM private key", tls=self.certs(("alpha.pem", "alpha.pem"))
        )

    def test_keyNotOfCertificate(self):
        self.assertRefused(
            "TLS",
            "beta.key",
            "is not the private key of the certificate",
            tls=self.certs(("alpha.pem", "beta.key")),
        )
        self.assertRefused(
            "TargetTLS",
            "alpha.key",
            "is not the private key of the certificate",
            targetTLS={"Cert": "client.pem", "Key": "alpha.key"},
        )

    def test_keyOfNoCertificateInAChain(self):
        """
        A key that matches none of the certificates of a chain file is
        refused, saying so.
        """
        self.assertRefused(
            "TLS",
            "beta.key",
            "is not the private key of any of the 2 certificates in",
            tls=self.certs(("gamma-chain.pem", "beta.key")),
        )

    def test_expiredIsAWarning(self):
        loaded = self.load(tls=self.certs(("expired.pem", "expired.key")))
        self.assertIsNotNone(loaded.server)
        [warning] = [e for e in self.events if "expired" in e.get("log_format", "")]
        self.assertIn(os.path.join(self.folder, "expired.pem"), warning["path"])

    def test_verifyOffIsAWarning(self):
        loaded = self.load(targetTLS={"Verify": False})
        self.assertIsNotNone(loaded.client)
        self.assertEqual(len([e for e in self.events if e.get("event") == "tls-verify-off"]), 1)

    def test_startRefusedInOneLine(self):
        """
        Through C{twistd}'s entry point: one line, exit status 1.
        """
        import io
        import sys

        from tcpproxy.tap import Options, makeService

        app = {
            "Name": "secure",
            "Ports": [deadPort()],
            "Targets": ["127.0.0.1:2"],
            "TLS": self.certs(("alpha.pem", "beta.key")),
        }
        with open(self.path, "w") as f:
            json.dump({"BindAddress": "127.0.0.1", "Apps": [app]}, f)
        options = Options()
        options.parseOptions(["--config", self.path])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        exited = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(exited.code, 1)
        line = stderr.getvalue()
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(line.startswith(f'tcpproxy: error: {self.path}: app "secure": key "TLS": '), line)
        self.assertIn("beta.key: is not the private key of the certificate", line)


class TwistedTerminationTests(TerminationTests):
    engine = "twisted"


class TwistedALPNTests(ALPNTests):
    engine = "twisted"


class TwistedHandshakeFloodTests(HandshakeFloodTests):
    engine = "twisted"


class TwistedTLSBackpressureTests(TLSBackpressureTests):
    engine = "twisted"


class TwistedNamesAsWrittenTests(NamesAsWrittenTests):
    engine = "twisted"


class TwistedOriginationTests(OriginationTests):
    engine = "twisted"


class TwistedCloseNotifyTests(CloseNotifyTests):
    engine = "twisted"
