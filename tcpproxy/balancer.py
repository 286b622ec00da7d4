"""
Which target a new connection should try first, and which after that.

A balancer knows nothing of sockets: it orders an app's targets for one
client.  The dialer walks that order, so failover is simply "the next one",
whatever the policy.  The policies (an app's C{"Balance"}), after HAProxy's
C{balance} (U{https://docs.haproxy.org/2.8/configuration.html#4.2-balance})
and nginx's upstream module:

  - L{RoundRobin} (C{"round-robin"}, the default): each client one target
    further along; with weights, nginx's smooth weighted round-robin.
  - L{LeastConnections} (C{"least-connections"}): the target with the
    fewest active connections for its weight; ties go by rotation.
  - L{PowerOfTwo} (C{"power-of-two"}): two distinct targets drawn at random
    by weight, then the one with fewer active connections (Mitzenmacher's
    "power of two choices", Envoy's least-request).
  - L{SourceHash} (C{"source-hash"}): the client's address ranks the
    targets by weighted rendezvous hashing (Thaler and Ravishankar's
    highest random weight), so a client keeps its target while that
    target is usable, and when one target leaves only its clients move.
  - L{Random} (C{"random"}): one target drawn at random by weight.

Every policy ranks the same candidates: the targets not marked
C{"Backup"}, with a weight above 0, that the app's health says are usable.
The usable backups follow them as the last failovers; they come first only
when no other target is usable.  When none at all is usable, every target
with a weight is tried (fail open, as L{tcpproxy.health} explains).

A target's weight is ramped after it comes back up (C{"SlowStart"}): from
10% to 100% linearly over the app's C{SlowStart} seconds (HAProxy's
C{slowstart}), so that a target that was down is not flooded at once.

The active connections per target (a L{Load}, one per app, kept across
reloads) are the one count the policies, the per-target C{MaxConnections}
(L{tcpproxy.dispatch}) and the metrics read.

Choosing costs O(n) for n targets at most, with no sorting for any policy
but C{source-hash}'s failover order: the same as the round-robin this
proxy always had, which built the whole failover list for each client.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from hashlib import blake2b

from zope.interface import Attribute, Interface, implementer

from tcpproxy.config import AppConfig, Target


class Load:
    """
    The connections open (or being dialled) to each of an app's targets.

    One count per target, shared by every balancer the app has across
    reloads: a target that stays keeps its count, and a target that left
    keeps one while connections to it are open, so that they are counted
    out right (and back in, if it returns).
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[Target, int] = {}

    def opened(self, target: Target) -> None:
        """
        A connection to C{target} is being dialled (it counts from then on,
        so that a burst of clients does not all pick the same idle target).
        """
        counts = self.counts
        counts[target] = counts.get(target, 0) + 1

    def closed(self, target: Target) -> None:
        """
        A connection counted by L{opened} failed to connect, or ended.
        """
        counts = self.counts
        left = counts.get(target, 0) - 1
        if left > 0:
            counts[target] = left
        else:
            counts.pop(target, None)

    def active(self, target: Target) -> int:
        return self.counts.get(target, 0)


class IBalancer(Interface):
    """
    Chooses the order in which one client's connection tries the targets.
    """

    load = Attribute("The app's L{Load}: active connections per target.")
    limited = Attribute("Whether any target has a C{MaxConnections}.")

    def order(source: str = "") -> list[Target]:
        """
        The targets to try for one new client, first choice first.

        Each target appears at most once, so a client never dials the same
        target twice.

        @param source: the client's IP address (the one a PROXY protocol
            header gave, where one did): what C{source-hash} hashes.
        """

    def withTargets(targets: Sequence[Target]) -> IBalancer:
        """
        A balancer for a new list of targets (a configuration reload) that
        carries over this one's state for the targets in both lists.
        """


_MASK = (1 << 64) - 1


def _stableHash(text: str) -> int:
    """
    A 64-bit hash of C{text} that is the same in every process (Python's
    C{hash} of a string is not), so that a client keeps its target across
    restarts of the proxy, and on every proxy of a fleet.
    """
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _mix(x: int) -> int:
    """
    SplitMix64's finaliser: a cheap 64-bit mix, so that one hash of the
    client and one seed per target give independent scores per target.
    """
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@implementer(IBalancer)
class _Balancer:
    """
    What the policies have in common: the candidates, the weights (ramped
    by slow start), the rotation, and carrying state over a reload.

    @ivar health: a L{tcpproxy.health.HealthTracker}, or C{None}.
    @ivar load: the app's L{Load}.
    @ivar slowStart: seconds of weight ramp after a target comes back up.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        health=None,
        clock=None,
        slowStart: float = 0.0,
        load: Load | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """
        @param health: the targets it says are down are skipped (all are
            tried if all are).
        @param clock: an L{IReactorTime}, read only for slow start.
        @param rng: the source of randomness (a seeded one in tests).
        """
        # No target at all is an app whose targets come from DNS and are
        # not found (yet, or any more): its clients are refused with
        # "no target" (tcpproxy.discovery).
        self._targets = tuple(targets)
        self._primaries = tuple(t for t in self._targets if not t.backup)
        self._backups = tuple(t for t in self._targets if t.backup)
        self._weighted = any(t.weight != 1 for t in self._targets)
        # The primaries that may get clients when every target is healthy.
        self._live = [t for t in self._primaries if t.weight]
        self._place = {t: i for i, t in enumerate(self._primaries)}
        self.limited = any(t.maxConnections is not None for t in self._targets)
        self._next = 0
        self.health = health
        self.clock = clock
        self.slowStart = slowStart
        self.load = load if load is not None else Load()
        self.rng = rng if rng is not None else random.Random()

    def order(self, source: str = "") -> list[Target]:
        health = self.health
        if health is None or health.allUsable:
            live = self._live
            if not live:
                # Every primary has weight 0: the backups, if any.
                return self._withWeight(self._backups)
            if self._backups:
                return self._rank(live, source) + self._withWeight(self._backups)
            return self._rank(live, source)
        primaries = self._withWeight(health.usable(self._primaries, failOpen=False))
        backups = self._withWeight(health.usable(self._backups, failOpen=False))
        if primaries:
            return self._rank(primaries, source) + backups
        if backups:
            return self._rank(backups, source)
        # Fail open: nothing is usable, try every target but drained ones.
        everyOne = self._withWeight(health.usable(self._targets))
        return self._rank(everyOne, source) if everyOne else everyOne

    @staticmethod
    def _withWeight(targets: Sequence[Target]) -> list[Target]:
        return [t for t in targets if t.weight]

    def _rank(self, candidates: list[Target], source: str) -> list[Target]:
        """
        C{candidates} (none with weight 0) in the order the policy tries them.
        """
        raise NotImplementedError()

    def _weights(self, candidates: Sequence[Target]) -> list[float] | None:
        """
        The effective weight of each of C{candidates}, ramped by slow start;
        C{None} when they are all alike (every policy is then unweighted).
        """
        ramped = None
        if self.slowStart and self.health is not None and self.health.recoveredAt:
            recovered = self.health.recoveredAt
            now = self.clock.seconds()
            for target, since in list(recovered.items()):
                if now - since >= self.slowStart:
                    # Ramped up: nothing to look at for it from now on.
                    del recovered[target]
            for index, target in enumerate(candidates):
                since = recovered.get(target)
                if since is not None:
                    if ramped is None:
                        ramped = [float(t.weight) for t in candidates]
                    ramped[index] = target.weight * (0.1 + 0.9 * (now - since) / self.slowStart)
        if ramped is not None:
            return ramped
        if self._weighted:
            return [float(t.weight) for t in candidates]
        return None

    def _rotated(self, candidates: list[Target], first: int) -> list[Target]:
        """
        C{candidates} from index C{first} on, wrapping: the failover order
        after a first choice.
        """
        return candidates[first:] + candidates[:first]

    def withTargets(self, targets: Sequence[Target]) -> _Balancer:
        """
        Go on with the rotation over a new list: the next client goes to the
        target that would have been next, or, if that one is gone, to the
        first one after it (in the old order) that stays.  With no target in
        common the rotation starts again at the top of the new list.  The
        counts of active connections go on (one L{Load}).
        """
        return self.following(type(self), targets, self.slowStart)

    def following(self, kind: type[_Balancer], targets: Sequence[Target], slowStart: float) -> _Balancer:
        """
        A balancer of policy C{kind} over C{targets} that goes on from this
        one: same health, clock, randomness and L{Load}, the rotation as
        L{withTargets} says, and the smooth round-robin's state for the
        targets that stay.
        """
        following = kind(targets, self.health, self.clock, slowStart, self.load, self.rng)
        old = self._primaries or self._targets
        new = following._primaries
        # Index by target, so that a reload of a long list takes linear time.
        position = {target: index for index, target in enumerate(new)}
        for step in range(len(old)):
            index = position.get(old[(self._next + step) % len(old)])
            if index is not None:
                following._next = index
                break
        current = getattr(self, "_current", None)
        if current and isinstance(following, RoundRobin):
            following._current = {t: v for t, v in current.items() if t in position}
        return following


class RoundRobin(_Balancer):
    """
    Start each client one target further along the app's list.

    One instance serves every port of an app, so the rotation is per app: a
    client on port 5001 and the next on port 5200 go to consecutive targets.
    The rest of the list, in order, is the failover sequence.

    With weights (or a target in slow start), nginx's smooth weighted
    round-robin: each pick adds every candidate's weight to its credit and
    takes the one with the most, which then pays the total back.  Over
    any run of picks each target gets its share within one pick, spread
    out (5:1:1 gives a a b a c a a, not a a a a a b c).
    """

    def __init__(self, *args, **kwargs) -> None:
        _Balancer.__init__(self, *args, **kwargs)
        self._current: dict[Target, float] = {}

    def _rank(self, candidates: list[Target], source: str) -> list[Target]:
        weights = self._weights(candidates)
        if weights is None:
            # Unweighted: the rotation goes over the whole list, the
            # candidates in that order (what this proxy always did).
            n = len(self._primaries)
            start = self._next % n
            self._next = (start + 1) % n
            if candidates is self._live and len(candidates) == n:
                return self._rotated(candidates, start)
            if candidates[0].backup:
                # Only backups: they take turns among themselves.
                return self._rotated(candidates, start % len(candidates))
            # Some are out: the others in the rotation's order, backups
            # (when failing open) last.
            place = self._place
            return sorted(candidates, key=lambda t: (place[t] - start) % n if t in place else n)
        current = self._current
        total = 0.0
        best = -1
        bestCredit = -math.inf
        for index, target in enumerate(candidates):
            weight = weights[index]
            credit = current.get(target, 0.0) + weight
            current[target] = credit
            total += weight
            if credit > bestCredit:
                best, bestCredit = index, credit
        current[candidates[best]] = bestCredit - total
        return self._rotated(candidates, best)


class LeastConnections(_Balancer):
    """
    The target with the fewest active connections for its weight (HAProxy's
    C{leastconn}, nginx's C{least_conn}): good when connections last long
    or unevenly, so that a count of open ones says more than a turn does.
    Ties go by rotation, so that idle targets share new clients in turn.
    """

    def _rank(self, candidates: list[Target], source: str) -> list[Target]:
        counts = self.load.counts
        weights = self._weights(candidates)
        n = len(candidates)
        start = self._next % n
        best = start
        if weights is None:
            fewest = counts.get(candidates[start], 0)
            for step in range(1, n):
                if not fewest:
                    break
                index = (start + step) % n
                count = counts.get(candidates[index], 0)
                if count < fewest:
                    best, fewest = index, count
        else:
            fewest = counts.get(candidates[start], 0) / weights[start]
            for step in range(1, n):
                index = (start + step) % n
                ratio = counts.get(candidates[index], 0) / weights[index]
                if ratio < fewest:
                    best, fewest = index, ratio
        # The turn goes on after the one chosen.
        self._next = best + 1
        return self._rotated(candidates, best)


class _Drawing(_Balancer):
    """
    A policy that draws targets at random, by weight.
    """

    def _draw(self, candidates: list[Target], weights: list[float] | None) -> int:
        """
        The index of one of C{candidates}, each drawn with a chance in
        proportion to its weight: a bisection of the running totals.
        """
        if weights is None:
            return int(self.rng.random() * len(candidates))
        totals = []
        total = 0.0
        for weight in weights:
            total += weight
            totals.append(total)
        return min(bisect_right(totals, self.rng.random() * total), len(candidates) - 1)


class Random(_Drawing):
    """
    One target drawn at random by weight: as even as round-robin on
    average, with no state shared between proxies that balance the same
    targets (several proxies in round-robin may well move in step).
    """

    def _rank(self, candidates: list[Target], source: str) -> list[Target]:
        return self._rotated(candidates, self._draw(candidates, self._weights(candidates)))


class PowerOfTwo(_Drawing):
    """
    Two distinct targets drawn at random by weight, then the one with fewer
    active connections (the first drawn on a tie): nearly as even as
    least-connections, without every proxy of a fleet sending the next
    client to the same least-loaded target (Envoy's C{LEAST_REQUEST},
    nginx's C{random two least_conn}).
    """

    def _rank(self, candidates: list[Target], source: str) -> list[Target]:
        n = len(candidates)
        if n == 1:
            return candidates
        weights = self._weights(candidates)
        first = self._draw(candidates, weights)
        if weights is None:
            second = (first + 1 + int(self.rng.random() * (n - 1))) % n
        else:
            # The second draw is among the others, by their weights.
            others = weights[:]
            others[first] = 0.0
            if not any(others):
                others = [0.0 if i == first else 1.0 for i in range(n)]
            second = self._draw(candidates, others)
        counts = self.load.counts
        if counts.get(candidates[second], 0) < counts.get(candidates[first], 0):
            first, second = second, first
        rest = [t for i, t in enumerate(candidates) if i != first and i != second]
        return [candidates[first], candidates[second], *rest]


class SourceHash(_Balancer):
    """
    The client's address picks the target: weighted rendezvous hashing.
    Each target scores C{-weight / ln(u)}, where u in (0, 1) is a hash of
    the client's address and the target; the highest score wins, and the
    others, best first, are the failover order.

    A client keeps its target while that target is usable; when a target
    leaves (or is down, or drained) only its clients move, each to its
    second choice, and they come back when it does.  For protocols that
    keep state per client on the target (sessions, caches), with no way to
    route by anything above layer 4.  The hash is of the address only
    (not the port), the same in every process.
    """

    RANKED = 4096
    """
    Rankings remembered (by client address and candidates) at most: the
    same clients come back, and a ranking costs a few microseconds to make
    (a hash and a score per target) where a look-up costs a fraction.
    """

    def __init__(self, *args, **kwargs) -> None:
        _Balancer.__init__(self, *args, **kwargs)
        self._seeds = {t: _stableHash(str(t)) for t in self._targets}
        self._ranked: dict[tuple, list[Target]] = {}

    def _rank(self, candidates: list[Target], source: str) -> list[Target]:
        if len(candidates) == 1:
            return candidates
        weights = self._weights(candidates)
        if weights is None:
            # Unweighted (or all alike): the ranking depends on nothing else.
            memo = (source, *candidates)
            ranked = self._ranked.get(memo)
            if ranked is None:
                if len(self._ranked) >= self.RANKED:
                    self._ranked.clear()
                key = _stableHash(source)
                seeds = self._seeds
                scores = [_mix(key ^ seeds[t]) for t in candidates]
                order = sorted(range(len(candidates)), key=scores.__getitem__, reverse=True)
                ranked = self._ranked[memo] = [candidates[i] for i in order]
            return list(ranked)
        # Weighted, and ramped by slow start as time goes: made each time.
        key = _stableHash(source)
        seeds = self._seeds
        scores = [
            -weights[i] / math.log((_mix(key ^ seeds[t]) + 0.5) / 18446744073709551616.0)
            for i, t in enumerate(candidates)
        ]
        ranked = sorted(range(len(candidates)), key=scores.__getitem__, reverse=True)
        return [candidates[i] for i in ranked]


POLICIES: dict[str, type[_Balancer]] = {
    "round-robin": RoundRobin,
    "least-connections": LeastConnections,
    "power-of-two": PowerOfTwo,
    "source-hash": SourceHash,
    "random": Random,
}
"""
The balancer of each C{"Balance"} value (L{tcpproxy.config.BALANCE_POLICIES}).
"""


def balancerFor(app: AppConfig, health, clock, previous: _Balancer | None = None) -> _Balancer:
    """
    The balancer of C{app}'s policy over its targets; going on from
    C{previous} (a reload), if given: its L{Load}, rotation and health.
    """
    kind = POLICIES[app.balance]
    if previous is None:
        return kind(app.targets, health, clock, app.slowStart)
    return previous.following(kind, app.targets, app.slowStart)
