"""
Tests for L{tcpproxy.balancer}.
"""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tcpproxy.balancer import IBalancer, RoundRobin
from tcpproxy.config import parseTarget

A, B, C = (parseTarget(t) for t in ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))


class RoundRobinTests(SynchronousTestCase):
    def test_interface(self):
        verifyObject(IBalancer, RoundRobin([A]))

    def test_rotation(self):
        """
        Each client starts one target further along; the rest of the list,
        in order, is its failover sequence.
        """
        balancer = RoundRobin([A, B, C])
        self.assertEqual(
            [balancer.order() for _ in range(4)],
            [[A, B, C], [B, C, A], [C, A, B], [A, B, C]],
        )

    def test_eachTargetOnce(self):
        """
        An order never names a target twice, so a client dials each at most once.
        """
        balancer = RoundRobin([A, B, C])
        for _ in range(5):
            order = balancer.order()
            self.assertEqual(sorted(order, key=str), [A, B, C])

    def test_singleTarget(self):
        balancer = RoundRobin([A])
        self.assertEqual([balancer.order(), balancer.order()], [[A], [A]])

    def test_noTargets(self):
        """
        An app whose targets all come from DNS has none until they are
        found: no target to try (its clients are refused with "no target"),
        and the rotation starts at the top once it has some.
        """
        balancer = RoundRobin([])
        self.assertEqual([balancer.order(), balancer.order()], [[], []])
        following = balancer.withTargets([A, B])
        self.assertEqual([following.order(), following.order()], [[A, B], [B, A]])
