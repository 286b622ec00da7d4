"""
Tests for L{tcpproxy.collector}.
"""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import TestCase

from tcpproxy.collector import YOUNG_THRESHOLD, tuneCollector


def keepCollector(case: TestCase) -> None:
    """
    Give the test process back its collector settings when C{case} ends:
    L{tuneCollector} sets them for the whole process.
    """
    threshold = gc.get_threshold()
    case.addCleanup(gc.set_threshold, *threshold)
    case.addCleanup(gc.unfreeze)


class TuneCollectorTests(TestCase):
    def setUp(self) -> None:
        keepCollector(self)

    def test_freezesWhatIsAlive(self) -> None:
        """
        What is alive when the proxy has started is out of every later
        collection.
        """
        alive = [object() for _ in range(10)]  # noqa: F841
        frozen = gc.get_freeze_count()
        tuneCollector()
        self.assertGreater(gc.get_freeze_count(), frozen)

    def test_youngThreshold(self) -> None:
        """
        The young generation is collected every L{YOUNG_THRESHOLD}
        allocations; the older generations keep CPython's thresholds.
        """
        gc.set_threshold(700, 10, 10)
        tuneCollector()
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, 10, 10))

    def test_cyclesStillCollected(self) -> None:
        """
        Cyclic garbage made after the tuning is still collected.
        """
        tuneCollector()

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a
        collected = []
        weakref.finalize(a, collected.append, "a")
        del a, b
        gc.collect()
        self.assertEqual(collected, ["a"])
