"""
Counting a load run: messages, errors, drops, bytes and latencies.

Latencies go into an HDR histogram (the C{hdrhistogram} package), in whole
microseconds from 1 us to an hour at three significant digits, so that
percentiles stay exact to 0.1% however many values are recorded, in constant
memory.

Each reply is recorded once, into the current second's L{Tally} of its app.
Every second the L{Recorder} turns those into a L{Sample} (the time series)
and adds them into the run's totals, so a reply costs one histogram update
whatever is reported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

LOWEST_MICROS = 1
HIGHEST_MICROS = 3600 * 1_000_000
SIGNIFICANT_DIGITS = 3

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))
"""
The percentiles reported, by the name they have in tables and JSON.
"""

LATENCY_KEYS = ("min", "p50", "p90", "p99", "p999", "max", "mean")


class Latencies:
    """
    Latencies, in microseconds, in an HDR histogram.
    """

    def __init__(self) -> None:
        self._histogram = HdrHistogram(LOWEST_MICROS, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
        # The histogram's own mean walks every bucket in Python: far too slow
        # to take each second, so the sum is kept here.
        self._sum = 0

    @property
    def count(self) -> int:
        return self._histogram.get_total_count()

    def recordMicros(self, micros: int) -> None:
        """
        Record one latency; values outside the histogram's range are clamped.
        """
        micros = min(max(int(micros), LOWEST_MICROS), HIGHEST_MICROS)
        self._histogram.record_value(micros)
        self._sum += micros

    def recordSeconds(self, seconds: float) -> None:
        self.recordMicros(round(seconds * 1_000_000))

    def add(self, other: Latencies) -> None:
        if other.count:
            self._histogram.add(other._histogram)
            self._sum += other._sum

    def reset(self) -> None:
        if self.count:
            self._histogram.reset()
            self._sum = 0

    def summary(self) -> dict[str, float | None]:
        """
        Minimum, percentiles, maximum (whole microseconds) and mean; all
        C{None} when nothing was recorded.
        """
        if not self.count:
            return dict.fromkeys(LATENCY_KEYS)
        h = self._histogram
        values = h.get_percentile_to_value_dict([p for _, p in PERCENTILES])
        result: dict[str, float | None] = {"min": h.get_min_value()}
        for name, p in PERCENTILES:
            result[name] = values[p]
        result["max"] = h.get_max_value()
        result["mean"] = round(self._sum / self.count, 1)
        return result


@dataclass
class Tally:
    """
    What happened to the messages of one app over some span of time.

    @ivar sent: messages written to the proxy.
    @ivar answered: replies that were exactly what was sent.
    @ivar errors: replies that differ from what was sent, plus connections
        that failed or were lost.
    @ivar dropped: messages sent (or due) that got no reply at all.
    @ivar bytes: payload bytes of the answered messages (one direction).
    """

    sent: int = 0
    answered: int = 0
    errors: int = 0
    dropped: int = 0
    bytes: int = 0
    latencies: Latencies = field(default_factory=Latencies)

    def add(self, other: Tally) -> None:
        self.sent += other.sent
        self.answered += other.answered
        self.errors += other.errors
        self.dropped += other.dropped
        self.bytes += other.bytes
        self.latencies.add(other.latencies)

    def reset(self) -> None:
        self.sent = self.answered = self.errors = self.dropped = self.bytes = 0
        self.latencies.reset()


@dataclass(frozen=True)
class Figures:
    """
    A L{Tally} over a known number of seconds, as reported.
    """

    sent: int
    answered: int
    errors: int
    dropped: int
    bytes: int
    seconds: float
    latency: dict[str, float | None]

    @classmethod
    def of(cls, tally: Tally, seconds: float) -> Figures:
        return cls(
            tally.sent,
            tally.answered,
            tally.errors,
            tally.dropped,
            tally.bytes,
            seconds,
            tally.latencies.summary(),
        )

    @property
    def reqPerSec(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def mbPerSec(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def asDict(self) -> dict:
        return {
            "messages": self.sent,
            "answered": self.answered,
            "errors": self.errors,
            "dropped": self.dropped,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "reqPerSec": round(self.reqPerSec, 3),
            "mbPerSec": round(self.mbPerSec, 6),
            "latencyUs": dict(self.latency),
        }


@dataclass(frozen=True)
class Sample:
    """
    One point of the time series: the second (or less, at the end) ending
    C{t} seconds into the run.

    @ivar connections: connections open at the end of it.
    @ivar targetRate: the total rate the pacer aimed at over it (open loop), or
        C{None} (closed loop).
    """

    t: float
    total: Figures
    apps: dict[str, Figures]
    connections: int
    targetRate: float | None

    def asDict(self) -> dict:
        return {
            "t": round(self.t, 6),
            "connections": self.connections,
            "targetRate": None if self.targetRate is None else round(self.targetRate, 3),
            **self.total.asDict(),
            "apps": {name: figures.asDict() for name, figures in self.apps.items()},
        }


class Recorder:
    """
    Counts one run, per app and per second.

    @ivar totals: each app's L{Tally} up to the last L{rollOver}.
    @ivar errorKinds: how many errors of each kind, by C{(app, port, kind)}.
    @ivar samples: the time series, one L{Sample} per L{rollOver}.
    """

    def __init__(self, apps: list[str]) -> None:
        self._current = {name: Tally() for name in apps}
        self.totals = {name: Tally() for name in apps}
        self.errorKinds: Counter[tuple[str, int, str]] = Counter()
        self.samples: list[Sample] = []

    def sent(self, app: str, count: int = 1) -> None:
        self._current[app].sent += count

    def answered(self, app: str, latency: float, size: int) -> None:
        tally = self._current[app]
        tally.answered += 1
        tally.bytes += size
        tally.latencies.recordSeconds(latency)

    def error(self, app: str, port: int, kind: str) -> None:
        self._current[app].errors += 1
        self.errorKinds[(app, port, kind)] += 1

    def dropped(self, app: str, count: int) -> None:
        self._current[app].dropped += count

    def rollOver(self, t: float, seconds: float, connections: int, targetRate: float | None) -> Sample:
        """
        Close the current interval, C{seconds} long and ending C{t} seconds
        into the run: sample it, add it to the totals, start the next.
        """
        apps = {name: Figures.of(tally, seconds) for name, tally in self._current.items()}
        whole = Tally()
        for tally in self._current.values():
            whole.add(tally)
        sample = Sample(t, Figures.of(whole, seconds), apps, connections, targetRate)
        self.samples.append(sample)
        for name, tally in self._current.items():
            self.totals[name].add(tally)
            tally.reset()
        return sample

    def figures(self, seconds: float) -> tuple[Figures, dict[str, Figures]]:
        """
        The whole run so far, in total and per app, over C{seconds}.
        """
        whole = Tally()
        for tally in self.totals.values():
            whole.add(tally)
        apps = {name: Figures.of(tally, seconds) for name, tally in self.totals.items()}
        return Figures.of(whole, seconds), apps
