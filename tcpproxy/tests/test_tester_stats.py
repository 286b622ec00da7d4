"""
Tests for L{tcpproxy.tester.stats}: the HDR histogram's percentiles and the
per-second accounting of a run.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.tester.stats import Latencies, Recorder


class LatenciesTests(SynchronousTestCase):
    def test_uniform(self) -> None:
        """
        For the values 1 to 1000 the percentiles are the values themselves
        (below 2048 the histogram is exact at three significant digits).
        """
        latencies = Latencies()
        for value in range(1000, 0, -1):
            latencies.recordMicros(value)
        self.assertEqual(
            latencies.summary(),
            {"min": 1, "p50": 500, "p90": 900, "p99": 990, "p999": 999, "max": 1000, "mean": 500.5},
        )

    def test_tail(self) -> None:
        """
        A rare slow value shows in p99.9 and the maximum, not below.
        """
        latencies = Latencies()
        for _ in range(990):
            latencies.recordMicros(100)
        for _ in range(9):
            latencies.recordMicros(1500)
        latencies.recordMicros(2000)
        summary = latencies.summary()
        self.assertEqual(
            (summary["p50"], summary["p90"], summary["p99"], summary["p999"], summary["max"]),
            (100, 100, 100, 1500, 2000),
        )

    def test_precision(self) -> None:
        """
        Large values are kept to three significant digits.
        """
        latencies = Latencies()
        latencies.recordSeconds(1.234567)
        self.assertTrue(abs(latencies.summary()["max"] - 1_234_567) <= 1_234_567 * 0.001)

    def test_empty(self) -> None:
        self.assertEqual(set(Latencies().summary().values()), {None})

    def test_clamped(self) -> None:
        """
        A latency of zero (or less, from a clock step) counts as 1 us.
        """
        latencies = Latencies()
        latencies.recordSeconds(-0.5)
        latencies.recordSeconds(0)
        self.assertEqual(latencies.summary()["max"], 1)
        self.assertEqual(latencies.count, 2)

    def test_addAndReset(self) -> None:
        one, two = Latencies(), Latencies()
        one.recordMicros(10)
        two.recordMicros(30)
        one.add(two)
        self.assertEqual((one.count, one.summary()["mean"], one.summary()["max"]), (2, 20.0, 30))
        one.reset()
        self.assertEqual(one.count, 0)
        self.assertIsNone(one.summary()["mean"])


class RecorderTests(SynchronousTestCase):
    def test_rollOver(self) -> None:
        """
        Each roll-over samples the interval since the last, per app and in
        total, and adds it into the run's totals.
        """
        recorder = Recorder(["a", "b"])
        recorder.sent("a", 3)
        recorder.answered("a", 0.001, 10)
        recorder.answered("a", 0.002, 10)
        recorder.error("a", 1000, "reply differs from the message sent")
        recorder.sent("b", 1)
        recorder.dropped("b", 1)
        first = recorder.rollOver(1.0, 1.0, 2, None)
        self.assertEqual((first.total.sent, first.total.answered, first.total.errors), (4, 2, 1))
        self.assertEqual((first.apps["a"].bytes, first.apps["b"].dropped), (20, 1))
        self.assertEqual(first.total.reqPerSec, 2.0)
        self.assertEqual(first.total.latency["max"], 2000)

        recorder.sent("b", 1)
        recorder.answered("b", 0.0015, 5)
        second = recorder.rollOver(1.5, 0.5, 2, 100.0)
        self.assertEqual((second.total.sent, second.total.answered, second.total.reqPerSec), (1, 1, 2.0))

        total, apps = recorder.figures(1.5)
        self.assertEqual(
            (total.sent, total.answered, total.errors, total.dropped, total.bytes), (5, 3, 1, 1, 25)
        )
        self.assertEqual((apps["a"].sent, apps["b"].sent), (3, 2))
        self.assertEqual((total.latency["min"], total.latency["max"]), (1000, 2000))
        self.assertEqual(dict(recorder.errorKinds), {("a", 1000, "reply differs from the message sent"): 1})
        self.assertEqual([s.t for s in recorder.samples], [1.0, 1.5])
