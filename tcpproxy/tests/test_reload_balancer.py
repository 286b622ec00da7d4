"""
Tests for L{tcpproxy.balancer.RoundRobin.withTargets}: the rotation goes on
across a reload for the targets that stay.
"""

import time

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tcpproxy.balancer import IBalancer, RoundRobin
from tcpproxy.config import parseTarget

A, B, C, D = (parseTarget(f"127.0.0.1:{n}") for n in (1, 2, 3, 4))


def firsts(balancer, count):
    """
    The first choice of C{count} clients in a row.
    """
    return [balancer.order()[0] for _ in range(count)]


class WithTargetsTests(SynchronousTestCase):
    def test_interface(self):
        verifyObject(IBalancer, RoundRobin([A]).withTargets([B]))

    def test_nextStaysNext(self):
        """
        The target that was due next is still next when it stays, even if
        others are added or removed around it.
        """
        balancer = RoundRobin([A, B, C])
        self.assertEqual(firsts(balancer, 1), [A])
        following = balancer.withTargets([D, B, C])
        self.assertEqual(firsts(following, 4), [B, C, D, B])

    def test_nextRemoved(self):
        """
        When the target due next is removed, the next one after it (in the
        old order) that stays takes its turn.
        """
        balancer = RoundRobin([A, B, C])
        firsts(balancer, 1)
        self.assertEqual(firsts(balancer.withTargets([A, C, D]), 3), [C, D, A])

    def test_wrapsAround(self):
        balancer = RoundRobin([A, B, C])
        firsts(balancer, 2)
        self.assertEqual(firsts(balancer.withTargets([A, B]), 2), [A, B])

    def test_nothingInCommon(self):
        balancer = RoundRobin([A, B])
        firsts(balancer, 1)
        self.assertEqual(firsts(balancer.withTargets([C, D]), 3), [C, D, C])

    def test_oldUntouched(self):
        """
        The old balancer is left as it was: it is not shared with the new one.
        """
        balancer = RoundRobin([A, B])
        following = balancer.withTargets([A, B])
        firsts(following, 1)
        self.assertEqual(firsts(balancer, 1), [A])

    def test_noTargets(self):
        """
        No target left (targets from DNS all gone): nothing to try, and the
        rotation starts at the top of the next list.
        """
        empty = RoundRobin([A, B]).withTargets([])
        self.assertEqual(empty.order(), [])
        self.assertEqual(firsts(empty.withTargets([B, A]), 2), [B, A])

    def test_linearTime(self):
        """
        A reload that replaces every one of thousands of targets carries the
        rotation over in linear time (it compared every pair, seconds long
        while the proxy relayed nothing).
        """
        old = [parseTarget(f"10.0.{i // 256}.{i % 256}:80") for i in range(20_000)]
        new = [parseTarget(f"10.1.{i // 256}.{i % 256}:80") for i in range(20_000)]
        started = time.monotonic()
        following = RoundRobin(old).withTargets(new)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(following.order()[0], new[0])
