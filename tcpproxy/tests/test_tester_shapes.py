"""
Tests for L{tcpproxy.tester.shapes}: each shape's rate, and its integral.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.tester.shapes import Constant, Sawtooth, Sine, Step, makeShape


def integrate(shape, t: float, width: float = 0.002) -> float:
    """
    The midpoint-rule integral of C{shape.rate} over [0, t], in slices of
    C{width} (steps fall on slice boundaries in these tests).
    """
    steps = round(t / width)
    return sum(shape.rate((i + 0.5) * width) for i in range(steps)) * width


class IntegralMixin:
    """
    Every shape's C{cumulative} is the integral of its C{rate}.
    """

    def shape(self):
        raise NotImplementedError()

    def test_cumulativeIsTheIntegralOfRate(self) -> None:
        shape = self.shape()
        for t in (0.0, 0.3, 1.0, 2.5, 4.0, 7.3, 12.0):
            exact, numeric = shape.cumulative(t), integrate(shape, t)
            self.assertTrue(
                abs(exact - numeric) <= 0.01 + t * 0.001,
                f"{shape.describe()}: cumulative({t}) = {exact}, integral {numeric}",
            )


class ConstantTests(IntegralMixin, SynchronousTestCase):
    def shape(self):
        return Constant(250)

    def test_rate(self) -> None:
        shape = self.shape()
        self.assertEqual([shape.rate(t) for t in (0, 1.5, 100)], [250, 250, 250])
        self.assertEqual(shape.cumulative(2), 500)


class StepTests(IntegralMixin, SynchronousTestCase):
    def shape(self):
        return Step(minRate=100, maxRate=400, step=100, every=1.0)

    def test_rate(self) -> None:
        """
        The rate starts at the minimum, rises by one step at each interval and
        holds at the maximum.
        """
        shape = self.shape()
        self.assertEqual(
            [shape.rate(t) for t in (0, 0.99, 1.0, 2.5, 3.0, 3.9, 10.0)],
            [100, 100, 200, 300, 400, 400, 400],
        )

    def test_lastStepIsClipped(self) -> None:
        """
        A step that would overshoot the maximum stops at it.
        """
        shape = Step(minRate=0, maxRate=250, step=100, every=1.0)
        self.assertEqual([shape.rate(t) for t in (0, 1, 2, 3, 4)], [0, 100, 200, 250, 250])
        self.assertAlmostEqual(shape.cumulative(5), 0 + 100 + 200 + 250 + 250)

    def test_defaults(self) -> None:
        """
        By default a step is a tenth of the climb and lasts a tenth of the
        period, so the maximum is reached after one period.
        """
        shape = makeShape("step", maxRate=1000, minRate=0, period=5)
        self.assertEqual(shape.rate(0), 0)
        self.assertEqual(shape.rate(0.5), 100)
        self.assertEqual(shape.rate(4.99), 900)
        self.assertEqual(shape.rate(5.0), 1000)


class SineTests(IntegralMixin, SynchronousTestCase):
    def shape(self):
        return Sine(minRate=10, maxRate=110, period=4.0)

    def test_rate(self) -> None:
        """
        The wave starts at the minimum, peaks at half the period, and is back
        at the minimum after a whole period.
        """
        shape = self.shape()
        self.assertAlmostEqual(shape.rate(0), 10)
        self.assertAlmostEqual(shape.rate(1.0), 60)
        self.assertAlmostEqual(shape.rate(2.0), 110)
        self.assertAlmostEqual(shape.rate(3.0), 60)
        self.assertAlmostEqual(shape.rate(4.0), 10)
        self.assertAlmostEqual(shape.cumulative(4.0), 60 * 4.0)


class SawtoothTests(IntegralMixin, SynchronousTestCase):
    def shape(self):
        return Sawtooth(minRate=0, maxRate=200, period=2.0)

    def test_rate(self) -> None:
        """
        The rate ramps from the minimum to the maximum over each period, then
        drops back.
        """
        shape = self.shape()
        self.assertAlmostEqual(shape.rate(0), 0)
        self.assertAlmostEqual(shape.rate(0.5), 50)
        self.assertAlmostEqual(shape.rate(1.999), 199.9)
        self.assertAlmostEqual(shape.rate(2.0), 0)
        self.assertAlmostEqual(shape.rate(3.0), 100)
        self.assertAlmostEqual(shape.cumulative(4.0), 2 * 200)


class MakeShapeTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertIsInstance(makeShape("constant", 10), Constant)
        self.assertIsInstance(makeShape("step", 10), Step)
        self.assertIsInstance(makeShape("sine", 10), Sine)
        self.assertIsInstance(makeShape("sawtooth", 10), Sawtooth)

    def test_refusals(self) -> None:
        """
        Out-of-range figures are refused with a message naming the option.
        """
        cases = [
            (("square", 10), "unknown shape 'square'"),
            (("sine", 0), "--max-rate"),
            (("sine", 10, 20), "--min-rate 20 must be between 0 and --max-rate 10"),
            (("sine", 10, 0, 0), "--period"),
        ]
        for args, text in cases:
            error = self.assertRaises(ValueError, makeShape, *args)
            self.assertIn(text, str(error))

    def test_describe(self) -> None:
        self.assertEqual(makeShape("sine", 100, 10, 5).describe(), "sine 10-100 msg/s, period 5s")
