"""
Tests for L{tcpproxy.deadlines}: many connect deadlines on one timer.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.deadlines import Deadlines


class _Item:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def timedOut(self) -> None:
        self.log.append(self.name)


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock)
        self.expired: list[str] = []

    def item(self, name: str) -> _Item:
        return _Item(name, self.expired)

    def test_expireInTime(self) -> None:
        """
        Each item times out at its own deadline, not before, whatever the
        mix of timeouts.
        """
        a, b, c = self.item("a"), self.item("b"), self.item("c")
        self.deadlines.add(a, 5)
        self.clock.advance(1)
        self.deadlines.add(b, 2)
        self.deadlines.add(c, 5)
        self.clock.advance(1.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(1.9)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b", "a"])
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b", "a", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_removed(self) -> None:
        """
        A removed item never times out; with nothing left, no timer is left.
        """
        a, b = self.item("a"), self.item("b")
        self.deadlines.add(a, 1)
        self.deadlines.add(b, 1)
        self.deadlines.remove(a, 1)
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b"])
        self.deadlines.add(a, 1)
        self.deadlines.remove(a, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.deadlines), 0)

    def test_oldestRemoved(self) -> None:
        """
        When the item the timer was set for is removed, the next one still
        times out at its own deadline.
        """
        a, b = self.item("a"), self.item("b")
        self.deadlines.add(a, 1)
        self.clock.advance(0.5)
        self.deadlines.add(b, 1)
        self.deadlines.remove(a, 1)
        self.clock.advance(0.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b"])

    def test_addedWhileExpiring(self) -> None:
        """
        An item that, timing out, adds another (the next target's dial) gets
        a deadline of its own.
        """
        again = self.item("again")

        class Retry(_Item):
            def timedOut(self2) -> None:
                _Item.timedOut(self2)
                self.deadlines.add(again, 1)

        self.deadlines.add(Retry("first", self.expired), 1)
        self.clock.advance(1)
        self.clock.advance(0.9)
        self.assertEqual(self.expired, ["first"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["first", "again"])
