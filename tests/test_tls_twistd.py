"""
System tests of TLS: the real C{twistd -n tcpproxy}, with certificate files
beside the configuration (named relative to it), checked with Python's
C{ssl} as a user checks with C{openssl s_client}.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading

from OpenSSL import SSL
from twisted.trial.unittest import TestCase

from tcpproxy.tests.certs import ALPHA, BETA, writePKI
from tests.support import TIMEOUT, Twistd, freePorts, waitUntil


def tlsEcho(port: int, serverName: str | None, message: bytes, caFile: str) -> tuple[bytes, str, str]:
    """
    Connect with TLS (verifying against C{caFile} and C{serverName}), send
    C{message}, read its echo, close.

    @return: the echo, the certificate's common name, the TLS version.
    """
    context = ssl.create_default_context(cafile=caFile)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=serverName) as tls:
            tls.sendall(message)
            received = b""
            while len(received) < len(message):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                received += chunk
            subject = dict(pair[0] for pair in tls.getpeercert()["subject"])
            return received, subject["commonName"], tls.version()


class TLSTwistdTests(TestCase):
    def setUp(self) -> None:
        self.twistd = Twistd(self)
        # Beside the configuration, in a folder that is not twistd's working
        # directory: paths are relative to the configuration file.
        self.folder = writePKI(self.twistd.path("conf"))
        self.port, self.target = freePorts(2)

    def writeConfig(self, document: dict) -> str:
        path = os.path.join(self.folder, "config.json")
        with open(path, "w") as f:
            json.dump(document, f)
        return path

    def document(self, certificates) -> dict:
        return {
            "BindAddress": "127.0.0.1",
            "Apps": [
                {
                    "Name": "secure",
                    "Ports": [self.port],
                    "Targets": [f"127.0.0.1:{self.target}"],
                    "TLS": {"Certificates": [{"Cert": c, "Key": k} for c, k in certificates]},
                }
            ],
        }

    def test_sniAndEcho(self) -> None:
        config = self.writeConfig(self.document([("alpha.pem", "alpha.key"), ("beta.pem", "beta.key")]))
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config, "--demo-backends")
        self.twistd.waitUntilServing(self.port)
        ca = os.path.join(self.folder, "ca.pem")
        message = os.urandom(200_000)
        self.assertEqual(tlsEcho(self.port, BETA, message, ca)[:2], (message, "beta"))
        self.assertEqual(tlsEcho(self.port, ALPHA, b"hi", ca)[:2], (b"hi", "alpha"))
        waitUntil(lambda: "SNI alpha.test" in self.twistd.stdout(), "the access log line")
        out = self.twistd.stdout()
        self.assertIn(f"port(s) {self.port} (TLS)", out)
        self.assertIn("SNI beta.test", out)
        self.assertIn("200000 bytes in, 200000 bytes out", out)
        self.twistd.process.send_signal(signal.SIGTERM)
        self.assertEqual(self.twistd.wait(), -signal.SIGTERM, self.twistd.output())
        self.assertNotIn("Traceback", self.twistd.output())

    def test_keyNotOfCertificateRefused(self) -> None:
        config = self.writeConfig(self.document([("alpha.pem", "beta.key")]))
        self.assertEqual(self.twistd.run("-n", "--pidfile=", "tcpproxy", "--config", config), 1)
        self.assertEqual(
            self.twistd.stderr(),
            f'tcpproxy: error: {config}: app "secure": key "TLS": {os.path.join(self.folder, "beta.key")}: '
            f"is not the private key of the certificate {os.path.join(self.folder, 'alpha.pem')}\n",
        )

    def httpTarget(self) -> None:
        """
        A small HTTP server on the target port, in a thread, until the test
        ends: it answers C{GET} with C{ok}.
        """

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.target), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)

    def test_alpnWithRealClients(self) -> None:
        """
        C{curl} (which offers C{h2,http/1.1}) and C{openssl s_client}, with
        and without C{-alpn}, complete their handshake: on a port without
        C{"ALPN"} none is selected, on one with C{["http/1.1", "h2"]} the
        first of these the client offers.
        """
        curl, openssl = shutil.which("curl"), shutil.which("openssl")
        if curl is None or openssl is None:
            raise self.skipTest("needs the curl and openssl commands")
        document = self.document([("alpha.pem", "alpha.key")])
        [alpnPort] = [p for p in freePorts(3) if p not in (self.port, self.target)][:1]
        plain = document["Apps"][0]
        alpnTLS = {**plain["TLS"], "ALPN": ["http/1.1", "h2"]}
        document["Apps"].append({**plain, "Name": "alpn", "Ports": [alpnPort], "TLS": alpnTLS})
        config = self.writeConfig(document)
        self.httpTarget()
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config)
        self.twistd.waitUntilServing(self.port, alpnPort)
        ca = os.path.join(self.folder, "ca.pem")

        def curlThrough(port: int) -> subprocess.CompletedProcess:
            resolve = f"{ALPHA}:{port}:127.0.0.1"
            return subprocess.run(
                [curl, "-sS", "-v", "--cacert", ca, "--resolve", resolve, f"https://{ALPHA}:{port}/"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )

        def sClient(port: int, *alpn: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", ALPHA, "-CAfile", ca]
                + list(alpn),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )

        for port, chosen in ((self.port, None), (alpnPort, "http/1.1")):
            fetched = curlThrough(port)
            self.assertEqual((fetched.returncode, fetched.stdout), (0, "ok"), fetched.stderr)
            for alpn in (("-alpn", "h2,http/1.1"), ("-alpn", "http/1.1"), ()):
                session = sClient(port, *alpn)
                self.assertEqual(session.returncode, 0, session.stdout + session.stderr)
                self.assertIn("Verify return code: 0 (ok)", session.stdout)
                expected = f"ALPN protocol: {chosen}" if chosen and alpn else "No ALPN negotiated"
                self.assertIn(expected, session.stdout)
        self.assertIn("ALPN protocol: h2", sClient(alpnPort, "-alpn", "h2").stdout)
        self.assertNotIn("Traceback", self.twistd.output())

    def test_closeNotifyIsHalfClose(self) -> None:
        """
        A TLS 1.3 client that sends its request, then C{close_notify} alone
        (as Go's C{tls.Conn.CloseWrite}), and waits, gets the answer its
        target makes only after EOF, then C{close_notify}; the access log
        says C{done} with the answer's bytes.
        """

        class AnswersAtEOF(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = self.rfile.read()  # up to EOF
                self.wfile.write(b"reply to " + request)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.target), AnswersAtEOF)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        config = self.writeConfig(self.document([("alpha.pem", "alpha.key")]))
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config)
        self.twistd.waitUntilServing(self.port)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.load_verify_locations(os.path.join(self.folder, "ca.pem"))
        context.set_verify(SSL.VERIFY_PEER)
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as raw:
            # pyOpenSSL on a blocking socket (a timeout would make its calls
            # raise WantReadError): the proxy's own timeouts end this if the
            # answer never comes.
            raw.settimeout(None)
            client = SSL.Connection(context, raw)
            client.set_tlsext_host_name(ALPHA.encode("ascii"))
            client.set_connect_state()
            client.do_handshake()
            client.sendall(b"request")
            client.shutdown()  # close_notify, once: our side only
            received = b""
            with self.assertRaises(SSL.ZeroReturnError):  # its close_notify
                while True:
                    received += client.recv(65536)
        self.assertEqual(received, b"reply to request")
        waitUntil(lambda: "7 bytes in" in self.twistd.stdout(), "the access log line")
        self.assertIn(": done after ", self.twistd.stdout())
        self.assertIn("7 bytes in, 16 bytes out", self.twistd.stdout())
        self.assertNotIn("Traceback", self.twistd.output())
