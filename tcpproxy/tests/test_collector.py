"""
Tests for L{tcpproxy.collector}.
"""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import TestCase

from tcpproxy.collector import tuneCollector


def keepCollector(case: TestCase) -> None:
    """
    Give the test process back its collector as it was when C{case} ends:
    L{tuneCollector} freezes what is alive in the whole process.
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
        collection; the thresholds are CPython's as they were.
        """
        alive = [object() for _ in range(10)]  # noqa: F841
        frozen = gc.get_freeze_count()
        threshold = gc.get_threshold()
        tuneCollector()
        self.assertGreater(gc.get_freeze_count(), frozen)
        self.assertEqual(gc.get_threshold(), threshold)

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
