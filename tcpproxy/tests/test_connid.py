"""
Tests for L{tcpproxy.connid}: the ids' shape, their uniqueness within a
process, across processes (at once, one after the other, and forked), and
the id in every line about a connection.
"""

import os
import subprocess
import sys

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcpproxy import connid
from tcpproxy.app import ProxyServerFactory
from tcpproxy.balancer import RoundRobin
from tcpproxy.config import AppConfig, parseTarget
from tcpproxy.dialer import NoTargetAvailable
from tcpproxy.tests.loopback import captureEvents
from tcpproxy.tests.test_relay import FakeDialer, _ClientMixin

A = parseTarget("127.0.0.1:7001")

_PRINT_TAGS = """
import os, sys
from tcpproxy.connid import newConnectionId
first = newConnectionId()
pid = os.fork()
if pid == 0:
    print("child", newConnectionId(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", first, newConnectionId(), flush=True)
"""


class TagTests(SynchronousTestCase):
    def test_shape(self):
        """
        A tag is 16 characters of Crockford's base 32: 42 bits of
        milliseconds, 22 of process id, 16 random, most significant first.
        """
        tag = connid.processTag(now=1.0, pid=5, random=b"\x00\x07")
        self.assertEqual(len(tag), connid.TAG_LENGTH)
        self.assertTrue(set(tag) <= set(connid.ALPHABET))
        value = 0
        for c in tag:
            value = value * 32 + connid.ALPHABET.index(c)
        self.assertEqual((value >> 38, (value >> 16) & (2**22 - 1), value & 0xFFFF), (1000, 5, 7))

    def test_sortsByTime(self):
        """
        Tags sort by the time their process made them, whatever the
        process id and random bits.
        """
        earlier = connid.processTag(now=1_700_000_000.001, pid=4_000_000, random=b"\xff\xff")
        later = connid.processTag(now=1_700_000_000.002, pid=1, random=b"\x00\x00")
        self.assertLess(earlier, later)

    def test_differByProcess(self):
        """
        Two processes started in the same millisecond have different tags.
        """
        self.assertNotEqual(
            connid.processTag(now=5.0, pid=100, random=b"\0\0"),
            connid.processTag(now=5.0, pid=101, random=b"\0\0"),
        )


class IdTests(SynchronousTestCase):
    def test_counter(self):
        """
        Ids are the tag, C{-}, and the connection's number in hexadecimal.
        """
        ids = connid.ConnectionIds("TAG")
        self.assertEqual([ids.next() for _ in range(11)][-2:], ["TAG-a", "TAG-b"])

    def test_numberWrittenWhenAsked(self):
        """
        A connection may keep only its number and have its id written when
        asked: the id it would have had from L{connid.newConnectionId} (the
        next of the process's ids), the same whenever it is written.
        """
        before = connid.newConnectionId()
        number = connid.newConnectionNumber()
        after = connid.newConnectionId()
        tag, counter = before.split("-")
        self.assertEqual(connid.connectionIdOf(number), f"{tag}-{int(counter, 16) + 1:x}")
        self.assertEqual(connid.connectionIdOf(number), connid.connectionIdOf(number))
        self.assertEqual(after, f"{tag}-{int(counter, 16) + 2:x}")
        self.assertRegex(connid.connectionIdOf(number), connid.PATTERN)

    def test_uniqueInProcess(self):
        """
        The ids made in a process are all different.
        """
        made = {connid.newConnectionId() for _ in range(10000)}
        self.assertEqual(len(made), 10000)

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        return subprocess.Popen(
            [sys.executable, "-c", _PRINT_TAGS], stdout=subprocess.PIPE, env=env, text=True
        )

    def test_uniqueAcrossProcesses(self):
        """
        Processes running at once, processes started one after the other
        (restarts), and the children they fork all make different ids.
        """
        together = [self._spawn(), self._spawn()]
        outputs = [p.communicate(timeout=30)[0] for p in together]
        after = self._spawn()
        outputs.append(after.communicate(timeout=30)[0])
        ids = []
        for output in outputs:
            words = output.split()
            self.assertEqual((words[0], words[2]), ("child", "parent"), output)
            ids.extend([words[1], *words[3:]])
        self.assertEqual(len(ids), 9)
        self.assertEqual(len(set(ids)), 9, ids)
        tags = {i.split("-")[0] for i in ids}
        # Each parent has a tag, each forked child another.
        self.assertEqual(len(tags), 6, ids)


class LinesTests(_ClientMixin, SynchronousTestCase):
    """
    Every line about a connection carries its id, as a field and in the text.
    """

    def setUp(self):
        self.clock = Clock()
        self.dialer = FakeDialer()
        self.dialer.cancelled = []
        app = AppConfig("web", (5001,), (A,), maxConnections=1)
        self.factory = ProxyServerFactory(app, RoundRobin(app.targets), self.dialer, self.clock)
        self.events = captureEvents(self)

    def test_recordAndRefusal(self):
        """
        The record of a connection and the refusal of another each start
        with the connection's own id, which is their C{connectionId} field.
        """
        first, _ = self.connectClient()
        second, _ = self.connectClient()  # past MaxConnections: refused
        self.dialer.calls[0][1].errback(NoTargetAvailable([(A, "connection refused")]))
        first.connectionLost(Failure(ConnectionDone()))
        refusal, record = self.events
        self.assertEqual(refusal["connectionId"], second.connectionId)
        self.assertEqual(record["connectionId"], first.connectionId)
        self.assertNotEqual(first.connectionId, second.connectionId)
        self.assertEqual(
            formatEvent(refusal),
            f"[{second.connectionId}] 127.0.0.1:40000 -> web:5001: refused (MaxConnections)",
        )
        self.assertTrue(formatEvent(record).startswith(f"[{first.connectionId}] 127.0.0.1:40000 -> web:5001"))
        self.assertRegex(first.connectionId, connid.PATTERN)
