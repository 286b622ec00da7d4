"""
Closing relays nobody uses: a coarse idle timer that costs nothing per
chunk relayed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

STEPS = 4
"""
Checks per timeout period: a pair is closed after between C{timeout} and
C{timeout * (1 + 1 / STEPS)} seconds without a byte.
"""


class IdleWatch:
    """
    Calls C{onIdle} once C{activity()} has not changed for C{timeout} seconds.

    Why not L{twisted.protocols.policies.TimeoutMixin}: its C{resetTimeout}
    on every chunk is a L{DelayedCall} reset (a clock read and a heap
    update) on the relay's hot path, in both directions.  Here the relay
    only counts bytes, as it does anyway, and a timer looks at the count a
    few times per period: the per-chunk cost is nil, at the price of
    closing up to a quarter-period late.

    If the pair is still open one more period after C{onIdle} (it could not
    flush), C{onIdle} is called again, so the owner can abort it then.

    @param activity: returns a number that changes whenever a byte moves
        either way (the sum of both sides' byte counts).
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        activity: Callable[[], int],
        onIdle: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._period = timeout / STEPS
        self._activity = activity
        self._onIdle = onIdle
        self._last = activity()
        self._quiet = 0
        self._call: IDelayedCall | None = clock.callLater(self._period, self._check)

    def _check(self) -> None:
        self._call = None
        seen = self._activity()
        if seen != self._last:
            self._last = seen
            self._quiet = 0
        else:
            self._quiet += 1
        if self._quiet >= STEPS:
            self._quiet = 0
            self._onIdle()
        if self._call is None and self._activity is not None:
            self._call = self._clock.callLater(self._period, self._check)

    def stop(self) -> None:
        self._activity = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
