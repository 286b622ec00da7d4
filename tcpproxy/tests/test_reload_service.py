"""
Tests for L{tcpproxy.service.ProxyService.reload} on L{MemoryReactorClock}:
which listeners, factories and settings a reload leaves behind, and what it
logs.  (Real sockets and clients: L{tcpproxy.tests.test_reload_loopback}.)
"""

import json
import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.applying import APPLIED, APPLIED_WITH_ERRORS, REFUSED, UNCHANGED
from tcpproxy.config import loadConfig, parseTarget
from tcpproxy.service import ProxyService
from tcpproxy.tests.loopback import captureEvents, deadPort
from tcpproxy.tests.test_service import FakeRelay


class ListeningReactor(MemoryReactorClock):
    """
    A memory reactor whose adopted ports say whether they still listen.
    """

    def adoptStreamPort(self, fileno, addressFamily, factory):
        port = MemoryReactorClock.adoptStreamPort(self, fileno, addressFamily, factory)
        port.listening = True

        def stopListening():
            port.listening = False

        port.stopListening = stopListening
        return port


class ReloadTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ListeningReactor()
        self.p = [deadPort() for _ in range(5)]
        self.path = self.mktemp()
        self.write(self.apps(("one", self.p[:2], [9, 10]), ("two", self.p[2:3], [11])))
        self.service = ProxyService(loadConfig(self.path), self.reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.events = captureEvents(self, "tcpproxy.service")

    def apps(self, *apps, **top):
        return {
            "BindAddress": "127.0.0.1",
            "Apps": [
                {"Name": name, "Ports": list(ports), "Targets": [f"127.0.0.1:{t}" for t in targets]}
                for name, ports, targets in apps
            ],
            **top,
        }

    def write(self, document):
        with open(self.path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document))

    def reload(self):
        self.events.clear()
        return self.successResultOf(self.service.reload())

    def summary(self):
        [event] = [e for e in self.events if "result" in e]
        return event

    def test_unchanged(self):
        listeners = dict(self.service.listeningPorts)
        result = self.reload()
        self.assertEqual(result.status, UNCHANGED)
        self.assertEqual(self.summary()["summary"], UNCHANGED)
        self.assertEqual(self.service.listeningPorts, listeners)

    def test_invalidChangesNothing(self):
        """
        A refused file is logged with the validator's own words (file, app,
        key, value) and nothing changes.
        """
        before = self.service.config
        ports = dict(self.service.listeningPorts)
        document = self.apps(("one", self.p[:2], [9]))
        document["Apps"][0]["Ports"].append(70000)
        self.write(document)
        result = self.reload()
        self.assertEqual(result.status, REFUSED)
        message = f'{self.path}: app "one": key "Ports": 70000 is outside the port range 1-65535'
        self.assertEqual(result.errors, (message,))
        event = self.summary()
        self.assertEqual(event["log_level"].name, "error")
        self.assertEqual(event["error"], message)
        self.assertIs(self.service.config, before)
        self.assertEqual(self.service.listeningPorts, ports)
        self.assertEqual([p.listening for p in ports.values()], [True, True, True])

    def test_tracebackInputsRefusedInOneLine(self):
        """
        What once escaped as an exception ("failed unexpectedly") is refused
        like any other mistake: a number too large for a float, JSON nested
        a thousand deep, a NUL in a TLS path.  Nothing changes.
        """
        before = self.service.config
        for edit, fragment in [
            (lambda app: app.update(ConnectTimeout=10**400), 'app "one": key "ConnectTimeout": 1000'),
            (lambda app: app.update(HealthCheck={"Interval": 10**400}), 'key "HealthCheck.Interval": 1000'),
            (lambda app: app.update(IdleTimeout=[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]), "nested more than"),
            (
                lambda app: app.update(TLS={"Certificates": [{"Cert": "a\0b", "Key": "k"}]}),
                'key "TLS.Certificates[1].Cert": "a\\u0000b" holds a NUL character',
            ),
        ]:
            document = self.apps(("one", self.p[:2], [9, 10]), ("two", self.p[2:3], [11]))
            edit(document["Apps"][0])
            self.write(document)
            result = self.reload()
            self.assertEqual(result.status, REFUSED)
            [error] = result.errors
            self.assertIn(fragment, error)
            self.assertTrue(error.startswith(self.path + ": "), error)
            self.assertEqual(self.summary()["error"], error)
            self.assertIs(self.service.config, before)

    def test_byteOrderMark(self):
        """
        A file saved with a UTF-8 byte-order mark is reloaded like any other.
        """
        document = json.dumps(self.apps(("one", self.p[:1], [9, 10]), ("two", self.p[2:3], [11])))
        with open(self.path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + document.encode())
        result = self.reload()
        self.assertEqual(result.status, APPLIED)
        self.assertEqual(sorted(self.service.listeningPorts), sorted([self.p[0], self.p[2]]))

    def test_missingFile(self):
        self.path = self.service.configPath = self.mktemp()
        result = self.reload()
        self.assertEqual(result.status, REFUSED)
        self.assertIn("cannot read the configuration file", result.errors[0])

    def test_portAddedAndRemoved(self):
        """
        A new port is adopted with its app; a removed port stops listening.
        """
        p = self.p
        removed = self.service.listeningPorts[p[1]]
        self.write(self.apps(("one", [p[0], p[3]], [9, 10]), ("two", [p[2]], [11])))
        result = self.reload()
        self.assertEqual(result.status, APPLIED)
        self.assertEqual(sorted(self.service.listeningPorts), sorted([p[0], p[2], p[3]]))
        self.assertFalse(removed.listening)
        added = self.service.listeningPorts[p[3]]
        self.assertTrue(added.listening)
        self.assertIs(added.acceptor.appFactory, self.service.factories["one"])
        event = self.summary()
        self.assertEqual((event["portsAdded"], event["portsRemoved"]), ([p[3]], [p[1]]))
        self.assertEqual(
            event["summary"],
            f'applied; ports added: {p[3]}; ports removed: {p[1]}; apps changed: "one" (Ports)',
        )

    def test_portMoved(self):
        """
        A port moved to another app keeps its listener; its next client goes
        to the other app.
        """
        p = self.p
        listeners = dict(self.service.listeningPorts)
        listener = listeners[p[1]]
        portFactory = listener.acceptor
        self.write(self.apps(("one", [p[0]], [9, 10]), ("two", [p[2], p[1]], [11])))
        result = self.reload()
        self.assertEqual(result.status, APPLIED)
        self.assertIs(self.service.listeningPorts[p[1]], listener)
        self.assertTrue(listener.listening)
        self.assertEqual(self.service.listeningPorts, listeners)
        self.assertIs(portFactory.appFactory, self.service.factories["two"])
        self.assertEqual(self.summary()["portsMoved"], [[p[1], "one", "two"]])

    def test_targetsChanged(self):
        """
        New targets are the same factory's, for the next connections, and
        the rotation goes on for the targets that stay.
        """
        factory = self.service.factories["one"]
        self.assertEqual(factory.balancer.order()[0], parseTarget("127.0.0.1:9"))
        dialer = factory.dialer
        self.write(self.apps(("one", self.p[:2], [12, 10]), ("two", self.p[2:3], [11])))
        self.assertEqual(self.reload().status, APPLIED)
        self.assertIs(self.service.factories["one"], factory)
        self.assertEqual([str(t) for t in factory.app.targets], ["127.0.0.1:12", "127.0.0.1:10"])
        self.assertEqual([str(t) for t in factory.balancer.order()], ["127.0.0.1:10", "127.0.0.1:12"])
        self.assertIs(factory.dialer, dialer)
        self.assertEqual(self.summary()["appsChanged"], {"one": ["Targets"]})

    def test_connectTimeoutChanged(self):
        factory = self.service.factories["two"]
        balancer = factory.balancer
        document = self.apps(("one", self.p[:2], [9, 10]), ("two", self.p[2:3], [11]))
        document["Apps"][1]["ConnectTimeout"] = 0.5
        self.write(document)
        self.reload()
        self.assertEqual(factory.dialer.timeout, 0.5)
        self.assertIs(factory.balancer, balancer)

    def test_accessLogChanged(self):
        """
        A setting the relay reads from its app (here C{AccessLog}) follows
        the reload with no code of the reload's own.
        """
        factory = self.service.factories["one"]
        document = self.apps(("one", self.p[:2], [9, 10]), ("two", self.p[2:3], [11]))
        document["Apps"][0]["AccessLog"] = False
        self.write(document)
        self.reload()
        self.assertFalse(factory.app.accessLog)
        self.assertEqual(self.summary()["appsChanged"], {"one": ["AccessLog"]})

    def test_appRemovedDrainsAtStop(self):
        """
        A removed app's open connections go on, and stopping the proxy
        waits for them (then aborts them) like any other.
        """
        relay = FakeRelay(self.service.factories["two"])
        self.write(self.apps(("one", self.p[:2], [9, 10]), DrainTimeout=4))
        result = self.reload()
        self.assertEqual(
            result.plan.describe(),
            [f"ports removed: {self.p[2]}", 'apps removed: "two"', "DrainTimeout: 10s -> 4s"],
        )
        self.assertNotIn("two", self.service.factories)
        self.assertEqual(self.service.openConnections(), 1)
        stopped = self.service.stopService()
        self.reactor.advance(3.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.successResultOf(stopped)
        self.assertTrue(relay.aborted)

    def test_retiredForgottenWhenIdle(self):
        relay = FakeRelay(self.service.factories["two"])
        self.write(self.apps(("one", self.p[:2], [9, 10])))
        self.reload()
        relay.finish()
        self.assertEqual(self.service._allFactories(), [self.service.factories["one"]])
        self.successResultOf(self.service.stopService())

    def test_portInUse(self):
        """
        A port that cannot be bound is logged, naming the app and port; the
        rest of the reload applies; the next reload tries the port again.
        """
        p = self.p
        taken = socket.socket()
        taken.bind(("127.0.0.1", p[3]))
        taken.listen(1)
        self.write(self.apps(("one", p[:2], [9]), ("two", [p[2], p[3], p[4]], [11])))
        result = self.reload()
        taken.close()
        self.assertEqual(result.status, APPLIED_WITH_ERRORS)
        error = f'app "two": cannot listen on 127.0.0.1:{p[3]}: Address already in use'
        self.assertEqual(result.errors, (error,))
        self.assertEqual(sorted(self.service.listeningPorts), sorted([p[0], p[1], p[2], p[4]]))
        self.assertEqual(self.service.factories["one"].app.targets, (parseTarget("127.0.0.1:9"),))
        event = self.summary()
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(event["portsAdded"], [p[4]])
        self.assertTrue(event["summary"].startswith(f"applied with errors; ports added: {p[4]};"))
        self.assertTrue(event["summary"].endswith(f"; error: {error}"))

        result = self.reload()
        self.assertEqual(result.status, APPLIED)
        self.assertEqual(self.summary()["portsAdded"], [p[3]])
        self.assertIn(p[3], self.service.listeningPorts)

    def test_notRunning(self):
        self.successResultOf(self.service.stopService())
        self.write(self.apps(("one", self.p[3:4], [9])))
        self.assertEqual(self.reload().status, REFUSED)
        self.assertEqual(self.service.listeningPorts, {})
        [event] = self.events
        self.assertEqual(event["log_format"], "reload ignored: the proxy is stopping")


class FakeTrigger:
    reload = None

    def start(self, reload):
        self.reload = reload

    def stop(self):
        self.reload = None


class TriggerTests(SynchronousTestCase):
    def test_triggersLastUntilDrained(self):
        """
        The triggers start with the service and stop only once the drain is
        over: a reload asked for while draining is ignored, not fatal.
        """
        reactor = MemoryReactorClock()
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"BindAddress": "127.0.0.1", "Apps": [app("one", [deadPort()])]}, f)
        trigger = FakeTrigger()
        service = ProxyService(loadConfig(path), reactor, path, [trigger])
        self.assertIsNone(trigger.reload)
        service.startService()
        self.assertEqual(trigger.reload, service.reload)
        relay = FakeRelay(service.factories["one"])
        stopped = service.stopService()
        self.assertEqual(self.successResultOf(trigger.reload()).status, REFUSED)
        relay.finish()
        self.successResultOf(stopped)
        self.assertIsNone(trigger.reload)


def app(name, ports):
    return {"Name": name, "Ports": ports, "Targets": ["127.0.0.1:9"]}
