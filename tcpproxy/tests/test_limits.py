"""
Unit tests of L{tcpproxy.limits} and L{tcpproxy.idle}, on a L{Clock}.
"""

import ipaddress
import resource

from twisted.internet.testing import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.idle import IdleSweeper, IIdleWatched
from tcpproxy.limits import (
    BACKPRESSURE,
    BUCKET,
    MIN_READ,
    REFUSED_APP_LIMIT,
    REFUSED_CLIENT_LIMIT,
    AcceptGate,
    ConnectionCounter,
    Throttle,
    TokenBucket,
    descriptorBudget,
    permitted,
    raiseFileLimit,
)
from tcpproxy.relay import ProxyServerProtocol
from tcpproxy.tests.loopback import captureEvents


def text(event: dict) -> str:
    return event["log_format"].format(**event)


def nets(*texts):
    return tuple(ipaddress.ip_network(t) for t in texts)


class PermittedTests(SynchronousTestCase):
    def test_noLists(self):
        self.assertTrue(permitted("10.1.2.3", (), ()))

    def test_allowIPv4(self):
        allow = nets("10.0.0.0/8")
        self.assertTrue(permitted("10.1.2.3", allow, ()))
        self.assertFalse(permitted("11.1.2.3", allow, ()))

    def test_denyWinsOverAllow(self):
        self.assertFalse(permitted("10.1.2.3", nets("10.0.0.0/8"), nets("10.1.0.0/16")))
        self.assertTrue(permitted("10.2.2.3", nets("10.0.0.0/8"), nets("10.1.0.0/16")))

    def test_IPv6(self):
        self.assertTrue(permitted("::1", nets("::1/128"), ()))
        self.assertFalse(permitted("::1", (), nets("::/0")))
        self.assertFalse(permitted("2001:db8::1", nets("::1/128"), ()))

    def test_IPv4MappedIsIPv4(self):
        """
        A client on a dual-stack socket is judged by its IPv4 address.
        """
        self.assertTrue(permitted("::ffff:10.0.0.1", nets("10.0.0.0/8"), ()))
        self.assertFalse(permitted("::ffff:10.0.0.1", (), nets("10.0.0.0/8")))

    def test_notAnAddress(self):
        self.assertFalse(permitted("/tmp/sock", nets("0.0.0.0/0"), ()))
        self.assertTrue(permitted("/tmp/sock", (), nets("0.0.0.0/0")))


class ConnectionCounterTests(SynchronousTestCase):
    def test_limitsAndRelease(self):
        counter = ConnectionCounter()
        self.assertIsNone(counter.tryOpen("a", 3, 2))
        self.assertIsNone(counter.tryOpen("a", 3, 2))
        self.assertEqual(counter.tryOpen("a", 3, 2), REFUSED_CLIENT_LIMIT)
        self.assertIsNone(counter.tryOpen("b", 3, 2))
        self.assertEqual(counter.tryOpen("c", 3, 2), REFUSED_APP_LIMIT)
        self.assertEqual(counter.refusals, {REFUSED_CLIENT_LIMIT: 1, REFUSED_APP_LIMIT: 1})
        for host in "aab":
            counter.close(host)
        self.assertEqual((counter.total, dict(counter.perClient)), (0, {}))
        self.assertIsNone(counter.tryOpen("c", 3, 2))

    def test_noLimits(self):
        counter = ConnectionCounter()
        for _ in range(100):
            self.assertIsNone(counter.tryOpen("a", None, None))
        self.assertEqual(counter.total, 100)


class FakePort:
    reading = True

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True


class AcceptGateTests(SynchronousTestCase):
    def test_stopsAndResumesEveryPort(self):
        events = captureEvents(self, "tcpproxy.limits")
        ports = [FakePort(), FakePort()]
        clock = Clock()
        gate = AcceptGate(2, lambda: ports, clock)
        gate.connectionOpened()
        self.assertEqual([p.reading for p in ports], [True, True])
        gate.connectionOpened()
        self.assertEqual([p.reading for p in ports], [False, False])
        late = FakePort()
        gate.portAdded(late)
        self.assertFalse(late.reading)
        ports.append(late)
        gate.connectionClosed()
        self.assertEqual([p.reading for p in ports], [True, True, True])
        self.assertEqual(gate.count, 1)
        clock.advance(AcceptGate.SETTLE)
        self.assertEqual([text(e) for e in events], [
            "MaxConnections 2 reached: not accepting new clients until a connection ends",
            "below MaxConnections 2 again (1 open): accepting new clients",
        ])

    def test_raisedMaximumResumes(self):
        ports = [FakePort()]
        gate = AcceptGate(1, lambda: ports, Clock())
        gate.connectionOpened()
        self.assertFalse(ports[0].reading)
        gate.setMaximum(None)
        self.assertTrue(ports[0].reading)

    def test_episodeAtTheLimitLoggedOnce(self):
        """
        At the limit, every connection that ends lets one more in and closes
        the gate again: one line when the limit is reached, one once the
        gate has stayed open for a while, with the count in between.
        """
        events = captureEvents(self, "tcpproxy.limits")
        ports = [FakePort()]
        clock = Clock()
        gate = AcceptGate(3, lambda: ports, clock)
        for _ in range(3):
            gate.connectionOpened()
        for _ in range(50):
            gate.connectionClosed()
            clock.advance(0.001)
            gate.connectionOpened()
        self.assertFalse(ports[0].reading)
        self.assertEqual(len(events), 1)
        gate.connectionClosed()
        clock.advance(AcceptGate.SETTLE)
        self.assertTrue(ports[0].reading)
        self.assertEqual(
            text(events[-1]),
            "below MaxConnections 3 again (2 open): accepting new clients"
            " (the limit was reached 50 more time(s) meanwhile)",
        )
        self.assertEqual(len(events), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_descriptorBudget(self):
        """
        The descriptor limit caps the gate when it allows fewer connections
        than C{MaxConnections}, and the log says which limit it was.
        """
        events = captureEvents(self, "tcpproxy.limits")
        self.assertEqual(descriptorBudget(48, 12, margin=4), 16)
        self.assertEqual(descriptorBudget(20, 30), 1)
        ports = [FakePort()]
        gate = AcceptGate(100, lambda: ports, Clock())
        gate.setBudget(2)
        self.assertEqual(gate.maximum, 2)
        gate.connectionOpened()
        gate.connectionOpened()
        self.assertFalse(ports[0].reading)
        self.assertIn("the descriptor limit's 2 connections reached", text(events[0]))
        gate.setMaximum(1)
        self.assertEqual(gate.maximum, 1)
        gate.setBudget(None)
        gate.setMaximum(None)
        self.assertIsNone(gate.maximum)
        self.assertTrue(ports[0].reading)

    def test_heldDescriptorsCounted(self):
        """
        Descriptors held outside clients' connections (a warm pool's, one
        each) count against the descriptor budget: the gate closes once one
        more client's two descriptors would not fit, and says why; a holder
        is told there is no room when taking one more would leave none for
        a client.  They do not count against C{MaxConnections}, which is
        about clients.
        """
        events = captureEvents(self, "tcpproxy.limits")
        ports = [FakePort()]
        gate = AcceptGate(None, lambda: ports, Clock())
        gate.setBudget(3)  # 6 descriptors
        gate.connectionOpened()  # 2 used
        for _ in range(2):
            self.assertTrue(gate.roomToHold())
            gate.holdDescriptor()  # 3, then 4 used: room for one client
        self.assertFalse(gate.roomToHold())
        self.assertTrue(ports[0].reading)
        gate.holdDescriptor()  # 5 used: no client fits
        self.assertFalse(ports[0].reading)
        self.assertEqual(
            text(events[0]),
            "the descriptor limit's 3 connections (3 descriptor(s) held by warm pools) reached:"
            " not accepting new clients until a connection ends",
        )
        gate.releaseDescriptor()
        self.assertTrue(ports[0].reading)
        gate.connectionOpened()  # 2 clients, 2 held: 6 used
        self.assertFalse(ports[0].reading)
        gate.releaseDescriptor()
        gate.releaseDescriptor()
        self.assertTrue(ports[0].reading)  # 2 clients, 4 used
        self.assertFalse(gate.roomToHold())  # 5 would leave no room for a third client

        clients = AcceptGate(1, lambda: ports, Clock())
        for _ in range(10):
            self.assertTrue(clients.roomToHold())
            clients.holdDescriptor()
        self.assertTrue(ports[0].reading)
        clients.connectionOpened()
        self.assertFalse(ports[0].reading)


class TokenBucketTests(SynchronousTestCase):
    def test_arithmetic(self):
        clock = Clock()
        bucket = TokenBucket(1000, clock, capacity=100)
        self.assertEqual(bucket.take(100), 0)
        # 300 bytes of debt at 1000 B/s: 0.3 s.
        self.assertAlmostEqual(bucket.take(300), 0.3)
        clock.advance(0.3)
        self.assertEqual(bucket.take(0), 0)
        # Refill is capped at the capacity.
        clock.advance(10)
        self.assertEqual(bucket.take(100), 0)
        self.assertAlmostEqual(bucket.take(1), 0.001)

    def test_defaultCapacity(self):
        self.assertEqual(TokenBucket(20000, Clock()).capacity, 1000)

    def test_averageRate(self):
        """
        Whatever the chunk sizes, taking whenever the bucket is out of debt
        averages the rate.
        """
        clock = Clock()
        bucket = TokenBucket(10000, clock)
        sent = 0
        while clock.seconds() < 10:
            sent += 65536
            clock.advance(bucket.take(65536))
        rate = sent / clock.seconds()
        self.assertTrue(9000 < rate < 11000, rate)


class FakeProducer:
    def __init__(self):
        self.paused = False
        self.calls = []

    def pauseProducing(self):
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self):
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


class ThrottleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.producer = FakeProducer()
        self.throttle = Throttle(self.producer, TokenBucket(1000, self.clock, capacity=100))

    def test_bucketPausesAndResumes(self):
        self.throttle.consumed(600)
        self.assertTrue(self.producer.paused)
        self.assertEqual(self.throttle.reasons, {BUCKET})
        self.clock.advance(0.49)
        self.assertTrue(self.producer.paused)
        self.clock.advance(0.01)
        self.assertFalse(self.producer.paused)

    def test_backpressureOutlastsBucket(self):
        """
        A side paused for both reasons stays paused until both are over.
        """
        self.throttle.consumed(600)
        self.throttle.pauseProducing()
        self.clock.advance(1)
        self.assertTrue(self.producer.paused)
        self.assertEqual(self.throttle.reasons, {BACKPRESSURE})
        self.throttle.resumeProducing()
        self.assertFalse(self.producer.paused)
        self.assertEqual(self.producer.calls, ["pause", "resume"])

    def test_bucketOutlastsBackpressure(self):
        self.throttle.pauseProducing()
        self.throttle.consumed(600)
        self.throttle.resumeProducing()
        self.assertTrue(self.producer.paused)
        self.clock.advance(0.5)
        self.assertFalse(self.producer.paused)
        self.assertEqual(self.producer.calls, ["pause", "resume"])

    def test_stopCancelsTimer(self):
        self.throttle.consumed(600)
        self.throttle.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.throttle.resumeProducing()
        self.assertEqual(self.producer.calls, ["pause"])

    def test_readSize(self):
        """
        A transport read through a throttle reads about the bucket's
        capacity at once (not less than MIN_READ), so a chunk already read
        is never a burst much above the bucket's.
        """
        self.producer.bufferSize = 65536
        Throttle(self.producer, TokenBucket(200_000, self.clock))
        self.assertEqual(self.producer.bufferSize, 10_000)
        Throttle(self.producer, TokenBucket(1000, self.clock))
        self.assertEqual(self.producer.bufferSize, MIN_READ)

    def test_readSizeOfReader(self):
        """
        Given the transport that reads from the socket (the TCP one under a
        TLS producer, which has no read size of its own), a throttle caps
        that one's reads.
        """
        reader = FakeProducer()
        reader.bufferSize = 65536
        Throttle(self.producer, TokenBucket(200_000, self.clock), reader=reader)
        self.assertEqual(reader.bufferSize, 10_000)

    def test_stopProducing(self):
        self.throttle.stopProducing()
        self.assertEqual(self.producer.calls, ["stop"])


class RaiseFileLimitTests(SynchronousTestCase):
    def test_raisesSoftToHard(self):
        events = captureEvents(self, "tcpproxy")
        calls = []
        soft = raiseFileLimit(Logger("tcpproxy.test"), lambda r: (1024, 4096), lambda r, v: calls.append(v))
        self.assertEqual((soft, calls), (4096, [(4096, 4096)]))
        self.assertEqual(
            events[0]["log_format"].format(**events[0]), "open file limit raised from 1024 to 4096"
        )

    def test_cannotRaise(self):
        events = captureEvents(self, "tcpproxy")

        def refuse(r, v):
            raise ValueError("not allowed")

        soft = raiseFileLimit(Logger("tcpproxy.test"), lambda r: (1024, 4096), refuse)
        self.assertEqual(soft, 1024)
        self.assertIn("stays at 1024", events[0]["log_format"].format(**events[0]))

    def test_real(self):
        soft = raiseFileLimit(Logger("tcpproxy.test"))
        self.assertEqual(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


class _Watched:
    """
    A relay as the sweeper sees it.
    """

    idleSeen = 0
    idleSince = None

    def __init__(self, timeout, log, clock):
        self.idleTimeout = timeout
        self.count = 0
        self.log = log
        self.clock = clock

    def activity(self):
        return self.count

    def idleTimedOut(self):
        self.log.append((self, self.clock.seconds()))


class IdleSweeperTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.items = []
        self.idle = []
        self.sweeper = IdleSweeper(self.clock, lambda: self.items)

    def add(self, timeout):
        item = _Watched(timeout, self.idle, self.clock)
        self.items.append(item)
        self.sweeper.watch(item)
        return item

    def test_interface(self):
        self.assertTrue(IIdleWatched.implementedBy(ProxyServerProtocol))

    def test_firesAfterTimeout(self):
        item = self.add(8)
        self.clock.pump([2] * 3)
        self.assertEqual(self.idle, [])
        self.clock.advance(2)
        self.assertEqual(self.idle, [(item, 8)])

    def test_activityPostpones(self):
        item = self.add(8)
        self.clock.pump([1] * 5)
        item.count += 1
        self.clock.pump([1] * 12)
        # The change was seen at the sweep at 6; quiet from then, idle at 6 + 8.
        self.assertEqual(self.idle, [(item, 14)])

    def test_calledAgainIfStillThere(self):
        """
        A pair still there one timeout after it was found idle (it could not
        flush) is reported again, so that it can be aborted.
        """
        item = self.add(8)
        self.clock.pump([2] * 8)
        self.assertEqual(self.idle, [(item, 8), (item, 16)])

    def test_oneTimerForAll(self):
        """
        However many pairs are watched, there is one timer, at the shortest
        timeout's pace; each pair goes idle after its own timeout.
        """
        slow = self.add(40)
        fast = self.add(8)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.pump([2] * 20)
        self.assertEqual(
            [("fast" if i is fast else "slow", t) for i, t in self.idle],
            [("fast", 8), ("fast", 16), ("fast", 24), ("fast", 32), ("slow", 40), ("fast", 40)],
        )
        self.assertIsNot(slow, fast)

    def test_noTimerLeft(self):
        """
        Once nothing is watched the sweeper leaves no timer behind; stop()
        cancels the one pending.
        """
        self.add(8)
        self.items.clear()
        self.clock.advance(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.add(8)
        self.sweeper.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
