"""
Which target a new connection should try first, and which after that.

A balancer knows nothing of sockets: it orders an app's targets for one
client.  The dialer walks that order, so failover is simply "the next one".
"""

from __future__ import annotations

from collections.abc import Sequence

from zope.interface import Interface, implementer

from tcpproxy.config import Target


class IBalancer(Interface):
    """
    Chooses the order in which one client's connection tries the targets.
    """

    def order() -> list[Target]:
        """
        The targets to try for one new client, first choice first.

        Each target appears at most once, so a client never dials the same
        target twice.
        """

    def withTargets(targets: Sequence[Target]) -> IBalancer:
        """
        A balancer for a new list of targets (a configuration reload) that
        carries over this one's state for the targets in both lists.
        """


@implementer(IBalancer)
class RoundRobin:
    """
    Start each client one target further along the app's list.

    One instance serves every port of an app, so the rotation is per app: a
    client on port 5001 and the next on port 5200 go to consecutive targets.
    The rest of the list, in order, is the failover sequence.
    """

    def __init__(self, targets: Sequence[Target], health=None) -> None:
        """
        @param health: a L{tcpproxy.health.HealthTracker}, or C{None}: the
            targets it says are down are skipped (all are tried if all are).
        """
        if not targets:
            raise ValueError("a balancer needs at least one target")
        self._targets = tuple(targets)
        self._next = 0
        self.health = health

    def order(self) -> list[Target]:
        start = self._next
        self._next = (start + 1) % len(self._targets)
        targets = self._targets
        ordered = [*targets[start:], *targets[:start]]
        if self.health is not None:
            return self.health.usable(ordered)
        return ordered

    def withTargets(self, targets: Sequence[Target]) -> RoundRobin:
        """
        Go on with the rotation over a new list: the next client goes to the
        target that would have been next, or, if that one is gone, to the
        first one after it (in the old order) that stays.  With no target in
        common the rotation starts again at the top of the new list.
        """
        following = RoundRobin(targets, self.health)
        old = self._targets
        # Index by target, so that a reload of a long list takes linear time.
        position = {target: index for index, target in enumerate(following._targets)}
        for step in range(len(old)):
            index = position.get(old[(self._next + step) % len(old)])
            if index is not None:
                following._next = index
                break
        return following
