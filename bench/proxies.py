"""
The proxies under test: how each is started, found ready, measured and
stopped.

Every proxy runs as a process of its own, pinned to the proxy's CPU, with one
listening port on 127.0.0.1 relaying to the one backend port (and, for the
proxies that terminate TLS, a second port that does, with a self-signed
certificate made for the run).  I{Direct} is the absence of a proxy: the load
generator talks to the backend itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from zope.interface import Attribute, Interface, implementer

from bench.backends import NotReady, waitUntilEchoing
from bench.load import Address
from bench.system import checkoutEnvironment, checkoutRoot, childSetup, residentKiB
from tcpproxy.tests.ports import freePorts

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0
"""
Seconds a proxy may take to accept and relay its first connection.
"""
STOP_GRACE = 3.0


class ProxyStartError(Exception):
    """
    A proxy did not start; the text says why, with the end of its output.
    """


class IProxyUnderTest(Interface):
    """
    One thing the load generator can be pointed at.
    """

    name = Attribute("Short name used in the tables, in --only and in the JSON.")
    description = Attribute("One line for the report: what exactly is run.")
    hasProcess = Attribute("Whether there is a proxy process whose memory can be measured.")
    address = Attribute("Where the load generator connects, once started.")
    pid = Attribute("The proxy process's id, once started, or None.")

    def unavailable() -> str | None:
        """
        Why this proxy cannot run on this machine, or C{None} if it can.
        """

    def start(backend: Address) -> None:
        """
        Start relaying to C{backend}; return once a connection is relayed.

        @raise ProxyStartError: it did not come up.
        """

    def alive() -> bool:
        """
        Whether the proxy is still running.
        """

    def stop() -> None:
        """
        Stop the proxy (and do nothing if it is not running).
        """

    def logText() -> str:
        """
        What the proxy wrote on its output so far.
        """


@implementer(IProxyUnderTest)
class Direct:
    """
    No proxy: the ceiling every proxy is measured against.
    """

    name = "direct"
    description = "no proxy: the load generator talks to the backend (the ceiling)"
    hasProcess = False
    address: Address | None = None
    pid = None

    def unavailable(self) -> str | None:
        return None

    def start(self, backend: Address) -> None:
        self.address = backend

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass

    def logText(self) -> str:
        return ""


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago, outside the range
    the kernel gives to outgoing connections (see L{freePorts}).
    """
    return freePorts(1)[0]


def writeSelfSigned(folder: str) -> tuple[str, str]:
    """
    Write a self-signed certificate and its key (PEM) into C{folder}, for
    the TLS scenario; return their paths.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certPath, keyPath = os.path.join(folder, "tls.pem"), os.path.join(folder, "tls.key")
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return certPath, keyPath


TLS_NAME = "bench.tcpproxy.test"
"""
The name on the TLS scenario's certificate (sent as SNI, not verified).
"""


class _ProxyProcess:
    """
    What the real proxies share: a command line in a work directory, output
    to a log file, pinned to the proxy's CPU, started and stopped.

    Subclasses say how to build the command (L{command}).

    @ivar tlsAddress: where the proxy terminates TLS (for the same backend),
        or C{None} if it does not.
    @ivar proxyProtocolAddress: where the proxy takes a PROXY protocol
        header and sends one to the same backend, or C{None}.
    """

    hasProcess = True
    address: Address | None = None
    tlsAddress: Address | None = None
    proxyProtocolAddress: Address | None = None
    wrapper: tuple[str, ...] = ()
    """
    A command the proxy is run under (C{valgrind ...}, L{bench.instructions}).
    """
    startTimeout = START_TIMEOUT

    def __init__(self, workdir: str, cpus: frozenset[int] | None) -> None:
        self._workdir = os.path.join(workdir, self.name)
        self._cpus = cpus
        self._process: subprocess.Popen | None = None
        self._logPath = os.path.join(self._workdir, "output.log")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def unavailable(self) -> str | None:
        return None

    def command(self, port: int, backend: Address) -> list[str]:
        raise NotImplementedError()

    def environment(self) -> dict[str, str] | None:
        """
        The child's environment (C{None}: this process's).
        """
        return None

    def start(self, backend: Address) -> None:
        os.makedirs(self._workdir, exist_ok=True)
        # Another program may take the port between freePort() and the
        # proxy binding it: try another.
        for attempt in range(3):
            port = freePort()
            argv = [*self.wrapper, *self.command(port, backend)]
            with open(self._logPath, "ab") as log:
                self._process = subprocess.Popen(
                    argv,
                    cwd=self._workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=childSetup(self._cpus),
                    start_new_session=True,
                    env=self.environment(),
                )
            self.address = (LOOPBACK, port)
            try:
                waitUntilEchoing(self.address, self.startTimeout, self.alive)
                return
            except NotReady as e:
                self.stop()
                if attempt == 2 or "in use" not in self.logText():
                    raise ProxyStartError(
                        f"{self.name}: {e}; its output ends with:\n{self._logTail()}"
                    ) from None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def residentKiB(self) -> int:
        return residentKiB(self.pid)

    def logText(self) -> str:
        try:
            with open(self._logPath, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _logTail(self, lines: int = 15) -> str:
        return "\n".join("    " + line for line in self.logText().splitlines()[-lines:])


def _twistd(*arguments: str) -> list[str]:
    # The real twistd, run by this interpreter: the process started is the
    # proxy itself (no wrapper), so its pid is the one to measure.
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *arguments]


@implementer(IProxyUnderTest)
class TcpProxy(_ProxyProcess):
    """
    The real C{twistd -n tcpproxy} process, with a one-app configuration.
    """

    name = "tcpproxy"

    def __init__(
        self,
        workdir: str,
        cpus: frozenset[int] | None,
        root: str | None = None,
        admin: bool = False,
        workers: int = 1,
    ) -> None:
        """
        @param root: the checkout to run (another commit's, to compare
            before and after a change in the same run); by default this one.
        @param admin: with the admin endpoint on (C{"Admin"}), as proxy
            C{tcpproxy-admin}: what keeping the metrics costs.
        @param workers: worker processes (C{--workers}); 2 is proxy
            C{tcpproxy-2w}, pinned like the others (its CPU time is that of
            its main process and workers together).
        """
        if root is not None:
            self.name = "baseline"
        if admin:
            self.name = "tcpproxy-admin"
        if workers > 1:
            self.name = f"tcpproxy-{workers}w"
        self._admin = admin
        self._workers = workers
        _ProxyProcess.__init__(self, workdir, cpus)
        self._root = root or checkoutRoot()

    @property
    def description(self) -> str:
        shape = "one app, one port, one target; TLS on a second port"
        if self._admin:
            shape += "; Admin on (metrics kept, not scraped during the windows)"
        if self._speaksProxyProtocol():
            shape += "; AcceptProxy and SendProxy on a third"
        if self._workers > 1:
            shape += f"; --workers {self._workers}"
        return f"twistd -n tcpproxy --config ({shape}), from {self._root}"

    def environment(self) -> dict[str, str]:
        # Measure the checkout's sources, as trial tests them, not
        # whatever version was last pip-installed.
        return checkoutEnvironment(self._root)

    def command(self, port: int, backend: Address) -> list[str]:
        certPath, keyPath = writeSelfSigned(self._workdir)
        tlsPort = freePort()
        self.tlsAddress = (LOOPBACK, tlsPort)
        config = {
            "BindAddress": LOOPBACK,
            "Apps": [
                {
                    "Name": "bench",
                    "Ports": [port],
                    "Targets": [f"{backend[0]}:{backend[1]}"],
                    # As the HAProxy under test, which logs nothing either.
                    "AccessLog": False,
                },
                {
                    "Name": "bench-tls",
                    "Ports": [tlsPort],
                    "Targets": [f"{backend[0]}:{backend[1]}"],
                    "AccessLog": False,
                    "TLS": {"Certificates": [{"Cert": certPath, "Key": keyPath}]},
                },
            ],
        }
        if self._admin:
            config["Admin"] = {"Listen": f"{LOOPBACK}:{freePort()}"}
        if self._speaksProxyProtocol():
            proxyProtocolPort = freePort()
            self.proxyProtocolAddress = (LOOPBACK, proxyProtocolPort)
            config["Apps"].append(
                {
                    "Name": "bench-proxy-protocol",
                    "Ports": [proxyProtocolPort],
                    "Targets": [f"{backend[0]}:{backend[1]}"],
                    "AccessLog": False,
                    "AcceptProxy": {"From": [f"{LOOPBACK}/32"]},
                    "SendProxy": "v2",
                }
            )
        path = os.path.join(self._workdir, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        workers = ["--workers", str(self._workers)] if self._workers > 1 else []
        return _twistd("-n", "--pidfile=", "tcpproxy", "--config", path, *workers)

    def _speaksProxyProtocol(self) -> bool:
        """
        Whether the checkout has the PROXY protocol (a baseline from before
        it would refuse the keys).
        """
        return os.path.exists(os.path.join(self._root, "tcpproxy", "proxyaccept.py"))


@implementer(IProxyUnderTest)
class PortForward(_ProxyProcess):
    """
    Twisted's own C{twistd -n portforward}: the relay tcpproxy started from.
    """

    name = "portforward"
    description = "twistd -n portforward (twisted.protocols.portforward)"

    def command(self, port: int, backend: Address) -> list[str]:
        listen = f"tcp:{port}:interface={LOOPBACK}"
        return _twistd(
            "-n", "--pidfile=", "portforward", "-p", listen, "-h", backend[0], "-d", str(backend[1])
        )


def findHAProxy() -> str | None:
    """
    The C{haproxy} binary, looked for on C{PATH} and in C{/usr/sbin}.
    """
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


@implementer(IProxyUnderTest)
class HAProxy(_ProxyProcess):
    """
    HAProxy in C{mode tcp}, round-robin, one thread, no logging, in the
    foreground.
    """

    name = "haproxy"

    def __init__(self, workdir: str, cpus: frozenset[int] | None, binary: str | None) -> None:
        """
        @param binary: the C{haproxy} to run (see L{findHAProxy}), or C{None}
            if it is not installed.
        """
        _ProxyProcess.__init__(self, workdir, cpus)
        self._binary = binary

    @property
    def description(self) -> str:
        return f"{self.version()} (mode tcp, balance roundrobin, nbthread 1, no logging)"

    def version(self) -> str:
        if self._binary is None:
            return "haproxy (not installed)"
        try:
            out = subprocess.run([self._binary, "-v"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "haproxy (version unknown)"
        words = out.split()
        return f"HAProxy {words[2]}" if len(words) > 2 else "haproxy (version unknown)"

    def unavailable(self) -> str | None:
        if self._binary is None:
            return "haproxy is not installed (apt-get install haproxy): skipped"
        return None

    def command(self, port: int, backend: Address) -> list[str]:
        certPath, keyPath = writeSelfSigned(self._workdir)
        # HAProxy takes the certificate and its key in one file.
        combined = os.path.join(self._workdir, "tls-combined.pem")
        with open(combined, "wb") as out:
            for path in (certPath, keyPath):
                with open(path, "rb") as f:
                    out.write(f.read())
        tlsPort = freePort()
        self.tlsAddress = (LOOPBACK, tlsPort)
        config = f"""\
global
    maxconn 6000
    nbthread 1

defaults
    mode tcp
    maxconn 6000
    timeout connect 5s
    timeout client 600s
    timeout server 600s

listen bench
    bind {LOOPBACK}:{port}
    balance roundrobin
    server backend {backend[0]}:{backend[1]}

listen bench-tls
    bind {LOOPBACK}:{tlsPort} ssl crt {combined} ssl-min-ver TLSv1.2
    balance roundrobin
    server backend {backend[0]}:{backend[1]}
"""
        path = os.path.join(self._workdir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(config)
        return [self._binary, "-f", path, "-db"]
