"""
Tests for L{tcpproxy.tap}: the C{twistd tcpproxy} options, the service they
build on real loopback sockets, and how a refusal reaches the user.
"""

from __future__ import annotations

import gc
import io
import json
import os
import socket
import sys

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python import usage
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tcpproxy.config import ConfigError, loadConfig
from tcpproxy.demo import DemoBackendsService
from tcpproxy.jsonlog import JSONLogService
from tcpproxy.listening import ListenError
from tcpproxy.service import ProxyService
from tcpproxy.tap import Options, buildService, makeService
from tcpproxy.tests.loopback import blockPort, freePorts
from tcpproxy.tests.test_collector import keepCollector


def canBind(port: int) -> bool:
    """
    Whether C{127.0.0.1:port} is free to listen on (as the proxy binds it).
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
    return True


@implementer(IHalfCloseableProtocol)
class Exchange(Protocol):
    """
    Send some bytes, then EOF; C{received} fires with every byte that came
    back once the other side has closed too.
    """

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.data = b""
        self.received: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.message)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.received.callback(self.data)


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(TestCase):
    """
    The command line of C{twistd tcpproxy}.
    """

    def test_defaults(self) -> None:
        """
        With no option the proxy reads C{config.json} in the working
        directory and serves no demo backend.
        """
        options = parse()
        self.assertEqual(options["config"], "config.json")
        self.assertFalse(options["demo-backends"])
        self.assertEqual(options["demo-down"], [])

    def test_config(self) -> None:
        self.assertEqual(parse("--config", "other.json")["config"], "other.json")
        self.assertEqual(parse("-c", "short.json")["config"], "short.json")

    def test_demoDown(self) -> None:
        """
        C{--demo-down} may be repeated; every target is kept as written.
        """
        options = parse("--demo-backends", "--demo-down", "127.0.0.1:6003", "--demo-down", "[::1]:7001")
        self.assertTrue(options["demo-backends"])
        self.assertEqual(options["demo-down"], ["127.0.0.1:6003", "[::1]:7001"])

    def test_demoDownNotShared(self) -> None:
        """
        Each L{Options} has its own list of dead targets.
        """
        parse("--demo-backends", "--demo-down", "127.0.0.1:6003")
        self.assertEqual(parse()["demo-down"], [])

    def test_demoDownBadTarget(self) -> None:
        """
        A C{--demo-down} that is no target is a usage error that quotes it.
        """
        error = self.assertRaises(usage.UsageError, parse, "--demo-backends", "--demo-down", "nowhere")
        self.assertIn("--demo-down 'nowhere' has no port", str(error))

    def test_demoDownBadPort(self) -> None:
        error = self.assertRaises(
            usage.UsageError, parse, "--demo-backends", "--demo-down", "127.0.0.1:99999"
        )
        self.assertIn("--demo-down '127.0.0.1:99999' has port 99999", str(error))

    def test_demoDownWithoutBackends(self) -> None:
        """
        C{--demo-down} alone would do nothing: it is refused.
        """
        error = self.assertRaises(usage.UsageError, parse, "--demo-down", "127.0.0.1:6003")
        self.assertIn("--demo-backends", str(error))


class ConfigFileMixin:
    """
    Write a configuration on free loopback ports for one test.
    """

    def writeConfig(self, document: dict) -> str:
        path = os.path.abspath(self.mktemp()) + ".json"
        with open(path, "w") as f:
            json.dump(document, f)
        return path

    def loopbackConfig(self, ports: list[int], targets: list[int], **top: object) -> str:
        """
        One app, C{"web"}, on C{ports} of 127.0.0.1 relaying to C{targets}
        on 127.0.0.1.
        """
        document = {
            "BindAddress": "127.0.0.1",
            "Apps": [{"Name": "web", "Ports": ports, "Targets": [f"127.0.0.1:{t}" for t in targets]}],
        }
        document.update(top)
        return self.writeConfig(document)

    def serveUntilTestEnds(self, service) -> None:
        """
        Start C{service} now and stop it when the test ends, which also
        closes every socket it bound.
        """
        service.startService()
        self.addCleanup(service.stopService)


class BuildServiceTests(ConfigFileMixin, TestCase):
    """
    L{buildService} reads the configuration and binds every port at once, so
    that a refusal comes before C{twistd} goes on.
    """

    def test_proxyOnly(self) -> None:
        """
        Without C{--demo-backends} the service is the proxy alone, and its
        ports are bound before it is even started.
        """
        proxyA, proxyB, target = freePorts(3)
        path = self.loopbackConfig([proxyA, proxyB], [target])
        service = buildService(parse("--config", path))
        self.serveUntilTestEnds(service)
        self.assertIsInstance(service, ProxyService)
        self.assertEqual(service.config, loadConfig(path))
        self.assertFalse(canBind(proxyA))
        self.assertFalse(canBind(proxyB))
        self.assertTrue(canBind(target))

    def test_boundBeforeStart(self) -> None:
        """
        The ports are bound when L{buildService} returns, before the service
        starts (C{twistd} forks and writes its pidfile in between).
        """
        proxy, target = freePorts(2)
        service = buildService(parse("--config", self.loopbackConfig([proxy], [target])))
        self.assertFalse(canBind(proxy))
        self.serveUntilTestEnds(service)

    def test_demoBackends(self) -> None:
        """
        With C{--demo-backends} the demo echo servers come first, so they are
        up before the proxy sends them anything, and their ports are bound.
        """
        proxy, targetA, targetB = freePorts(3)
        path = self.loopbackConfig([proxy], [targetA, targetB])
        service = buildService(parse("--config", path, "--demo-backends"))
        self.serveUntilTestEnds(service)
        self.assertIsInstance(service, MultiService)
        children = list(IServiceCollection(service))
        self.assertEqual([type(child) for child in children], [DemoBackendsService, ProxyService])
        self.assertEqual(
            [str(t) for t in children[0].targets], [f"127.0.0.1:{targetA}", f"127.0.0.1:{targetB}"]
        )
        for port in (proxy, targetA, targetB):
            self.assertFalse(canBind(port))

    def test_demoBackendsEcho(self) -> None:
        """
        What C{--demo-backends} is for: the proxy answers with no real backend.
        """
        proxy, target = freePorts(2)
        path = self.loopbackConfig([proxy], [target])
        service = buildService(parse("--config", path, "--demo-backends"))
        self.serveUntilTestEnds(service)

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy, timeout=5)
        d = connectProtocol(endpoint, Exchange(b"through the proxy"))
        d.addCallback(lambda client: client.received)
        d.addCallback(self.assertEqual, b"through the proxy")
        return d

    def test_demoDown(self) -> None:
        """
        A C{--demo-down} target is left unserved; the others are served.
        """
        proxy, up, down = freePorts(3)
        path = self.loopbackConfig([proxy], [up, down])
        service = buildService(parse("--config", path, "--demo-backends", "--demo-down", f"127.0.0.1:{down}"))
        self.serveUntilTestEnds(service)
        demo = list(IServiceCollection(service))[0]
        self.assertEqual([str(t) for t in demo.targets], [f"127.0.0.1:{up}"])
        self.assertFalse(canBind(up))
        self.assertTrue(canBind(down))

    def test_jsonLog(self) -> None:
        """
        With C{--json-log}, the proxy runs under a L{JSONLogService} that
        writes to that file.
        """
        proxy, target = freePorts(2)
        path = self.loopbackConfig([proxy], [target])
        jsonPath = os.path.abspath(self.mktemp())
        service = buildService(parse("--config", path, "--json-log", jsonPath))
        self.serveUntilTestEnds(service)
        self.assertIsInstance(service, JSONLogService)
        self.assertEqual(service.path, jsonPath)
        self.assertEqual([type(child) for child in IServiceCollection(service)], [ProxyService])
        self.assertFalse(canBind(proxy))

    def test_jsonLogUnwritable(self) -> None:
        """
        A C{--json-log} file that cannot be written is refused before any
        port is bound.
        """
        proxy, target = freePorts(2)
        path = self.loopbackConfig([proxy], [target])
        options = parse("--config", path, "--json-log", "/nonexistent/events.json")
        error = self.assertRaises(ConfigError, buildService, options)
        self.assertEqual(
            str(error), "--json-log /nonexistent/events.json: cannot be written: No such file or directory"
        )
        self.assertTrue(canBind(proxy))

    def test_jsonLogClosedOnRefusal(self) -> None:
        """
        A refused configuration closes the C{--json-log} file opened first.
        """
        closed = []
        self.patch(JSONLogService, "close", lambda service: closed.append(service.path))
        jsonPath = os.path.abspath(self.mktemp())
        options = parse("--config", self.writeConfig({"Apps": []}), "--json-log", jsonPath)
        self.assertRaises(ConfigError, buildService, options)
        self.assertEqual(closed, [jsonPath])

    def test_demoDownUnknownTarget(self) -> None:
        """
        A C{--demo-down} target that is not in the configuration is a
        mistake: the error names it and the file, and nothing is bound.
        """
        proxy, target, other = freePorts(3)
        path = self.loopbackConfig([proxy], [target])
        options = parse("--config", path, "--demo-backends", "--demo-down", f"127.0.0.1:{other}")
        error = self.assertRaises(ConfigError, buildService, options)
        self.assertEqual(str(error), f"--demo-down: 127.0.0.1:{other} is not a target of {path}")
        self.assertTrue(canBind(proxy))
        self.assertTrue(canBind(target))

    def test_configError(self) -> None:
        """
        A refused configuration raises the L{ConfigError} of L{loadConfig}.
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, buildService, parse("--config", path))
        self.assertTrue(str(error).startswith(f"{path}: cannot read the configuration file"))

    def test_scaleToZeroRefusedWithWorkers(self) -> None:
        """
        C{ScaleToZero} with worker processes is refused in one line: each
        worker would stop targets the others use.
        """
        path = self.writeConfig(
            {"Apps": [{"Name": "web", "Ports": [1], "Targets": ["127.0.0.1:2"], "ScaleToZero": {}}]}
        )
        error = self.assertRaises(ConfigError, buildService, parse("--config", path, "--workers", "2"))
        self.assertEqual(
            str(error),
            f'{path}: app "web": key "ScaleToZero": cannot be used with 2 worker processes: each would stop'
            " and start the targets on its own, blind to the other workers' connections; run one process"
            " (no --workers)",
        )

    def test_portInUse(self) -> None:
        """
        A port that is taken raises L{ListenError} naming the app and the
        port, and the ports bound before it are released: all or nothing.
        """
        free, target = freePorts(2)
        taken = blockPort(self)
        path = self.loopbackConfig([free, taken], [target])
        error = self.assertRaises(ListenError, buildService, parse("--config", path))
        message = str(error)
        self.assertIn('"web"', message)
        self.assertIn(f"127.0.0.1:{taken}", message)
        self.assertIn("Address already in use", message)
        self.assertTrue(canBind(free))

    def test_demoPortInUse(self) -> None:
        """
        A demo backend's port that is taken is reported as such, and the
        proxy's ports are left free.
        """
        proxy, target = freePorts(2)
        taken = blockPort(self)
        path = self.loopbackConfig([proxy], [target, taken])
        error = self.assertRaises(ListenError, buildService, parse("--config", path, "--demo-backends"))
        self.assertIn(f"demo backend: cannot listen on 127.0.0.1:{taken}", str(error))
        self.assertTrue(canBind(proxy))
        self.assertTrue(canBind(target))

    def test_proxyPortInUseReleasesDemo(self) -> None:
        """
        When the demo backends were bound but a proxy port is taken, the
        demo ports are released too: the caller gets an error, not sockets
        left open behind it.
        """
        target = freePorts(1)[0]
        taken = blockPort(self)
        path = self.loopbackConfig([taken], [target])
        error = self.assertRaises(ListenError, buildService, parse("--config", path, "--demo-backends"))
        self.assertIn(f"127.0.0.1:{taken}", str(error))
        self.assertTrue(canBind(target), f"demo backend port {target} is still bound after the error")


class MakeServiceTests(ConfigFileMixin, TestCase):
    """
    L{makeService}, which C{twistd} calls, turns a refusal into one line on
    standard error and exit status 1, instead of a traceback.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def assertExits(self, options: Options) -> str:
        """
        Assert that L{makeService} exits with status 1, having written one
        line on standard error.

        @return: the line, without its newline.
        """
        exited = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(exited.code, 1)
        written = self.stderr.getvalue()
        self.assertTrue(written.endswith("\n"), repr(written))
        self.assertEqual(written.count("\n"), 1, written)
        self.assertTrue(written.startswith("tcpproxy: error: "), written)
        return written[: -len("\n")]

    def test_configError(self) -> None:
        path = self.writeConfig({"Apps": [{"Name": "web", "Ports": [1], "Tragets": ["127.0.0.1:2"]}]})
        line = self.assertExits(parse("--config", path))
        self.assertEqual(
            line,
            f'tcpproxy: error: {path}: app "web": key "Tragets": unknown key (did you mean "Targets"?); '
            "known keys are Name, Ports, Targets, ConnectTimeout, AccessLog, AccessLogFormat, "
            "AccessLogInterval, IdleTimeout, HealthCheck, "
            "MaxConnections, MaxConnectionsPerClient, BandwidthLimit, Allow, Deny, TLS, TargetTLS, "
            "AcceptProxy, SendProxy, Balance, QueueTimeout, SlowStart, Resolve, Refresh, Hold, Pool, "
            "ScaleToZero",
        )

    def test_missingConfig(self) -> None:
        path = os.path.abspath(self.mktemp())
        line = self.assertExits(parse("--config", path))
        self.assertEqual(
            line, f"tcpproxy: error: {path}: cannot read the configuration file: No such file or directory"
        )

    def test_demoDownUnknownTarget(self) -> None:
        proxy, target = freePorts(2)
        path = self.loopbackConfig([proxy], [target])
        line = self.assertExits(parse("--config", path, "--demo-backends", "--demo-down", "127.0.0.1:1"))
        self.assertEqual(line, f"tcpproxy: error: --demo-down: 127.0.0.1:1 is not a target of {path}")

    def test_listenError(self) -> None:
        target = freePorts(1)[0]
        taken = blockPort(self)
        path = self.loopbackConfig([taken], [target])
        line = self.assertExits(parse("--config", path))
        self.assertEqual(
            line,
            f'tcpproxy: error: {path}: app "web": cannot listen on 127.0.0.1:{taken}: Address already in use',
        )

    def test_service(self) -> None:
        """
        An accepted configuration gives the service, and nothing on standard
        error.
        """
        proxy, target = freePorts(2)
        keepCollector(self)
        gc.unfreeze()
        service = makeService(parse("--config", self.loopbackConfig([proxy], [target])))
        self.serveUntilTestEnds(service)
        self.assertIsInstance(service, ProxyService)
        self.assertEqual(self.stderr.getvalue(), "")
        # What was alive once the service was built is frozen
        # (tcpproxy.collector).
        self.assertGreater(gc.get_freeze_count(), 0)
