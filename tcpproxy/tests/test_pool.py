"""
Tests for L{tcpproxy.pool}: the warm pool, on a fake dialer and a clock.
"""

from __future__ import annotations

import dataclasses

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcpproxy.app import buildApp, updateApp
from tcpproxy.balancer import Load
from tcpproxy.config import ConfigError, PoolConfig, parseConfig, parseTarget
from tcpproxy.dialer import Dialled, IDialer
from tcpproxy.health import DOWN, UP
from tcpproxy.limits import AcceptGate
from tcpproxy.metrics import AppStats
from tcpproxy.pool import REFILL_INTERVAL, PooledClientProtocol, WarmPool, stopPool
from tcpproxy.relay import PREDIAL_BUFFER
from tcpproxy.tls import loadAppTLS

A = parseTarget("127.0.0.1:7001")
B = parseTarget("127.0.0.1:7002")
C = parseTarget("127.0.0.1:7003")


def peeksAs(case, protocol: PooledClientProtocol, answer: bool | None) -> None:
    """
    Make C{protocol}'s liveness check (L{PooledClientProtocol.alive}) give
    C{answer}, for the rest of the test C{case}: the class is patched, for
    that one instance (a relay side has no instance dictionary).
    """
    original = PooledClientProtocol.alive

    def alive(self: PooledClientProtocol) -> bool | None:
        return answer if self is protocol else original(self)

    case.patch(PooledClientProtocol, "alive", alive)


@implementer(IDialer)
class FakeDialer:
    """
    Records each dial; the test fires it with L{answer} or L{refuse}.
    """

    def __init__(self) -> None:
        self.dials: list[tuple[object, list, Deferred]] = []

    def dial(self, protocolFactory, targets):
        d: Deferred = Deferred()
        self.dials.append((protocolFactory, list(targets), d))
        return d

    def pending(self, target=None) -> list:
        return [dial for dial in self.dials if not dial[2].called and (target is None or dial[1] == [target])]

    def answer(self, dial) -> PooledClientProtocol:
        factory, targets, d = dial
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        d.callback(Dialled(targets[0], protocol))
        return protocol

    def answerAll(self) -> list[PooledClientProtocol]:
        return [self.answer(dial) for dial in self.pending()]

    def answerPool(self) -> list[PooledClientProtocol]:
        """
        Connect the pool's own dials (not the clients').
        """
        return [self.answer(dial) for dial in self.pending() if hasattr(dial[0], "pool")]


class FakeHealth:
    def __init__(self) -> None:
        self.states: dict = {}

    def stateOf(self, target) -> str:
        return self.states.get(target, UP)


class WarmPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dialer = FakeDialer()
        self.health = FakeHealth()
        self.pool = WarmPool(self.dialer, PoolConfig(2, 30.0), (A, B), self.clock, self.health)
        self.addCleanup(self.pool.stop)

    def filled(self) -> list[PooledClientProtocol]:
        self.clock.advance(0)
        return self.dialer.answerAll()

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IDialer, self.pool))

    def test_fillsSizePerTarget(self) -> None:
        """
        Once the reactor runs, C{Size} connections are dialled to each
        target, each through the app's dialer for that target alone.
        """
        self.assertEqual(self.dialer.dials, [])
        self.clock.advance(0)
        self.assertEqual([targets for _, targets, _ in self.dialer.dials], [[A], [A], [B], [B]])
        self.dialer.answerAll()
        self.assertEqual(self.pool.idleCount(), 4)
        # A later look dials nothing more: the pool is full.
        self.clock.advance(REFILL_INTERVAL)
        self.assertEqual(self.dialer.pending(), [])

    def test_handsOutWithoutDialAndRefills(self) -> None:
        """
        A client's dial takes a pooled connection of the first target of
        its order at once, without dialling; one is dialled in its place.
        """
        pooled = self.filled()
        d = self.pool.dial(object(), [B, A])
        dialled = self.successResultOf(d)
        self.assertEqual(dialled.target, B)
        self.assertIn(dialled.protocol, pooled)
        self.assertEqual(self.dialer.pending(), [self.dialer.dials[-1]])
        self.assertEqual(self.dialer.dials[-1][1], [B])
        self.assertEqual(self.pool.handedOut, 1)

    def test_emptyPoolDialsTheClientsOrder(self) -> None:
        """
        With no idle connection, the client's dial is the app dialer's,
        with the client's factory and the whole order.
        """
        self.clock.advance(0)
        factory = object()
        d = self.pool.dial(factory, [B, A])
        self.assertNoResult(d)
        self.assertEqual(self.dialer.dials[-1][:2], (factory, [B, A]))

    def test_greetingDeliveredFirst(self) -> None:
        """
        What the target sent on an idle connection is handed over with it,
        exactly, and counted as received from the target.
        """
        pooled = self.filled()
        pooled[0].dataReceived(b"220 mail ")
        pooled[0].dataReceived(b"ready\r\n")
        dialled = self.successResultOf(self.pool.dial(object(), [A]))
        self.assertIs(dialled.protocol, pooled[0])
        self.assertEqual(dialled.early, b"220 mail ready\r\n")
        self.assertEqual(dialled.protocol.received, 16)

    def test_greetingBounded(self) -> None:
        """
        An idle connection whose target sends more than a dial would hold
        is paused, and resumed when a client takes it.
        """
        pooled = self.filled()
        pooled[0].dataReceived(b"x" * PREDIAL_BUFFER)
        self.assertEqual(pooled[0].transport.producerState, "paused")
        dialled = self.successResultOf(self.pool.dial(object(), [A]))
        self.assertEqual(len(dialled.early), PREDIAL_BUFFER)
        self.assertEqual(dialled.protocol.transport.producerState, "producing")

    def test_closedByTargetNeverHandedOut(self) -> None:
        """
        An idle connection the target closed (or reset) is dropped from the
        pool and replaced; a client gets a live one.
        """
        first, second, *_ = self.filled()
        # Closed after a while idle (a target's own idle timeout): replaced
        # at once (see test_closedAtOnceReplacedAtNextLook for the other case).
        self.clock.advance(REFILL_INTERVAL)
        first.readConnectionLost()
        self.assertTrue(first.transport.disconnecting)
        first.connectionLost(Failure(ConnectionDone()))
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.dialer.pending(A)), 2)
        self.assertEqual(self.pool.idleCount(), 2)
        # A has none left: the client dials, in its order, as without a pool.
        factory = object()
        self.assertNoResult(self.pool.dial(factory, [A, B]))
        self.assertEqual(self.dialer.dials[-1][:2], (factory, [A, B]))

    def test_closedAtOnceReplacedAtNextLook(self) -> None:
        """
        A target that closes (or resets) each pooled connection as soon as
        it is opened does not make the pool redial it in a loop: one closed
        less than L{REFILL_INTERVAL} after it was pooled is replaced at the
        next look, as a failed dial is.
        """
        self.clock.advance(0)
        for _round in range(3):
            for protocol in self.dialer.answerAll():
                if protocol.target == A:
                    protocol.readConnectionLost()
                    protocol.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(self.dialer.pending(A), [])
            self.assertEqual(len(self.pool.idle[A]), 0)
            self.clock.advance(REFILL_INTERVAL)
            self.assertEqual(len(self.dialer.pending(A)), 2)
        self.assertEqual(len([dial for dial in self.dialer.dials if dial[1] == [A]]), 2 * 4)

    def test_deadOnPeekNeverHandedOut(self) -> None:
        """
        An idle connection found dead as it is taken is aborted, and the
        next one is given.
        """
        first, second, *_ = self.filled()
        peeksAs(self, first, False)
        dialled = self.successResultOf(self.pool.dial(object(), [A]))
        self.assertIs(dialled.protocol, second)
        self.assertTrue(first.transport.disconnecting)

    def test_notKnownYetLeftInPlace(self) -> None:
        """
        An idle connection whose state is not known yet (over TLS, bytes
        wait unread under the TLS layer: the target's close, or data) is
        not handed out, nor closed or replaced: it stays first in line,
        for the TLS layer to read what came.
        """
        first, second, *_ = self.filled()
        peeksAs(self, first, None)
        dialled = self.successResultOf(self.pool.dial(object(), [A]))
        self.assertIs(dialled.protocol, second)
        self.assertFalse(first.transport.disconnecting)
        self.assertEqual(list(self.pool.idle[A]), [first])
        self.assertEqual(len(self.dialer.pending(A)), 1)  # second's replacement only
        # Only it left: the client dials.
        self.assertNoResult(self.pool.dial(object(), [A]))
        self.assertEqual(list(self.pool.idle[A]), [first])

    def test_stopFiresOnceClosed(self) -> None:
        """
        L{WarmPool.stop}'s result fires once every connection it closed
        has ended (over TLS that takes the target's answer).
        """
        first, *others = self.filled()
        stopped = self.pool.stop()
        self.assertNoResult(stopped)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(stopped)
        for protocol in others:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(stopped))

    def test_maxIdleReplaces(self) -> None:
        """
        An idle connection older than C{MaxIdle} is closed, and another is
        dialled in its place.
        """
        pooled = self.filled()
        self.clock.advance(29)
        self.assertFalse(any(p.transport.disconnecting for p in pooled))
        self.clock.advance(1)
        self.assertTrue(all(p.transport.disconnecting for p in pooled))
        self.assertEqual(len(self.dialer.pending()), 4)

    def test_takenConnectionNotExpired(self) -> None:
        """
        A connection given to a client is no longer the pool's to expire.
        """
        self.filled()
        dialled = self.successResultOf(self.pool.dial(object(), [A]))
        self.clock.advance(60)
        self.assertFalse(dialled.protocol.transport.disconnecting)

    def test_onlyFirstOfOrderTaken(self) -> None:
        """
        Only the first target of the client's order is looked at, and the
        order is walked no further than that (it is the dispatcher's walk,
        which counts each target it gives): the balancer's choice stands.
        """
        self.filled()
        taken = []

        def walk():
            for target in (A, B):
                taken.append(target)
                yield target

        self.assertEqual(self.successResultOf(self.pool.dial(object(), walk())).target, A)
        self.assertEqual(taken, [A])

    def test_maxConnectionsRespected(self) -> None:
        """
        The pool opens no more than a target's C{MaxConnections} leaves
        beside the clients' connections.
        """
        limited = dataclasses.replace(C, maxConnections=3)
        load = Load()
        load.opened(limited)
        load.opened(limited)
        pool = WarmPool(self.dialer, PoolConfig(2, 30.0), (limited,), self.clock, None, load)
        self.addCleanup(pool.stop)
        self.clock.advance(0)
        self.assertEqual(len(self.dialer.pending(limited)), 1)
        self.dialer.answerAll()
        load.closed(limited)
        self.clock.advance(REFILL_INTERVAL)
        self.assertEqual(len(self.dialer.pending(limited)), 1)

    def test_backupAndWeightZeroNotPooled(self) -> None:
        """
        A backup target, or one of weight 0, takes no client in the
        rotation: it gets no pooled connection.
        """
        backup = dataclasses.replace(A, backup=True)
        unweighted = dataclasses.replace(B, weight=0)
        pool = WarmPool(self.dialer, PoolConfig(2, 30.0), (backup, unweighted), self.clock)
        self.addCleanup(pool.stop)
        before = len(self.dialer.dials)
        self.clock.advance(0)
        self.assertEqual(len(self.dialer.dials) - before, 4)  # The setUp pool's, none of these.
        self.assertEqual([t for _, t, _ in self.dialer.dials[before:]], [[A], [A], [B], [B]])
        self.assertEqual(pool.idleCount(), 0)

    def test_downTargetNotPooled(self) -> None:
        """
        A target that is down (or drained) gets no pooled connection.
        """
        self.health.states[B] = DOWN
        self.clock.advance(0)
        self.assertEqual([targets for _, targets, _ in self.dialer.dials], [[A], [A]])
        self.health.states[B] = UP
        self.clock.advance(REFILL_INTERVAL)
        self.assertEqual(len(self.dialer.pending(B)), 2)

    def test_failedDialRetriedLater(self) -> None:
        """
        A pooled dial that fails is tried again at the next look.
        """
        self.clock.advance(0)
        for _, _targets, d in self.dialer.pending(A):
            d.errback(ConnectionRefusedError())
        self.assertEqual(self.dialer.pending(A), [])
        self.clock.advance(REFILL_INTERVAL)
        self.assertEqual(len(self.dialer.pending(A)), 2)

    def test_stopClosesIdleAndCancelsDials(self) -> None:
        """
        Stopping closes the idle connections, cancels the dials under way,
        and opens no more.
        """
        self.clock.advance(0)
        first = self.dialer.answer(self.dialer.pending()[0])
        waiting = self.dialer.pending()
        self.pool.stop()
        self.assertTrue(first.transport.disconnecting)
        self.assertTrue(all(d.called for _, _, d in waiting))
        self.clock.advance(REFILL_INTERVAL * 5)
        self.assertEqual(self.dialer.pending(), [])


class PoolStatsTests(SynchronousTestCase):
    """
    What the pool tells the app's L{AppStats} (its metrics): each client's
    hit or miss on its first target, and each idle connection given up.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.dialer = FakeDialer()
        self.stats = AppStats((A, B))
        self.pool = WarmPool(self.dialer, PoolConfig(1, 30.0), (A, B), self.clock, stats=self.stats)
        self.addCleanup(self.pool.stop)

    def counts(self, target) -> tuple[int, int, dict]:
        stats = self.stats.targets[target]
        return stats.poolHits, stats.poolMisses, dict(stats.poolDropped)

    def test_hitsAndMisses(self) -> None:
        """
        A client given a pooled connection is a hit for its first target;
        one for whom that target is dialled, a miss (whatever the other
        targets' pools hold); targets tried after the first are neither.
        """
        self.clock.advance(0)
        self.assertNoResult(self.pool.dial(object(), [A, B]))  # Nothing idle yet.
        self.dialer.answerPool()
        self.successResultOf(self.pool.dial(object(), [A, B]))
        self.successResultOf(self.pool.dial(object(), [B, A]))
        self.assertNoResult(self.pool.dial(object(), [A, B]))  # A's refill not connected yet.
        self.assertEqual(self.counts(A), (1, 2, {}))
        self.assertEqual(self.counts(B), (1, 0, {}))

    def test_unpooledTargetNoMiss(self) -> None:
        """
        A client whose first target the pool does not serve (down, here)
        is no miss: the pool had nothing to offer it.
        """
        health = FakeHealth()
        health.states[A] = DOWN
        pool = WarmPool(self.dialer, PoolConfig(1, 30.0), (A,), self.clock, health, stats=self.stats)
        self.addCleanup(pool.stop)
        self.assertNoResult(pool.dial(object(), [A]))
        self.assertEqual(self.counts(A), (0, 0, {}))

    def test_dropped(self) -> None:
        """
        Idle connections the target closed, found dead when taken, or
        expired after C{MaxIdle} are counted by reason; those closed by
        the pool's own stop are not.
        """
        self.clock.advance(0)
        first, _ = self.dialer.answerPool()
        self.clock.advance(REFILL_INTERVAL)  # idle a while: replaced at once
        first.connectionLost(Failure(ConnectionDone()))
        [refill] = self.dialer.answerPool()
        peeksAs(self, refill, False)
        self.assertNoResult(self.pool.dial(object(), [A]))
        self.assertEqual(self.counts(A), (0, 1, {"closed": 2}))
        self.dialer.answerPool()
        self.clock.advance(30)
        self.assertEqual(self.counts(A), (0, 1, {"closed": 2, "expired": 1}))
        self.assertEqual(self.counts(B), (0, 0, {"expired": 1}))
        self.dialer.answerPool()
        self.pool.stop()
        self.assertEqual(self.counts(A), (0, 1, {"closed": 2, "expired": 1}))


class PoolDescriptorTests(SynchronousTestCase):
    """
    Each pooled connection holds a descriptor, from its dial until it is
    closed or handed to a client: the proxy's L{AcceptGate} counts it
    against the descriptor budget, and the pool dials only while the gate
    has room to spare beside the clients'.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.dialer = FakeDialer()
        self.gate = AcceptGate(None, lambda: [], self.clock)

    def pool(self, size: int = 2) -> WarmPool:
        pool = WarmPool(self.dialer, PoolConfig(size, 30.0), (A, B), self.clock, gate=self.gate)
        self.addCleanup(pool.stop)
        return pool

    def test_heldUntilClosedOrHandedOut(self) -> None:
        """
        Dials under way and idle connections hold a descriptor each; a
        failed dial, a connection handed to a client (the client's
        connection counts it from then on) or closed gives it back.
        """
        pool = self.pool()
        self.clock.advance(0)
        self.assertEqual(self.gate.heldDescriptors, 4)
        self.dialer.pending(A)[0][2].errback(ConnectionRefusedError())
        self.assertEqual(self.gate.heldDescriptors, 3)
        a1, b1, b2 = self.dialer.answerPool()
        self.assertEqual(self.gate.heldDescriptors, 3)
        self.assertIs(self.successResultOf(pool.dial(object(), [B])).protocol, b1)
        self.assertEqual(self.gate.heldDescriptors, 3)  # b1 is the client's; B's refill is dialled
        self.clock.advance(REFILL_INTERVAL)  # A's next look dials one (its failed dial)
        a1.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gate.heldDescriptors, 4)  # a1 closed; two dials to refill A
        pool.stop()
        self.assertEqual(self.gate.heldDescriptors, 1)  # b2, closing
        self.assertTrue(b2.transport.disconnecting)
        b2.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gate.heldDescriptors, 0)
        # The client's connection is the client's to count.
        b1.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gate.heldDescriptors, 0)

    def test_neverTakesTheLastClientsPlace(self) -> None:
        """
        Under a descriptor budget, the pool opens no more than leaves room
        for one more client; it fills the rest once clients leave.
        """
        self.gate.setBudget(3)  # 6 descriptors
        self.gate.connectionOpened()  # a client: 2
        pool = self.pool()
        self.clock.advance(0)
        self.assertEqual(len(self.dialer.pending()), 2)  # 4 used: a client still fits, not 2
        self.dialer.answerPool()
        self.assertEqual(pool.idleCount(), 2)
        self.clock.advance(REFILL_INTERVAL)
        self.assertEqual(self.dialer.pending(), [])
        self.assertFalse(self.gate.paused)
        self.gate.connectionClosed()
        self.clock.advance(REFILL_INTERVAL)
        self.assertEqual(len(self.dialer.pending(B)), 2)  # 4 held: room for a client still
        self.assertEqual(self.gate.heldDescriptors, 4)
        self.assertFalse(self.gate.paused)


def walk(load: Load, targets):
    """
    A client's walk along C{targets}, as the dispatcher's: each target
    given is counted in C{load} first (and out when the next is asked for).
    """
    held = None
    for target in targets:
        if held is not None:
            load.closed(held)
        load.opened(target)
        held = target
        yield target


class PoolLimitTests(SynchronousTestCase):
    """
    A target's C{MaxConnections} counts the clients' connections, the
    pool's idle ones and the pool's dials under way together: a client
    that comes while the pool dials never takes the target past it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.dialer = FakeDialer()
        self.load = Load()
        self.limited = dataclasses.replace(C, maxConnections=2)
        self.pool = WarmPool(self.dialer, PoolConfig(2, 30.0), (self.limited, A), self.clock, None, self.load)
        self.addCleanup(self.pool.stop)

    def total(self, target) -> int:
        """
        The target's connections from the proxy: clients', idle, dialled.
        """
        poolDials = [dial for dial in self.dialer.pending(target) if hasattr(dial[0], "pool")]
        return self.load.active(target) + len(self.pool.idle[target]) + len(poolDials)

    def test_clientDuringPoolDials(self) -> None:
        """
        The pool dials its two connections; a client comes before they are
        connected: one of the pool's dials is cancelled before the client's
        is made, so that the target never has three.
        """
        limited = self.limited
        self.clock.advance(0)
        self.assertEqual(self.total(limited), 2)
        poolDials = self.dialer.pending(limited)
        factory = Factory.forProtocol(Protocol)
        d = self.pool.dial(factory, walk(self.load, [limited]))
        self.assertNoResult(d)
        # The client's dial is the real dialer's, which takes the target:
        clientDial = self.dialer.dials[-1]
        self.assertIs(clientDial[0], factory)
        self.assertEqual(clientDial[1], [limited])
        self.assertEqual([dial[2].called for dial in poolDials].count(True), 1)
        self.assertEqual(self.total(limited), 2)
        # The pool's other dial connects, the client's too: two in all, and
        # no refill while the target is at its limit.
        self.dialer.answerPool()
        self.dialer.answer(clientDial)
        self.assertEqual((self.load.active(limited), self.pool.idleCount()), (1, 3))
        self.clock.advance(REFILL_INTERVAL)
        self.assertEqual(self.dialer.pending(limited), [])

    def test_secondClientTakesTheIdleOne(self) -> None:
        """
        At the limit, a client takes the pool's idle connection (the count
        stays the same): the pool's connections are the clients' to take.
        """
        limited = self.limited
        self.clock.advance(0)
        self.dialer.answerPool()
        for _ in range(2):
            self.successResultOf(self.pool.dial(object(), walk(self.load, [limited])))
            self.assertEqual(self.total(limited), 2)
        self.assertEqual(self.pool.handedOut, 2)

    def test_failoverTargetClosesAnIdleOne(self) -> None:
        """
        A client whose first target failed goes on to a limited target
        whose pool is full: an idle connection of its pool is closed
        first, so that the client's dial keeps the target within its limit.
        """
        limited = self.limited
        self.clock.advance(0)
        self.dialer.answerPool()
        self.load.opened(limited)
        self.load.opened(limited)  # two clients of another balancer's count, say
        self.pool._makeRoom(limited)
        self.assertEqual(self.pool.idleCount(), 2)  # A's two; the limited target's closed
        self.assertEqual(self.total(limited), 2)


def document(app=None, **top):
    base = {"Name": "web", "Ports": [5001], "Targets": ["127.0.0.1:6001"]}
    return {**top, "Apps": [{**base, **(app or {})}]}


class PoolConfigTests(SynchronousTestCase):
    """
    The C{"Pool"} key: what it turns into, and each refusal in one line
    naming the file, the app, the key and the value.
    """

    def refused(self, doc) -> str:
        message = str(self.assertRaises(ConfigError, parseConfig, doc, "c.json"))
        self.assertNotIn("\n", message)
        return message

    def test_absent(self) -> None:
        self.assertIsNone(parseConfig(document()).apps[0].pool)

    def test_accepted(self) -> None:
        self.assertEqual(parseConfig(document({"Pool": {"Size": 4}})).apps[0].pool, PoolConfig(4, 30.0))
        self.assertEqual(
            parseConfig(document({"Pool": {"Size": 1, "MaxIdle": 2.5}})).apps[0].pool, PoolConfig(1, 2.5)
        )
        # From "Defaults" too.
        self.assertEqual(
            parseConfig(document(Defaults={"Pool": {"Size": 2}})).apps[0].pool, PoolConfig(2, 30.0)
        )

    def test_refusals(self) -> None:
        for app, expected in (
            ({"Pool": 4}, 'c.json: app "web": key "Pool": 4 is not an object like {"Size": 4, "MaxIdle"'),
            ({"Pool": {}}, 'c.json: app "web": key "Pool.Size": missing required key'),
            ({"Pool": {"Size": 0}}, 'key "Pool.Size": 0 is not a whole number of 1 or more'),
            ({"Pool": {"Size": 5000}}, 'key "Pool.Size": 5000 is more than 1000 idle connections per target'),
            ({"Pool": {"Size": 1, "MaxIdle": 0}}, 'key "Pool.MaxIdle": 0 must be greater than 0 seconds'),
            ({"Pool": {"Size": 1, "Max": 3}}, 'key "Pool.Max": unknown key (did you mean "MaxIdle"?)'),
            (
                {"Pool": {"Size": 2}, "SendProxy": "v2"},
                'c.json: app "web": key "Pool": cannot be used with SendProxy: the PROXY header names',
            ),
            (
                {"Pool": {"Size": 2}, "Targets": [{"Address": "127.0.0.1:6001", "SendProxy": "v1"}]},
                'key "Pool": cannot be used with SendProxy',
            ),
        ):
            self.assertIn(expected, self.refused(document(app)))

    def test_sendProxyRefusalNamesWhereThePoolIs(self) -> None:
        """
        A pool and C{SendProxy} given together in C{"Defaults"} are refused
        there; a C{SendProxy} in an app given a pool by C{"Defaults"} is
        refused naming the app's C{SendProxy} and where the pool comes from,
        with the way to keep both elsewhere ({"Pool": null} in that app).
        It named the app's "Pool", which the app did not have.
        """
        pool = {"Size": 2}
        self.assertIn(
            'c.json: "Defaults": key "Pool": cannot be used with SendProxy: the PROXY header names',
            self.refused(document(Defaults={"Pool": pool, "SendProxy": "v1"})),
        )
        for app, key in (
            ({"SendProxy": "v2"}, "SendProxy"),
            ({"Targets": [{"Address": "127.0.0.1:6001", "SendProxy": "v1"}]}, "Targets"),
        ):
            message = self.refused(document(app, Defaults={"Pool": pool}))
            self.assertTrue(
                message.startswith(
                    f'c.json: app "web": key "{key}": SendProxy cannot be used with the "Pool" of "Defaults":'
                    " the PROXY header names"
                ),
                message,
            )
            self.assertTrue(message.endswith('give this app "Pool": null, or remove one of the two'), message)
        # As the message says.
        self.assertIsNone(
            parseConfig(document({"SendProxy": "v2", "Pool": None}, Defaults={"Pool": pool})).apps[0].pool
        )


class _MemoryEngine:
    """
    An engine whose reactor connects nothing (L{MemoryReactorClock}).
    """

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()


class PoolAppTests(SynchronousTestCase):
    """
    The pool in an app's runtime (L{tcpproxy.app.buildApp}, L{updateApp}):
    made for an app with C{"Pool"}, kept by a reload that changes nothing of
    it, replaced (the old one stopped) by one that does.
    """

    def setUp(self) -> None:
        self.engine = _MemoryEngine()
        self.clock = self.engine.reactor

    def app(self, **overrides):
        doc = document({"Pool": {"Size": 1}, **overrides})
        return parseConfig(doc).apps[0]

    def build(self, app, gate=None):
        factory = buildApp(app, loadAppTLS(app, "<config>"), self.engine, self.clock, gate)
        self.addCleanup(stopPool, factory.dialer)
        return factory

    def update(self, factory, app) -> None:
        updateApp(factory, app, loadAppTLS(app, "<config>"), self.engine)
        self.addCleanup(stopPool, factory.dialer)

    def test_built(self) -> None:
        """
        An app with a C{"Pool"} dials through one, which starts filling
        at once; an app without has none.
        """
        factory = self.build(self.app())
        self.assertIsInstance(factory.dialer, WarmPool)
        self.clock.advance(0)
        self.assertEqual([(host, port) for host, port, *_ in self.clock.tcpClients], [("127.0.0.1", 6001)])
        self.assertNotIsInstance(self.build(self.app(Pool=None)).dialer, WarmPool)

    def test_clientDuringPoolDials(self) -> None:
        """
        The app's own dispatcher, dialer and pool, on a reactor that
        connects nothing: a client that comes while the pool's two dials to
        a target of C{MaxConnections} 2 are under way is dialled once one
        of the pool's is stopped, so that no more than two are ever open or
        under way; the proxy's accept gate counts the pool's descriptors.
        """
        gate = AcceptGate(None, lambda: [], self.clock)
        factory = self.build(
            self.app(Pool={"Size": 2}, Targets=[{"Address": "127.0.0.1:6001", "MaxConnections": 2}]), gate
        )
        self.clock.advance(0)
        self.assertEqual(len(self.clock.connectors), 2)
        self.assertEqual(gate.heldDescriptors, 2)
        d = factory.dispatcher.dispatch(factory.clientFactory, "127.0.0.1")
        self.assertEqual(len(self.clock.connectors), 3)
        self.assertEqual(len([c for c in self.clock.connectors if not c.stoppedConnecting]), 2)
        self.assertEqual(gate.heldDescriptors, 1)
        d.cancel()
        self.failureResultOf(d)

    def test_reloadKeeps(self) -> None:
        """
        A reload that changes nothing the pool depends on keeps it, with
        its connections.
        """
        factory = self.build(self.app())
        pool = factory.dialer
        self.update(factory, self.app(IdleTimeout=5))
        self.assertIs(factory.dialer, pool)

    def test_reloadReplaces(self) -> None:
        """
        A reload that changes the pool, the targets (their limits too) or
        how they are dialled stops the old pool and makes a new one; one
        that removes the pool stops it.
        """
        factory = self.build(self.app())
        for app in (
            self.app(Pool={"Size": 2}),
            self.app(Targets=["127.0.0.1:6002"]),
            self.app(Targets=[{"Address": "127.0.0.1:6002", "MaxConnections": 5}]),
            self.app(Targets=[{"Address": "127.0.0.1:6002", "MaxConnections": 5}], ConnectTimeout=2),
        ):
            old = factory.dialer
            self.update(factory, app)
            self.assertIsInstance(factory.dialer, WarmPool)
            self.assertIsNot(factory.dialer, old)
            self.assertEqual(factory.dialer.config, app.pool)
            self.assertTrue(old._stopped)
        old = factory.dialer
        self.update(factory, self.app(Pool=None))
        self.assertNotIsInstance(factory.dialer, WarmPool)
        self.assertTrue(old._stopped)
