"""
Many deadlines, one timer: the connect deadlines of every dial under way.

A L{twisted.internet.base.DelayedCall} per dial, made and then cancelled as
the target answers within a millisecond (as nearly all do), is a good part
of what a short connection costs when many are dialled at once (a heap push
and pop, and about 1 KiB while it lives).  L{Deadlines} keeps one timer for
all of them.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Interface


class IExpiring(Interface):
    """
    Something L{Deadlines} can time out.
    """

    def timedOut() -> None:
        """
        The timeout it was added with has passed, and it was not removed.
        """


class Deadlines:
    """
    Calls C{timedOut()} (L{IExpiring}) on each item added with a timeout
    that has not been removed within it, with one timer for all.

    Items added with the same timeout expire in the order they were added,
    so each timeout keeps its items in that order and only the oldest is
    looked at; the one timer is set for the earliest of those, and when it
    finds that item gone it is set for the next one.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queues: dict[float, OrderedDict[object, float]] = {}
        self._call: IDelayedCall | None = None
        self._when = 0.0

    def __len__(self) -> int:
        return sum(map(len, self._queues.values()))

    def add(self, item, timeout: float) -> None:
        deadline = self._clock.seconds() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = OrderedDict()
        queue[item] = deadline
        if self._call is None or deadline < self._when:
            self._schedule(deadline)

    def remove(self, item, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is not None:
            queue.pop(item, None)
            if not queue:
                del self._queues[timeout]
                if not self._queues and self._call is not None:
                    # Nothing left to time out: no timer left behind.
                    self._call.cancel()
                    self._call = None

    def _schedule(self, when: float) -> None:
        if self._call is not None:
            self._call.cancel()
        self._when = when
        self._call = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._expire)

    def _expire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        expired = []
        earliest = None
        for timeout, queue in list(self._queues.items()):
            while queue:
                item, deadline = next(iter(queue.items()))
                if deadline > now:
                    earliest = deadline if earliest is None else min(earliest, deadline)
                    break
                del queue[item]
                expired.append(item)
            if not queue:
                del self._queues[timeout]
        if earliest is not None:
            self._schedule(earliest)
        for item in expired:
            item.timedOut()

