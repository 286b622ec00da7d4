"""
What the metrics count, alone: histogram buckets, the kinds of failed
connects, refusal reasons as labelled.
"""

from __future__ import annotations

import errno

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tcpproxy.config import parseTarget
from tcpproxy.dialer import failureKind
from tcpproxy.metrics import CONNECT_ERRORS, AppStats, Histogram
from tcpproxy.tls import TLSHandshakeFailed


class HistogramTests(TestCase):
    def test_buckets(self):
        """
        A value goes in the first bucket whose bound is at least the value
        (Prometheus' C{le}); above every bound, in C{+Inf}.  Buckets are
        given cumulative, with the sum.
        """
        histogram = Histogram((0.1, 1.0))
        for value in (0.05, 0.1, 0.5, 1.0, 3.0):
            histogram.observe(value)
        self.assertEqual(histogram.cumulative(), [("0.1", 2), ("1.0", 4), ("+Inf", 5)])
        self.assertEqual(histogram.count, 5)
        self.assertAlmostEqual(histogram.sum, 4.65)


class FailureKindTests(TestCase):
    def test_kinds(self):
        """
        Every failed connect is one of the metrics' reasons.
        """
        cases = [
            (error.ConnectionRefusedError(), False, "refused"),
            (error.TimeoutError(), False, "timeout"),
            (defer.TimeoutError(), False, "timeout"),
            (error.ConnectingCancelledError(None), False, "timeout"),
            (error.ConnectionRefusedError(), True, "timeout"),
            (error.DNSLookupError(), False, "dns"),
            (error.NoRouteError(), False, "unreachable"),
            (error.ConnectError(osError=errno.ENETUNREACH), False, "unreachable"),
            (TLSHandshakeFailed("certificate verify failed"), False, "tls"),
            (error.ConnectionLost(), False, "reset"),
        ]
        for exception, expired, kind in cases:
            self.assertEqual(failureKind(Failure(exception), expired), kind, exception)
            self.assertIn(kind, CONNECT_ERRORS)


class AppStatsTests(TestCase):
    def test_targetsKeptOnlyWhileConfigured(self):
        """
        A target's figures stay across a reload that keeps it, and go with
        it; a target not configured is not counted.
        """
        a, b = parseTarget("127.0.0.1:1"), parseTarget("127.0.0.1:2")
        stats = AppStats([a, b])
        stats.connected(a, 0.001)
        stats.failed(b, "refused", "connection refused", 10.0)
        stats.keepTargets([a])
        self.assertEqual(stats.targets[a].connections, 1)
        self.assertNotIn(b, stats.targets)
        stats.failed(b, "refused", "connection refused", 11.0)
        stats.keepTargets([a, b])
        self.assertEqual((stats.targets[b].errors["refused"], stats.targets[b].lastError), (0, None))
