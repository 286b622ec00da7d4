"""
Tests for L{tcpproxy.service.ProxyService}: listeners per port, and the
drain at stop, on L{MemoryReactorClock}.
"""

import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.config import parseConfig
from tcpproxy.listening import ListenError
from tcpproxy.service import ProxyService
from tcpproxy.tests.loopback import captureEvents, deadPort


class FakeRelay:
    """
    Stands for an open connection: admitted by its app, it ends when told,
    or when aborted.
    """

    clientHost = "127.0.0.1"
    clientAddress = "127.0.0.1:40000"
    port = 1
    started = 0.0
    target = None
    failures = ()
    bytesIn = bytesOut = 0
    tlsFields: dict = {}
    connectionId = "0000000000000000-1"
    end = None

    def __init__(self, factory):
        self.factory = factory
        self.app = factory.app
        self.aborted = False
        factory.admit(self.clientHost)
        factory.relays.add(self)

    def finish(self):
        self.factory.relayEnded(self)

    def abort(self):
        self.aborted = True
        self.finish()


class ProxyServiceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.ports = [deadPort(), deadPort(), deadPort()]
        p = self.ports
        self.config = parseConfig(
            {
                "BindAddress": "127.0.0.1",
                "DrainTimeout": 3,
                "Apps": [
                    {"Name": "one", "Ports": [p[0], p[1]], "Targets": ["127.0.0.1:9"]},
                    {"Name": "two", "Ports": [p[2]], "Targets": ["127.0.0.1:10"]},
                ],
            },
            "test.json",
        )
        self.service = ProxyService(self.config, self.reactor)
        self.events = captureEvents(self, "tcpproxy.service")

    def test_oneListenerPerPort(self):
        """
        Every port of every app is watched by the reactor, each with a
        factory of its own that hands clients to its app's factory; one app
        factory serves all ports of an app.
        """
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        listeners = [self.service.listeningPorts[port] for port in self.ports]
        self.assertTrue(set(listeners) <= set(self.reactor.getReaders()))
        self.assertEqual([listener.getHost().port for listener in listeners], self.ports)
        factories = [listener.acceptor.appFactory for listener in listeners]
        self.assertIs(factories[0], factories[1])
        self.assertEqual([f.app.name for f in factories], ["one", "one", "two"])
        self.assertEqual(sorted(self.service.listeningPorts), sorted(self.ports))
        started = [e for e in self.events if "targets" in e]
        self.assertEqual(
            [(e["app"], e["ports"], e["targets"]) for e in started],
            [("one", self.ports[:2], ["127.0.0.1:9"]), ("two", self.ports[2:], ["127.0.0.1:10"])],
        )

    def test_portInUse(self):
        """
        A port that cannot be bound fails start-up with the app and port
        named, and releases the ports it had bound.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", self.ports[2]))
            taken.listen(1)
            error = self.assertRaises(ListenError, self.service.bind)
        self.assertIn(f'app "two": cannot listen on 127.0.0.1:{self.ports[2]}', str(error))
        with socket.socket() as again:
            again.bind(("127.0.0.1", self.ports[0]))

    def test_stopWithNothingOpen(self):
        self.service.startService()
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.service.listeningPorts, {})

    def test_drainWaitsForOpenConnections(self):
        """
        Stopping stops listening at once, then waits for open connections to
        end by themselves within the drain period.
        """
        self.service.startService()
        closed = []
        for number, port in self.service.listeningPorts.items():
            port.stopListening = lambda number=number: closed.append(number)
        relay = FakeRelay(self.service.factories["one"])
        stopped = self.service.stopService()
        self.assertEqual(sorted(closed), sorted(self.ports))
        self.reactor.advance(2.9)
        self.assertNoResult(stopped)
        relay.finish()
        self.successResultOf(stopped)
        self.assertFalse(relay.aborted)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_drainPeriodOver(self):
        """
        Connections still open when the drain period is over are aborted,
        with a warning.
        """
        self.service.startService()
        relays = [FakeRelay(self.service.factories["one"]), FakeRelay(self.service.factories["two"])]
        stopped = self.service.stopService()
        self.reactor.advance(3)
        self.successResultOf(stopped)
        self.assertEqual([r.aborted for r in relays], [True, True])
        [warning] = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(warning["count"], 2)
