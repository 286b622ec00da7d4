"""
Tests for the balancing policies of L{tcpproxy.balancer}: weights, backup
targets, least connections, power of two choices, source hashing, slow
start, and what a reload carries over.  Statistical claims are checked
with a seeded source of randomness and the bounds issue 15 gives.
"""

import dataclasses
import random
from collections import Counter

from twisted.internet.testing import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tcpproxy.balancer import (
    POLICIES,
    IBalancer,
    LeastConnections,
    Load,
    PowerOfTwo,
    RoundRobin,
    SourceHash,
    balancerFor,
)
from tcpproxy.config import parseConfig, parseTarget
from tcpproxy.health import HealthTracker


def target(port, **settings):
    return dataclasses.replace(parseTarget(f"127.0.0.1:{port}"), **settings)


A, B, C, D, E = (target(p) for p in (7001, 7002, 7003, 7004, 7005))


def make(policy, targets, health=None, clock=None, slowStart=0.0, seed=15):
    return POLICIES[policy](targets, health, clock, slowStart, rng=random.Random(seed))


def clients(count):
    """
    C{count} distinct client addresses.
    """
    return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(count)]


class EveryPolicyTests(SynchronousTestCase):
    """
    What every policy does.
    """

    def test_interface(self):
        for policy in POLICIES:
            verifyObject(IBalancer, make(policy, [A, B]))

    def test_eachTargetOnce(self):
        """
        Every order names each candidate once: the failover walks them all,
        none twice (issue 15, section 6).
        """
        for policy in POLICIES:
            balancer = make(policy, [A, B, C, D])
            for source in clients(50):
                order = balancer.order(source)
                self.assertEqual(sorted(order, key=str), [A, B, C, D], policy)

    def test_weights(self):
        """
        Weights 3:1 over 4,000 picks come within 3% of 3,000:1,000 under every
        policy (least-connections and power-of-two with every connection
        still open, the load that weighs with them).
        """
        heavy, light = target(7001, weight=3), target(7002, weight=1)
        for policy in POLICIES:
            balancer = make(policy, [heavy, light])
            picks = Counter()
            for source in clients(4000):
                chosen = balancer.order(source)[0]
                picks[chosen] += 1
                if policy == "least-connections":
                    balancer.load.opened(chosen)
            self.assertApproximates(picks[heavy], 3000, 90, policy)
            self.assertApproximates(picks[light], 1000, 90, policy)

    def test_zeroWeight(self):
        """
        A target of weight 0 gets no client, under any policy, not even as a
        failover: it is drained.
        """
        for policy in POLICIES:
            balancer = make(policy, [A, target(7002, weight=0), C])
            for source in clients(200):
                self.assertNotIn(B, balancer.order(source), policy)

    def test_backupLast(self):
        """
        A backup target is the last failover while the others are usable.
        """
        backup = target(7009, backup=True)
        for policy in POLICIES:
            balancer = make(policy, [A, backup, B])
            for source in clients(100):
                self.assertEqual(balancer.order(source)[-1], backup, policy)

    def test_backupWhenNoOtherUsable(self):
        """
        Backups get clients only when no other target is usable, and share
        them by the policy then.
        """
        clock = Clock()
        backups = [target(7008, backup=True), target(7009, backup=True)]
        for policy in POLICIES:
            health = HealthTracker("web", [A, B, *backups], clock)
            balancer = make(policy, [A, B, *backups], health)
            health.connectFailed(A, "connection refused")
            self.assertEqual(balancer.order("10.0.0.1"), [B, *backups], policy)
            health.connectFailed(B, "connection refused")
            firsts = Counter(balancer.order(source)[0] for source in clients(400))
            self.assertEqual(set(firsts), set(backups), policy)
            self.assertGreater(min(firsts.values()), 100, policy)

    def test_failOpen(self):
        """
        With no target usable, backups included, every target with a weight
        is tried, as the health module's fail-open says.
        """
        clock = Clock()
        backup = target(7009, backup=True)
        for policy in POLICIES:
            health = HealthTracker("web", [A, B, backup], clock)
            for t in (A, B, backup):
                health.connectFailed(t, "connection refused")
            self.assertEqual(set(make(policy, [A, B, backup], health).order("10.0.0.1")), {A, B, backup})

    def assertApproximates(self, value, expected, tolerance, message):
        self.assertTrue(
            abs(value - expected) <= tolerance, f"{message}: {value} is not {expected}±{tolerance}"
        )


class RoundRobinWeightTests(SynchronousTestCase):
    def test_smooth(self):
        """
        Weights are honoured exactly, and spread out (nginx's smooth
        weighted round-robin): 5:1:1 gives a a b a c a a.
        """
        a, b, c = target(7001, weight=5), target(7002), target(7003)
        balancer = RoundRobin([a, b, c])
        self.assertEqual([balancer.order()[0] for _ in range(7)], [a, a, b, a, c, a, a])

    def test_failoverAfterChoice(self):
        """
        The failover order is the list from the choice on, wrapping.
        """
        a, b, c = target(7001, weight=2), target(7002), target(7003)
        balancer = RoundRobin([a, b, c])
        self.assertEqual(balancer.order(), [a, b, c])
        self.assertEqual(balancer.order(), [b, c, a])


class LeastConnectionsTests(SynchronousTestCase):
    def test_fewest(self):
        """
        The target with the fewest active connections is first.
        """
        balancer = LeastConnections([A, B, C])
        for _ in range(3):
            balancer.load.opened(A)
        balancer.load.opened(C)
        self.assertEqual(balancer.order()[0], B)
        balancer.load.opened(B)
        balancer.load.opened(B)
        self.assertEqual(balancer.order()[0], C)

    def test_tiesByRotation(self):
        """
        Targets with as many connections take turns.
        """
        balancer = LeastConnections([A, B, C])
        self.assertEqual([balancer.order()[0] for _ in range(4)], [A, B, C, A])
        balancer.load.opened(B)
        self.assertEqual([balancer.order()[0] for _ in range(4)], [C, A, C, A])

    def test_closed(self):
        """
        A connection that ends counts out.
        """
        balancer = LeastConnections([A, B])
        balancer.load.opened(A)
        balancer.load.opened(B)
        balancer.load.opened(B)
        balancer.load.closed(B)
        balancer.load.closed(B)
        self.assertEqual([balancer.order()[0] for _ in range(2)], [B, B])
        self.assertEqual(balancer.load.counts, {A: 1})

    def test_spreadsLongConnections(self):
        """
        Clients that stay on one target and leave fast on the other even
        out the open connections, where round-robin piles them up.
        """
        balancer = LeastConnections([A, B])
        for _ in range(100):
            chosen = balancer.order()[0]
            balancer.load.opened(chosen)
            if chosen == B:
                balancer.load.closed(chosen)
        self.assertLessEqual(balancer.load.active(A), 2)


class PowerOfTwoTests(SynchronousTestCase):
    def test_lessLoaded(self):
        """
        Of the two drawn, the one with fewer connections is chosen: the most
        loaded of three is never first.
        """
        balancer = PowerOfTwo([A, B, C], rng=random.Random(1))
        for _ in range(5):
            balancer.load.opened(C)
        balancer.load.opened(B)
        firsts = Counter(balancer.order()[0] for _ in range(3000))
        self.assertNotIn(C, firsts)
        # A wins whenever drawn (2 pairs of 3), B only against C (1 of 3).
        self.assertTrue(1900 <= firsts[A] <= 2100, firsts)

    def test_candidatesDistinct(self):
        balancer = PowerOfTwo([A, B], rng=random.Random(2))
        balancer.load.opened(A)
        self.assertEqual({balancer.order()[0] for _ in range(200)}, {B})


class SourceHashTests(SynchronousTestCase):
    def test_sameClientSameTarget(self):
        balancer = SourceHash([A, B, C])
        for source in clients(100):
            self.assertEqual(len({balancer.order(source)[0] for _ in range(3)}), 1)

    def test_stableAcrossProcesses(self):
        """
        The choice depends on nothing but the address and the targets (not
        on Python's per-process hash seed): these were computed once.
        """
        balancer = SourceHash([A, B, C])
        self.assertEqual(
            [balancer.order(source)[0].port for source in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "::1")],
            [7001, 7001, 7003, 7001],
        )

    def test_even(self):
        """
        1,000 clients over 4 targets: each gets a quarter within 5%.
        """
        balancer = SourceHash([A, B, C, D])
        firsts = Counter(balancer.order(source)[0] for source in clients(1000))
        for t in (A, B, C, D):
            self.assertTrue(200 <= firsts[t] <= 300, firsts)

    def test_targetLeaves(self):
        """
        When one of N targets leaves the configuration, only its clients
        move, no more than 1/N + 2% of 1,000.
        """
        targets = [A, B, C, D, E]
        before = SourceHash(targets)
        after = before.withTargets([A, B, D, E])
        moved = [s for s in clients(1000) if before.order(s)[0] != after.order(s)[0]]
        self.assertTrue(all(before.order(s)[0] == C for s in moved))
        self.assertLessEqual(len(moved), 1000 * (1 / 5 + 0.02))
        self.assertGreater(len(moved), 0)

    def test_targetFails(self):
        """
        When a target is down its clients go to their second choice, and
        come back when it is up; nobody else moves.
        """
        clock = Clock()
        health = HealthTracker("web", [A, B, C], clock)
        balancer = SourceHash([A, B, C], health)
        sources = clients(600)
        before = {s: balancer.order(s) for s in sources}
        health.checkFailed(B, "x")
        health.checkFailed(B, "x")
        health.checkFailed(B, "x")
        during = {s: balancer.order(s)[0] for s in sources}
        for s in sources:
            expected = before[s][1] if before[s][0] == B else before[s][0]
            self.assertEqual(during[s], expected)
        health.checkSucceeded(B)
        health.checkSucceeded(B)
        self.assertEqual({s: balancer.order(s) for s in sources}, before)

    def test_rankingsRemembered(self):
        """
        A client's ranking is made once and remembered (for at most
        L{SourceHash.RANKED} clients); each call gets a list of its own, and
        the same ranking as a balancer that never saw the client.
        """
        balancer = SourceHash([A, B, C])
        first = balancer.order("10.0.0.7")
        first.clear()
        self.assertEqual(balancer.order("10.0.0.7"), SourceHash([A, B, C]).order("10.0.0.7"))
        for source in clients(2 * SourceHash.RANKED + 10):
            balancer.order(source)
        self.assertLessEqual(len(balancer._ranked), SourceHash.RANKED)
        fresh = SourceHash([A, B, C])
        self.assertEqual(
            [balancer.order(s) for s in clients(50)],
            [fresh.order(s) for s in clients(50)],
        )

    def test_weights(self):
        heavy = target(7001, weight=3)
        balancer = SourceHash([heavy, B])
        firsts = Counter(balancer.order(s)[0] for s in clients(4000))
        self.assertTrue(2910 <= firsts[heavy] <= 3090, firsts)


class NearMixin:
    def assertNear(self, value, expected, delta, msg=""):
        self.assertTrue(abs(value - expected) <= delta, f"{msg}: {value} is not {expected}±{delta}")


class SlowStartTests(NearMixin, SynchronousTestCase):
    """
    A target that comes back up is ramped from 10% to 100% of its weight.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.health = HealthTracker("web", [A, B], self.clock, rise=1, fall=1)

    def shareOfB(self, policy, picks=2000):
        balancer = make(policy, [A, B], self.health, self.clock, slowStart=60)
        return Counter(balancer.order(s)[0] for s in clients(picks))[B] / picks

    def test_notAtStartUp(self):
        for policy in ("round-robin", "random", "source-hash"):
            self.assertNear(self.shareOfB(policy), 0.5, delta=0.03, msg=policy)

    def test_ramp(self):
        """
        Just back, B weighs 10% of A (1/11 of the clients); half-way, 55%
        (11/31); after the whole ramp, as much as A.
        """
        self.health.checkFailed(B, "x")
        self.health.checkSucceeded(B)
        for policy in ("round-robin", "random", "source-hash"):
            self.assertNear(self.shareOfB(policy), 1 / 11, delta=0.03, msg=policy)
        self.clock.advance(30)
        for policy in ("round-robin", "random", "source-hash"):
            self.assertNear(self.shareOfB(policy), 0.55 / 1.55, delta=0.03, msg=policy)
        self.clock.advance(30)
        for policy in ("round-robin", "random", "source-hash"):
            self.assertNear(self.shareOfB(policy), 0.5, delta=0.03, msg=policy)
        self.assertEqual(self.health.recoveredAt, {})

    def test_passiveRecovery(self):
        """
        A target brought back by a client's connect ramps as well.
        """
        self.health.connectFailed(B, "connection refused")
        self.clock.advance(5)
        self.health.connectSucceeded(B)
        self.assertNear(self.shareOfB("round-robin"), 1 / 11, delta=0.03)

    def test_leastConnections(self):
        """
        Least-connections weighs connections by the ramped weight: B just
        back holds a tenth of what A holds.
        """
        self.health.checkFailed(B, "x")
        self.health.checkSucceeded(B)
        balancer = make("least-connections", [A, B], self.health, self.clock, slowStart=60)
        for _ in range(1100):
            balancer.load.opened(balancer.order()[0])
        self.assertNear(balancer.load.active(B), 100, delta=2)


class ReloadTests(SynchronousTestCase):
    """
    What a reload (L{balancerFor} with the running balancer) carries over.
    """

    def app(self, targets, **settings):
        document = {"Apps": [{"Name": "web", "Ports": [1], "Targets": targets, **settings}]}
        return parseConfig(document).apps[0]

    def test_countsCarryOver(self):
        """
        The active connections of targets that stay are still counted, and a
        target that leaves is counted out as its connections end.
        """
        app = self.app(["127.0.0.1:7001", "127.0.0.1:7002"], Balance="least-connections")
        first = balancerFor(app, None, Clock())
        first.load.opened(A)
        first.load.opened(B)
        first.load.opened(B)
        following = balancerFor(
            self.app([{"Address": "127.0.0.1:7002", "Weight": 2}, "127.0.0.1:7003"], Balance="round-robin"),
            None,
            Clock(),
            first,
        )
        self.assertIsInstance(following, RoundRobin)
        self.assertIs(following.load, first.load)
        self.assertEqual(following.load.active(B), 2)
        following.load.closed(A)
        self.assertEqual(following.load.counts, {B: 2})

    def test_rotationCarriesOver(self):
        """
        The rotation goes on where it was, across a change of policy too.
        """
        app = self.app(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
        balancer = balancerFor(app, None, Clock())
        self.assertEqual(balancer.order()[0], A)
        following = balancerFor(
            dataclasses.replace(app, balance="least-connections"), None, Clock(), balancer
        )
        self.assertEqual([following.order()[0] for _ in range(3)], [B, C, A])

    def test_newWeights(self):
        """
        New weights apply to new clients.
        """
        app = self.app(["127.0.0.1:7001", "127.0.0.1:7002"])
        balancer = balancerFor(app, None, Clock())
        heavier = self.app([{"Address": "127.0.0.1:7001", "Weight": 3}, "127.0.0.1:7002"])
        following = balancerFor(heavier, None, Clock(), balancer)
        firsts = Counter(following.order()[0] for _ in range(400))
        self.assertEqual(firsts, {A: 300, B: 100})


class LoadTests(SynchronousTestCase):
    def test_counts(self):
        load = Load()
        load.opened(A)
        load.opened(A)
        load.closed(A)
        self.assertEqual(load.active(A), 1)
        load.closed(A)
        self.assertEqual(load.counts, {})
        load.closed(B)
        self.assertEqual(load.counts, {})


class RoundRobinHealthTests(SynchronousTestCase):
    def test_downAndBackups(self):
        """
        With a target down and failing open, the rotation's order holds for
        the others, and backups come last.
        """
        clock = Clock()
        backup = target(7009, backup=True)
        health = HealthTracker("web", [A, B, C, backup], clock)
        balancer = RoundRobin([A, B, C, backup], health)
        balancer.order()
        balancer.order()
        health.connectFailed(B, "x")
        self.assertEqual(balancer.order(), [C, A, backup])
        for t in (A, C, backup):
            health.connectFailed(t, "x")
        self.assertEqual(balancer.order(), [A, B, C, backup])
