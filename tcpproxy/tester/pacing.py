"""
When messages are sent: a closed loop, or an open loop on a schedule.

In a closed loop each connection sends its next message when the reply to
the last one is in, so the proxy sets the pace and the figures say how fast
it goes.  In an open loop messages are sent on a schedule whatever the
replies do, so the figures say how the proxy copes with a given load.

The open loop's schedule is the integral of a L{IShape}: each tick works out
how many messages fell due since the previous one and when each did, and
sends them in bursts of C{burst} to the open connections in turn.  A message
keeps the time it fell due as its intended send time, so latency is measured
from the schedule, not from a late tick.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Interface, implementer

from tcpproxy.tester.client import LoadProtocol
from tcpproxy.tester.shapes import IShape

MIN_TICK = 0.001
"""
The open loop wakes no more often than this; faster schedules are sent in
bursts per tick, each message still with its own intended time.
"""

MAX_TICK = 0.05
"""
The open loop wakes at least this often, to notice a rising rate.
"""


class IPacer(Interface):
    """
    Decides when the connections of a run send.
    """

    def start(t0: float) -> None:
        """
        Begin sending; C{t0} is the run's time zero (reactor seconds).
        """

    def connectionReady(connection: LoadProtocol) -> None:
        """
        C{connection} may send from now on.
        """

    def replied(connection: LoadProtocol) -> None:
        """
        A reply on C{connection} is complete.
        """

    def connectionClosed(connection: LoadProtocol) -> None:
        """
        C{connection} can send no more.
        """

    def stop() -> None:
        """
        Send nothing more.
        """

    def targetRate(start: float, end: float) -> float | None:
        """
        The total rate aimed at, on average from C{start} to C{end} seconds
        into the run, or C{None} when the proxy sets the pace.
        """

    def describe() -> str:
        """
        A few words for the report.
        """


@implementer(IPacer)
class ClosedLoop:
    """
    Each connection sends its next message as soon as the last is answered.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._started = False
        self._stopped = False
        self._waiting: list[LoadProtocol] = []

    def start(self, t0: float) -> None:
        self._started = True
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            self._sendNext(connection)

    def connectionReady(self, connection: LoadProtocol) -> None:
        if self._started:
            self._sendNext(connection)
        else:
            self._waiting.append(connection)

    def replied(self, connection: LoadProtocol) -> None:
        if not connection.outstanding:
            self._sendNext(connection)

    def connectionClosed(self, connection: LoadProtocol) -> None:
        if connection in self._waiting:
            self._waiting.remove(connection)

    def _sendNext(self, connection: LoadProtocol) -> None:
        if not self._stopped:
            connection.send(1, self._clock.seconds())

    def stop(self) -> None:
        self._stopped = True

    def targetRate(self, start: float, end: float) -> float | None:
        return None

    def describe(self) -> str:
        return "closed loop (next message when the reply is in)"


@implementer(IPacer)
class OpenLoop:
    """
    Messages on a schedule: C{shape} gives the rate, either in total or, with
    C{perConnection}, for each open connection.

    No message falls due while no connection can take it: the schedule runs
    on the connections there are, and one that cannot be opened is counted
    as an error, not as a backlog.
    """

    def __init__(
        self, clock: IReactorTime, shape: IShape, perConnection: bool = False, burst: int = 1
    ) -> None:
        self._clock = clock
        self.shape = shape
        self.perConnection = perConnection
        self.burst = burst
        self._ready: list[LoadProtocol] = []
        self._next = 0
        self._credit = 0.0
        self._t0: float | None = None
        self._last = 0.0
        self._call: IDelayedCall | None = None
        self._stopped = False

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._last = 0.0
        self._tick()

    def connectionReady(self, connection: LoadProtocol) -> None:
        self._ready.append(connection)

    def replied(self, connection: LoadProtocol) -> None:
        pass

    def connectionClosed(self, connection: LoadProtocol) -> None:
        if connection in self._ready:
            index = self._ready.index(connection)
            del self._ready[index]
            if index < self._next:
                self._next -= 1

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _factor(self) -> int:
        return sum(1 for c in self._ready if c.canSend) if self.perConnection else 1

    def targetRate(self, start: float, end: float) -> float | None:
        if end <= start:
            return self.shape.rate(end) * self._factor()
        return (self.shape.cumulative(end) - self.shape.cumulative(start)) / (end - start) * self._factor()

    def _takers(self) -> bool:
        return any(c.canSend for c in self._ready)

    def _nextTaker(self) -> LoadProtocol | None:
        for _ in range(len(self._ready)):
            self._next %= len(self._ready)
            connection = self._ready[self._next]
            self._next += 1
            if connection.canSend:
                return connection
        return None

    def _tick(self) -> None:
        self._call = None
        if self._stopped:
            return
        now = self._clock.seconds()
        t = now - self._t0
        before = self._last
        if self._takers():
            owed = (self.shape.cumulative(t) - self.shape.cumulative(before)) * self._factor()
            self._issue(owed, before, t)
        self._last = t
        if not self._stopped:
            self._call = self._clock.callLater(self._delay(t), self._tick)

    def _issue(self, owed: float, before: float, t: float) -> None:
        """
        Send every burst that fell due between C{before} and C{t}, each meant
        for the moment its last message fell due.
        """
        credit = self._credit + owed
        # How much of this tick's owed messages had to accrue for the next burst.
        due = self.burst - self._credit
        while credit >= self.burst:
            fraction = due / owed
            intended = self._t0 + before + fraction * (t - before)
            connection = self._nextTaker()
            if connection is None:
                # Every connection has spent its budget.
                credit = 0.0
                break
            connection.send(self.burst, intended)
            credit -= self.burst
            due += self.burst
        self._credit = credit

    def _delay(self, t: float) -> float:
        rate = self.shape.rate(t) * self._factor()
        if rate <= 0:
            return MAX_TICK
        return min(MAX_TICK, max(MIN_TICK, (self.burst - self._credit) / rate))

    def describe(self) -> str:
        each = " per connection" if self.perConnection else " in total"
        burst = f", bursts of {self.burst}" if self.burst > 1 else ""
        return f"open loop, {self.shape.describe()}{each}{burst}"
