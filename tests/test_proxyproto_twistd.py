"""
System tests of the PROXY protocol against a real implementation: HAProxy
(the Debian package C{haproxy}; C{.ci/run} installs it) in front of the
real C{twistd -n tcpproxy} with C{AcceptProxy}, and behind it, where
tcpproxy's C{SendProxy} header is read by an HAProxy frontend with
C{accept-proxy} whose log shows the original client's address.

Skipped, saying so, where HAProxy is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading

from twisted.trial.unittest import SkipTest, TestCase

from tcpproxy.tests.certs import ALPHA, writePKI
from tests.support import TIMEOUT, Twistd, connect, describe, freePorts, receive, waitUntil


def haproxyPath() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def echoServer(testCase) -> int:
    """
    A threaded echo server on a free loopback port, until the test ends.
    """
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve(client: socket.socket) -> None:
        with client:
            client.settimeout(TIMEOUT)
            try:
                while data := client.recv(65536):
                    client.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(TIMEOUT)
        server.close()

    testCase.addCleanup(close)
    return server.getsockname()[1]


HAPROXY_CONFIG = """\
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend send-v1
    bind 127.0.0.1:{sendV1}
    default_backend via-tcpproxy-v1
backend via-tcpproxy-v1
    server tcpproxy 127.0.0.1:{accepting} send-proxy
frontend send-v2
    bind 127.0.0.1:{sendV2}
    default_backend via-tcpproxy-v2
backend via-tcpproxy-v2
    server tcpproxy 127.0.0.1:{accepting} send-proxy-v2
frontend send-v2-tls
    bind 127.0.0.1:{sendV2Tls}
    default_backend via-tcpproxy-tls
backend via-tcpproxy-tls
    server tcpproxy 127.0.0.1:{acceptingTls} send-proxy-v2
frontend accepting
    bind 127.0.0.1:{haproxyAccepting} accept-proxy
    log-format "haproxy accepted client %ci:%cp authority=%[fc_pp_authority] id=%[fc_pp_unique_id]"
    default_backend echo
backend echo
    server echo 127.0.0.1:{echo}
"""


class HAProxyInteropTests(TestCase):
    def setUp(self) -> None:
        haproxy = haproxyPath()
        if haproxy is None:
            raise SkipTest("HAProxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)")
        self.twistd = Twistd(self)
        self.folder = writePKI(self.twistd.path("pki"))
        echo = echoServer(self)
        names = (
            "sendV1",
            "sendV2",
            "accepting",
            "haproxyAccepting",
            "v1",
            "v2",
            "tlsV2",
            "sendV2Tls",
            "acceptingTls",
        )
        ports = dict(zip(names, freePorts(len(names)), strict=True))
        self.ports = ports
        config = self.twistd.writeConfig(
            {
                "BindAddress": "127.0.0.1",
                "Apps": [
                    {
                        "Name": "behind-haproxy",
                        "Ports": [ports["accepting"]],
                        "Targets": [f"127.0.0.1:{echo}"],
                        "AcceptProxy": {"From": ["127.0.0.1/32"], "Required": True, "Timeout": 3},
                    },
                    {
                        "Name": "sends-v1",
                        "Ports": [ports["v1"]],
                        "Targets": [f"127.0.0.1:{ports['haproxyAccepting']}"],
                        "SendProxy": "v1",
                    },
                    {
                        "Name": "sends-v2",
                        "Ports": [ports["v2"]],
                        "Targets": [f"127.0.0.1:{ports['haproxyAccepting']}"],
                        "SendProxy": "v2",
                    },
                    {
                        "Name": "tls-behind-haproxy",
                        "Ports": [ports["acceptingTls"]],
                        "Targets": [f"127.0.0.1:{echo}"],
                        "AcceptProxy": {"From": ["127.0.0.1/32"]},
                        "TLS": {
                            "Certificates": [{"Cert": self.pki("alpha.pem"), "Key": self.pki("alpha.key")}]
                        },
                    },
                    {
                        "Name": "tls-sends-v2",
                        "Ports": [ports["tlsV2"]],
                        "Targets": [f"127.0.0.1:{ports['haproxyAccepting']}"],
                        "SendProxy": "v2",
                        "TLS": {
                            "Certificates": [{"Cert": self.pki("alpha.pem"), "Key": self.pki("alpha.key")}]
                        },
                    },
                ],
            }
        )
        haproxyConfig = self.twistd.writeConfig(HAPROXY_CONFIG.format(echo=echo, **ports), "haproxy.cfg")
        self.haproxyLog = self.twistd.path("haproxy.log")
        with open(self.haproxyLog, "wb") as out:
            self.haproxy = subprocess.Popen(
                [haproxy, "-db", "-f", haproxyConfig],
                cwd=self.twistd.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.addCleanup(self._stopHAProxy)
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", config)
        self.twistd.waitUntilServing(
            ports["accepting"], ports["v1"], ports["v2"], ports["tlsV2"], ports["acceptingTls"]
        )
        for name in ("sendV1", "sendV2", "haproxyAccepting", "sendV2Tls"):
            waitUntil(
                lambda name=name: self._haproxyRunning() and _accepts(ports[name]), f"HAProxy on {name}"
            )

    def pki(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _haproxyRunning(self) -> bool:
        if self.haproxy.poll() is not None:
            with open(self.haproxyLog, encoding="utf-8", errors="replace") as f:
                raise AssertionError(f"haproxy exited with status {self.haproxy.returncode}:\n{f.read()}")
        return True

    def _stopHAProxy(self) -> None:
        if self.haproxy.poll() is None:
            self.haproxy.kill()
        self.haproxy.wait(TIMEOUT)

    def echo(self, port: int, message: bytes) -> str:
        """
        Send C{message} through C{port} and read its echo; return the
        client's own address.
        """
        with connect(port) as sock:
            client = describe(sock)
            sock.sendall(message)
            self.assertEqual(receive(sock, len(message)), message)
        return client

    def haproxySaw(self) -> str:
        with open(self.haproxyLog, encoding="utf-8", errors="replace") as f:
            return f.read()

    def test_haproxySendsV1(self) -> None:
        """
        HAProxy with C{send-proxy} in front: tcpproxy's access log names
        the client that connected to HAProxy.
        """
        client = self.echo(self.ports["sendV1"], b"through HAProxy, v1")
        waitUntil(lambda: f"{client} -> behind-haproxy:" in self.twistd.stdout(), "the access line")

    def test_haproxySendsV2(self) -> None:
        client = self.echo(self.ports["sendV2"], b"through HAProxy, v2" * 1000)
        waitUntil(lambda: f"{client} -> behind-haproxy:" in self.twistd.stdout(), "the access line")

    def test_tcpproxySendsV1(self) -> None:
        """
        tcpproxy with C{SendProxy} v1 in front of an HAProxy frontend with
        C{accept-proxy}: HAProxy's log shows the original client.
        """
        client = self.echo(self.ports["v1"], b"to HAProxy, v1")
        waitUntil(lambda: f"haproxy accepted client {client}" in self.haproxySaw(), "HAProxy's log line")

    def test_tcpproxySendsV2(self) -> None:
        client = self.echo(self.ports["v2"], b"to HAProxy, v2")
        waitUntil(lambda: f"haproxy accepted client {client}" in self.haproxySaw(), "HAProxy's log line")

    def test_haproxySendsV2ToTLSApp(self) -> None:
        """
        HAProxy with C{send-proxy-v2} in front of an app that terminates
        TLS: the header is read first, then the TLS handshake; the access
        line names the client that connected to HAProxy, and its SNI.
        """
        context = ssl.create_default_context(cafile=self.pki("ca.pem"))
        with socket.create_connection(("127.0.0.1", self.ports["sendV2Tls"]), timeout=TIMEOUT) as raw:
            client = describe(raw)
            with context.wrap_socket(raw, server_hostname=ALPHA) as tls:
                tls.sendall(b"TLS behind HAProxy")
                self.assertEqual(receive(tls, 18), b"TLS behind HAProxy")
        waitUntil(
            lambda: re.search(
                re.escape(f"{client} -> tls-behind-haproxy:{self.ports['acceptingTls']} (")
                + r"[^)]*SNI "
                + re.escape(ALPHA),
                self.twistd.stdout(),
            ),
            "the access line",
        )

    def test_tcpproxySendsV2TLVs(self) -> None:
        """
        A TLS client of an app that terminates TLS and sends v2: HAProxy
        reads the client's SNI name as the authority TLV, and the unique id
        TLV is the connection id tcpproxy logs the connection with.
        """
        context = ssl.create_default_context(cafile=self.pki("ca.pem"))
        with socket.create_connection(("127.0.0.1", self.ports["tlsV2"]), timeout=TIMEOUT) as raw:
            client = describe(raw)
            with context.wrap_socket(raw, server_hostname=ALPHA) as tls:
                tls.sendall(b"over TLS")
                self.assertEqual(receive(tls, 8), b"over TLS")
        line = waitUntil(
            lambda: next(
                (x for x in self.twistd.stdout().splitlines() if f"] {client} -> tls-sends-v2:" in x), None
            ),
            "the access line",
        )
        connectionId = re.search(r"\[([0-9A-Z]+-\d+)\] " + re.escape(client), line).group(1)
        waitUntil(
            lambda: (
                f"haproxy accepted client {client} authority={ALPHA} id={connectionId}" in self.haproxySaw()
            ),
            "HAProxy's log line with the TLVs",
        )

    def test_noHeaderRefused(self) -> None:
        """
        A client that reaches the C{AcceptProxy} app directly, sending no
        header, is refused and logged.
        """
        with connect(self.ports["accepting"]) as sock:
            client = describe(sock)
            sock.sendall(b"no header here")
            self.assertEqual(receive(sock, 1), b"")
        waitUntil(
            lambda: (
                f"{client} -> behind-haproxy:{self.ports['accepting']}: refused (no PROXY header"
                in self.twistd.stdout()
            ),
            "the refusal",
        )


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return False
    return True
