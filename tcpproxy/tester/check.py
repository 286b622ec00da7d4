"""
C{tcpproxy-tester check}: a conformance run against a live proxy, on trial.

One L{PortCheck} test case class is generated for each port of each app in
the configuration, and the whole suite is run by trial's own runner, so the
output, the summary and the exit status are trial's.  For every port:

  - it accepts a connection;
  - a small message comes back byte for byte;
  - a multi-MiB message comes back byte for byte;
  - several connections at once each get their own bytes back;
  - after the tester half-closes, the rest of the echo still arrives and the
    proxy then closes its side cleanly.

Every connection a check opens is ended cleanly (EOF, then close once the
proxy has closed its side), so a healthy run leaves one "done" line per
connection in the proxy's log, never a reset.

With C{anyReply} (for targets that are not echo servers) a reply need only
be non-empty.  Every failure message starts with the app and port, so a
broken port is named in trial's summary.

Test ids read C{app.port N.what is checked}, which trial's tree reporter
shows as a tree: app, then port, then one line per check.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import TextIO

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.reporter import TreeReporter
from twisted.trial.runner import TrialRunner
from twisted.trial.unittest import FailTest, TestCase, TestSuite
from zope.interface import implementer

from tcpproxy.dialer import describeFailure
from tcpproxy.tester.targets import TLS_SKIPPED, ProxyPort

DEFAULT_MESSAGE = b"tcpproxy-tester check: hello through the proxy\n"


@dataclass(frozen=True)
class CheckSettings:
    """
    What the checks send and how long they wait.

    @ivar anyReply: accept any non-empty reply instead of an exact echo.
    @ivar timeout: seconds each step (connect, reply, close) may take.
    """

    anyReply: bool = False
    message: bytes = DEFAULT_MESSAGE
    largeSize: int = 4 * 1024 * 1024
    concurrency: int = 10
    timeout: float = 10.0


def sizeText(size: int) -> str:
    """
    C{4194304} as C{"4 MiB"}, C{1536} as C{"1536 bytes"}.
    """
    if size >= 1024 * 1024 and size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} bytes"


@implementer(IHalfCloseableProtocol)
class Conversation(Protocol):
    """
    A connection that a check drives step by step.

    @ivar received: every byte that arrived.
    @ivar eof: the other side sent EOF (closed its side cleanly).
    @ivar lost: why the connection ended, once it has.
    """

    eof = False
    lost: Failure | None = None
    diverged = False

    def __init__(self) -> None:
        self.received = bytearray()
        self._expected = b""
        self._waiters: list[tuple[int, Deferred[bytes]]] = []
        self._closed: list[Deferred[None]] = []

    def expect(self, echo: bytes) -> None:
        """
        Watch for the reply to stop being C{echo}: a wrong byte ends every
        wait at once, rather than after the timeout.
        """
        self._expected = echo

    def dataReceived(self, data: bytes) -> None:
        start = len(self.received)
        self.received += data
        if not self.diverged and self._expected[start : start + len(data)] != data:
            self.diverged = True
        self._wake()

    def readConnectionLost(self) -> None:
        self.eof = True
        # Nothing more will come: close our side too (Twisted delivers no
        # connectionLost for a socket whose two halves are shut otherwise).
        self.transport.loseConnection()
        self._wake(ended=True)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason
        self._wake(ended=True)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    def _wake(self, ended: bool = False) -> None:
        waiting = []
        for count, d in self._waiters:
            if ended or self.diverged or len(self.received) >= count:
                d.callback(bytes(self.received))
            else:
                waiting.append((count, d))
        self._waiters = waiting

    def waitFor(self, count: int) -> Deferred[bytes]:
        """
        Fire with what was received, once it is C{count} bytes or more or
        once nothing more can come.
        """
        d: Deferred[bytes] = Deferred()
        self._waiters.append((count, d))
        if len(self.received) >= count or self.diverged or self.eof or self.lost is not None:
            self._wake(ended=self.eof or self.lost is not None)
        return d

    def whenClosed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.lost is not None:
            d.callback(None)
        else:
            self._closed.append(d)
        return d

    def howItEnded(self) -> str:
        if self.eof or (self.lost is not None and self.lost.check(ConnectionDone)):
            return "the proxy closed the connection"
        if self.lost is None:
            return "the connection is still open"
        return f"the connection was lost ({self.lost.getErrorMessage()})"


def describeMismatch(sent: bytes, got: bytes) -> str | None:
    """
    Say how C{got} differs from the exact echo of C{sent}, or C{None}.
    """
    common = min(len(sent), len(got))
    for start in range(0, common, 65536):
        end = min(start + 65536, common)
        if sent[start:end] != got[start:end]:
            offset = next(i for i in range(start, common) if sent[i] != got[i])
            return (
                f"the reply differs from what was sent at byte {offset}: "
                f"sent {sent[offset : offset + 12]!r}, got {got[offset : offset + 12]!r}"
            )
    if len(got) < len(sent):
        return f"only {len(got)} of the {len(sent)} bytes sent came back"
    if len(got) > len(sent):
        return f"{len(got) - len(sent)} bytes more came back than were sent"
    return None


class PortCheck(TestCase):
    """
    The checks of one port; subclassed per port by L{buildSuite}.

    @cvar where: the port.
    @cvar settings: the L{CheckSettings}.
    """

    where: ProxyPort
    settings: CheckSettings

    def describe(self) -> str:
        name = self._testMethodName
        exact = not self.settings.anyReply
        if name == "test_accepts":
            return "accepts a connection"
        if name == "test_small":
            size = sizeText(len(self.settings.message))
            return f"echoes {size} exactly" if exact else f"replies to {size}"
        if name == "test_large":
            size = sizeText(self.settings.largeSize)
            return f"echoes {size} exactly" if exact else f"replies to {size}"
        if name == "test_concurrent":
            count = self.settings.concurrency
            return (
                f"echoes on {count} connections at once"
                if exact
                else f"replies on {count} connections at once"
            )
        if name == "test_halfClose":
            return "echoes then closes after a half-close" if exact else "closes cleanly after a half-close"
        return name

    def id(self) -> str:
        return f"{self.where.app}.port {self.where.port}.{self.describe()}"

    def __str__(self) -> str:
        return self.id()

    def shortDescription(self) -> str:
        return self.id()

    # -- steps

    def _complain(self, text: str) -> None:
        self.fail(f"{self.where}: {text}")

    async def _connect(self) -> Conversation:
        conversation = Conversation()
        attempt = connectProtocol(self.where.endpoint(reactor), conversation)
        attempt.addTimeout(self.settings.timeout, reactor)
        try:
            await attempt
        except Exception:
            reason = Failure()
            self._complain(
                f"cannot connect to {self.where.target}: {describeFailure(reason, self.settings.timeout)}"
            )
        self.addCleanup(self._hangUp, conversation)
        return conversation

    def _hangUp(self, conversation: Conversation) -> Deferred[None]:
        """
        End a check's connection as a well-behaved client does, so that the
        proxy logs it as done, not as a reset: send EOF, read what is left
        until the proxy closes its side, then close.  Only a proxy that has
        not closed within the timeout is reset.
        """
        if conversation.lost is not None:
            return succeed(None)
        closed = conversation.whenClosed()
        if not conversation.eof:
            conversation.transport.loseWriteConnection()
        deadline = reactor.callLater(self.settings.timeout, conversation.transport.abortConnection)

        def disarm(result: object) -> object:
            if deadline.active():
                deadline.cancel()
            return result

        return closed.addBoth(disarm)

    async def _receive(self, conversation: Conversation, count: int, what: str) -> bytes:
        waiting = conversation.waitFor(count)
        waiting.addTimeout(self.settings.timeout, reactor)
        try:
            return await waiting
        except defer.TimeoutError:
            got = len(conversation.received)
            self._complain(
                f"{what}: no reply within {self.settings.timeout:g}s"
                if not got
                else f"{what}: only {got} of {count} bytes came back within {self.settings.timeout:g}s"
            )

    async def _exchange(self, conversation: Conversation, message: bytes, what: str) -> None:
        if not self.settings.anyReply:
            conversation.expect(message)
        conversation.transport.write(message)
        needed = 1 if self.settings.anyReply else len(message)
        got = await self._receive(conversation, needed, what)
        self._judge(conversation, message, got, what)

    def _judge(self, conversation: Conversation, message: bytes, got: bytes, what: str) -> None:
        if self.settings.anyReply:
            if not got:
                self._complain(f"{what}: no reply before {conversation.howItEnded()}")
            return
        wrong = describeMismatch(message, got)
        if wrong is not None:
            cutShort = len(got) < len(message) and message.startswith(got)
            ended = f" before {conversation.howItEnded()}" if cutShort else ""
            self._complain(f"{what}: {wrong}{ended}")

    # -- the checks

    async def test_accepts(self) -> None:
        conversation = await self._connect()
        conversation.transport.loseConnection()
        await conversation.whenClosed()

    async def test_small(self) -> None:
        conversation = await self._connect()
        await self._exchange(conversation, self.settings.message, f"{sizeText(len(self.settings.message))}")

    async def test_large(self) -> None:
        conversation = await self._connect()
        message = os.urandom(self.settings.largeSize)
        await self._exchange(conversation, message, f"{sizeText(len(message))} of random bytes")

    async def test_concurrent(self) -> None:
        count = self.settings.concurrency
        conversations = await gatherResults(
            [defer.ensureDeferred(self._connect()) for _ in range(count)], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure)
        # Every connection is open before any sends: all are served at once.
        await gatherResults(
            [
                defer.ensureDeferred(
                    self._exchange(
                        conversation,
                        f"connection {number + 1} of {count}: ".encode() + os.urandom(1024).hex().encode(),
                        f"connection {number + 1} of {count}",
                    )
                )
                for number, conversation in enumerate(conversations)
            ],
            consumeErrors=True,
        ).addErrback(lambda f: f.value.subFailure)

    async def test_halfClose(self) -> None:
        conversation = await self._connect()
        message = self.settings.message
        what = "after the tester's EOF"
        if not self.settings.anyReply:
            conversation.expect(message)
        conversation.transport.write(message)
        conversation.transport.loseWriteConnection()
        if not self.settings.anyReply:
            got = await self._receive(conversation, len(message), what)
            if conversation.diverged:
                self._judge(conversation, message, got, what)
        closed = conversation.whenClosed()
        closed.addTimeout(self.settings.timeout, reactor)
        try:
            await closed
        except defer.TimeoutError:
            self._complain(
                f"{what}: the proxy did not close its side within {self.settings.timeout:g}s "
                f"({len(conversation.received)} bytes came back)"
            )
        if not conversation.eof:
            self._complain(f"{what}: {conversation.howItEnded()} instead of closing its side cleanly")
        self._judge(conversation, message, bytes(conversation.received), what)


class CheckReporter(TreeReporter):
    """
    Trial's tree reporter, except that a failed check is shown by its
    message alone: it already names the app, port and what went wrong, and
    the tester's own stack says nothing to the user.  Checks that failed
    the same way (every check of an unreachable port) are listed together.
    Errors (the tester's bugs) keep their traceback.
    """

    def _formatFailureTraceback(self, fail: Failure) -> str:
        if fail.check(FailTest):
            return fail.getErrorMessage().rstrip() + "\n"
        return TreeReporter._formatFailureTraceback(self, fail)


CHECKS = ("test_accepts", "test_small", "test_large", "test_concurrent", "test_halfClose")


def buildSuite(ports: list[ProxyPort], settings: CheckSettings) -> TestSuite:
    """
    One generated L{PortCheck} subclass per port, its checks in L{CHECKS} order.
    """
    suite = TestSuite()
    for where in ports:
        attributes = {"where": where, "settings": settings, "timeout": settings.timeout * 3 + 5}
        if where.tls:
            attributes["skip"] = TLS_SKIPPED
        cls = type(f"PortCheck_{where.port}", (PortCheck,), attributes)
        for name in CHECKS:
            suite.addTest(cls(name))
    return suite


def runChecks(ports: list[ProxyPort], settings: CheckSettings, stream: TextIO) -> int:
    """
    Run the suite with trial's runner and L{CheckReporter} on C{stream}.

    Trial's working directory (its log) goes to a temporary directory that
    is removed afterwards, so nothing is left in the user's.

    @return: the exit status: 0 if every check passed, 1 otherwise.
    """
    suite = buildSuite(ports, settings)
    scratch = tempfile.mkdtemp(prefix="tcpproxy-tester-")
    try:
        runner = TrialRunner(
            CheckReporter,
            stream=stream,
            workingDirectory=os.path.join(scratch, "_trial_temp"),
        )
        result = runner.run(suite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if result.wasSuccessful() else 1
