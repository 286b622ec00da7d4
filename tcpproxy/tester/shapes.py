"""
Load shapes: the total message rate as a function of time.

A shape gives both the rate at an instant and the number of messages due
since the start (the rate's integral, in closed form).  The open-loop pacer
(L{tcpproxy.tester.pacing}) works from the integral, so it stays exact
however late the reactor wakes it: a late tick owes every message that
fell due meanwhile, each with the time it was due.
"""

from __future__ import annotations

import math

from zope.interface import Interface, implementer

SHAPES = ("constant", "step", "sine", "sawtooth")


class IShape(Interface):
    """
    A message rate that changes with time since the start of a run.
    """

    def rate(t: float) -> float:
        """
        Messages per second, C{t} seconds into the run.
        """

    def cumulative(t: float) -> float:
        """
        Messages due in the first C{t} seconds: the integral of L{rate}.
        """

    def describe() -> str:
        """
        A few words for the report, such as C{"sine 10-100 msg/s, period 5s"}.
        """


@implementer(IShape)
class Constant:
    """
    The same rate throughout.
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate

    def rate(self, t: float) -> float:
        return self._rate

    def cumulative(self, t: float) -> float:
        return self._rate * t

    def describe(self) -> str:
        return f"constant {self._rate:g} msg/s"


@implementer(IShape)
class Step:
    """
    A staircase: C{minRate}, raised by C{step} every C{every} seconds until
    it reaches C{maxRate}, which it then holds.
    """

    def __init__(self, minRate: float, maxRate: float, step: float, every: float) -> None:
        self.minRate = minRate
        self.maxRate = maxRate
        self.step = step
        self.every = every
        # How many whole steps lie below the maximum.
        self._climb = math.ceil((maxRate - minRate) / step) if step > 0 else 0

    def rate(self, t: float) -> float:
        return min(self.maxRate, self.minRate + self.step * math.floor(t / self.every))

    def cumulative(self, t: float) -> float:
        whole = math.floor(t / self.every)
        climbing = min(whole, self._climb)
        climbed = climbing * self.minRate + self.step * climbing * (climbing - 1) / 2
        held = (whole - climbing) * self.maxRate
        return (climbed + held) * self.every + self.rate(t) * (t - whole * self.every)

    def describe(self) -> str:
        return f"step {self.minRate:g}-{self.maxRate:g} msg/s, +{self.step:g} msg/s every {self.every:g}s"


@implementer(IShape)
class Sine:
    """
    A wave from C{minRate} up to C{maxRate} (at half the period) and back.
    """

    def __init__(self, minRate: float, maxRate: float, period: float) -> None:
        self.minRate = minRate
        self.maxRate = maxRate
        self.period = period

    def rate(self, t: float) -> float:
        swing = (1 - math.cos(2 * math.pi * t / self.period)) / 2
        return self.minRate + (self.maxRate - self.minRate) * swing

    def cumulative(self, t: float) -> float:
        wave = t - self.period / (2 * math.pi) * math.sin(2 * math.pi * t / self.period)
        return self.minRate * t + (self.maxRate - self.minRate) / 2 * wave

    def describe(self) -> str:
        return f"sine {self.minRate:g}-{self.maxRate:g} msg/s, period {self.period:g}s"


@implementer(IShape)
class Sawtooth:
    """
    A ramp from C{minRate} to C{maxRate} over each period, then a drop.
    """

    def __init__(self, minRate: float, maxRate: float, period: float) -> None:
        self.minRate = minRate
        self.maxRate = maxRate
        self.period = period

    def rate(self, t: float) -> float:
        phase = t / self.period - math.floor(t / self.period)
        return self.minRate + (self.maxRate - self.minRate) * phase

    def cumulative(self, t: float) -> float:
        whole = math.floor(t / self.period)
        into = t - whole * self.period
        perPeriod = (self.minRate + self.maxRate) / 2 * self.period
        return (
            whole * perPeriod
            + self.minRate * into
            + (self.maxRate - self.minRate) * into * into / (2 * self.period)
        )

    def describe(self) -> str:
        return f"sawtooth {self.minRate:g}-{self.maxRate:g} msg/s, period {self.period:g}s"


def makeShape(
    name: str,
    maxRate: float,
    minRate: float = 0.0,
    period: float = 10.0,
    step: float | None = None,
    every: float | None = None,
) -> IShape:
    """
    Build the shape called C{name} from the command line's figures.

    For C{step}, the step defaults to a tenth of the climb and its interval
    to a tenth of the period, so that the maximum is reached after one period.

    @raise ValueError: C{name} is not one of L{SHAPES}, or a figure is out of range.
    """
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; shapes are {', '.join(SHAPES)}")
    if not maxRate > 0:
        raise ValueError("--max-rate must be greater than 0")
    if not 0 <= minRate <= maxRate:
        raise ValueError(f"--min-rate {minRate:g} must be between 0 and --max-rate {maxRate:g}")
    if not period > 0:
        raise ValueError("--period must be greater than 0")
    if name == "constant":
        return Constant(maxRate)
    if name == "sine":
        return Sine(minRate, maxRate, period)
    if name == "sawtooth":
        return Sawtooth(minRate, maxRate, period)
    if step is None:
        step = (maxRate - minRate) / 10
    if every is None:
        every = period / 10
    if not step > 0 and maxRate > minRate:
        raise ValueError("--step must be greater than 0")
    if not every > 0:
        raise ValueError("--step-every must be greater than 0")
    return Step(minRate, maxRate, step, every)
