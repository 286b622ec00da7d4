"""
One connection of a load run: it writes messages and matches the echo.

TCP is a stream, so a reply is complete when as many bytes as the message
had have come back; replies come back in the order the messages went out,
so the connection keeps a queue of what it sent and compares the incoming
bytes with its head, chunk by chunk, without buffering them.  A reply that
differs from its message is an error; a message still queued when the
connection ends is dropped.

Each message carries the time it was I{meant} to be sent: in an open loop
that is its slot in the schedule, not the moment the reactor got round to
writing it, so a stall in the proxy (or in the tester) shows in the latency
instead of silently delaying the schedule (no coordinated omission).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import Interface

from tcpproxy.tester.stats import Recorder
from tcpproxy.tester.targets import ProxyPort

PENDING = "pending"
CONNECTING = "connecting"
OPEN = "open"
CLOSED = "closed"

MISMATCH = "reply differs from the message sent"
UNEXPECTED = "bytes arrived that no message asked for"


class IConnectionListener(Interface):
    """
    What a load run hears from its connections.
    """

    def connectionReady(connection: LoadProtocol) -> None:
        """
        C{connection} is open and may send.
        """

    def replied(connection: LoadProtocol) -> None:
        """
        A reply (right or wrong) to one of C{connection}'s messages is complete.
        """

    def budgetSpent(connection: LoadProtocol) -> None:
        """
        C{connection} has sent every message it was allowed.
        """

    def connectionClosed(connection: LoadProtocol) -> None:
        """
        C{connection} is gone, whoever closed it.
        """


def describeLoss(reason: Failure) -> str:
    """
    Say how a connection that the tester did not close ended.
    """
    if reason.check(ConnectionDone):
        return "connection closed by the proxy"
    return f"connection lost: {reason.getErrorMessage()}"


class LoadProtocol(Protocol):
    """
    A connection that sends messages and checks each echo.

    @ivar where: the port it talks to.
    @ivar state: L{PENDING}, L{CONNECTING}, L{OPEN} or L{CLOSED}.
    @ivar remaining: messages it may still send, or C{None} for no limit.
    @ivar outstanding: C{(message, intended send time)} awaiting their reply.
    """

    state = PENDING
    closing = False

    def __init__(
        self,
        where: ProxyPort,
        nextMessage: Callable[[], bytes],
        recorder: Recorder,
        clock: IReactorTime,
        listener: IConnectionListener,
        budget: int | None = None,
    ) -> None:
        self.where = where
        self._nextMessage = nextMessage
        self._recorder = recorder
        self._clock = clock
        self._listener = listener
        self.remaining = budget
        self.outstanding: deque[tuple[bytes, float]] = deque()
        self._matched = 0
        self._intact = True

    @property
    def canSend(self) -> bool:
        return self.state == OPEN and not self.closing and self.remaining != 0

    def connectionMade(self) -> None:
        self.state = OPEN
        self.transport.setTcpNoDelay(True)
        self._listener.connectionReady(self)

    def send(self, count: int, intended: float) -> int:
        """
        Write up to C{count} messages back to back, all meant for time
        C{intended}; fewer if the budget runs out.

        @return: how many were written.
        """
        if not self.canSend:
            return 0
        if self.remaining is not None:
            count = min(count, self.remaining)
            self.remaining -= count
        messages = [self._nextMessage() for _ in range(count)]
        self.outstanding.extend((message, intended) for message in messages)
        self._recorder.sent(self.where.app, count)
        self.transport.write(b"".join(messages))
        if self.remaining == 0:
            self._listener.budgetSpent(self)
        return count

    def dataReceived(self, data: bytes) -> None:
        view = memoryview(data)
        position = 0
        while position < len(view):
            if not self.outstanding:
                self._recorder.error(self.where.app, self.where.port, UNEXPECTED)
                return
            message, intended = self.outstanding[0]
            chunk = view[position : position + len(message) - self._matched]
            if self._intact and chunk != memoryview(message)[self._matched : self._matched + len(chunk)]:
                self._intact = False
            self._matched += len(chunk)
            position += len(chunk)
            if self._matched == len(message):
                self.outstanding.popleft()
                if self._intact:
                    latency = self._clock.seconds() - intended
                    self._recorder.answered(self.where.app, latency, len(message))
                else:
                    self._recorder.error(self.where.app, self.where.port, MISMATCH)
                self._matched = 0
                self._intact = True
                self._listener.replied(self)

    def close(self, abort: bool = False) -> None:
        """
        End the connection; messages still awaiting a reply are dropped.
        """
        self.closing = True
        self._dropOutstanding()
        if self.state == OPEN:
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    def _dropOutstanding(self) -> None:
        if self.outstanding:
            self._recorder.dropped(self.where.app, len(self.outstanding))
            self.outstanding.clear()
            self._matched = 0
            self._intact = True

    def connectionLost(self, reason: Failure) -> None:
        self.state = CLOSED
        if not self.closing:
            self._recorder.error(self.where.app, self.where.port, describeLoss(reason))
        self._dropOutstanding()
        self._listener.connectionClosed(self)
