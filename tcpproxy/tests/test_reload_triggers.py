"""
Tests for L{tcpproxy.triggers}: C{SIGHUP} and a changed file each ask for
one reload.
"""

import os
import signal

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tcpproxy.triggers import IReloadTrigger, ReloadOnChange, ReloadOnSignal, fileSignature


class ReloadOnSignalTests(TestCase):
    timeout = 10

    def setUp(self):
        self.original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.original)

    def test_interface(self):
        verifyObject(IReloadTrigger, ReloadOnSignal(reactor))

    def test_sighupReloads(self):
        """
        C{SIGHUP} sent to the process calls the reload in the reactor; after
        stop, the handler from before is back.
        """
        trigger = ReloadOnSignal(reactor)
        reloaded = Deferred()
        trigger.start(lambda: reloaded.callback("reloaded"))
        os.kill(os.getpid(), signal.SIGHUP)

        def check(result):
            self.assertEqual(result, "reloaded")
            trigger.stop()
            self.assertEqual(signal.getsignal(signal.SIGHUP), self.original)

        return reloaded.addCallback(check)

    def test_stopKeepsLaterHandler(self):
        """
        A handler installed after ours is not replaced when we stop.
        """
        trigger = ReloadOnSignal(reactor)
        trigger.start(lambda: None)

        def later(signum, frame):
            pass

        signal.signal(signal.SIGHUP, later)
        trigger.stop()
        self.assertEqual(signal.getsignal(signal.SIGHUP), later)

    def test_stopWithoutStart(self):
        ReloadOnSignal(reactor).stop()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.original)


class ReloadOnChangeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()
        self.write("{}")
        self.reloads = []
        self.trigger = ReloadOnChange(self.path, self.clock, interval=1.0)
        self.trigger.start(lambda: self.reloads.append(fileSignature(self.path)))
        self.addCleanup(self.trigger.stop)

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def test_interface(self):
        verifyObject(IReloadTrigger, self.trigger)

    def test_unchangedNoReload(self):
        self.clock.pump([1.0] * 5)
        self.assertEqual(self.reloads, [])

    def test_changedOnce(self):
        """
        A change is seen at the next check, and reloaded once.
        """
        self.write('{"Apps": []}')
        self.clock.advance(0.5)
        self.assertEqual(self.reloads, [])
        self.clock.advance(0.5)
        self.assertEqual(len(self.reloads), 1)
        self.clock.pump([1.0] * 3)
        self.assertEqual(len(self.reloads), 1)

    def test_touched(self):
        """
        Saving the same bytes again (a new modification time) reloads too,
        as a user who saves and expects a reload would want.
        """
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        self.clock.advance(1.0)
        self.assertEqual(len(self.reloads), 1)

    def test_replaced(self):
        """
        An editor that writes a new file and renames it over the old one.
        """
        other = self.path + ".new"
        with open(other, "w") as f:
            f.write("{}")
        os.replace(other, self.path)
        self.clock.advance(1.0)
        self.assertEqual(len(self.reloads), 1)

    def test_removedAndBack(self):
        """
        A file that disappears is reloaded (the reload says it cannot be
        read), and again when it comes back.
        """
        os.remove(self.path)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.write("{ }")
        self.clock.advance(1.0)
        self.assertEqual(len(self.reloads), 2)
        self.assertEqual(self.reloads[0][0], "unreadable")

    def test_changedBeforeStart(self):
        """
        Given the signature of the version that runs, an edit made before
        the trigger starts is reloaded at the first check.
        """
        seen = fileSignature(self.path)
        self.write('{"Apps": []}')
        reloads = []
        trigger = ReloadOnChange(self.path, self.clock, seen=seen)
        trigger.start(lambda: reloads.append(True))
        self.addCleanup(trigger.stop)
        self.clock.advance(1.0)
        self.assertEqual(reloads, [True])

    def test_stop(self):
        self.trigger.stop()
        self.write('{"Apps": []}')
        self.clock.advance(1.0)
        self.assertEqual(self.reloads, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
