"""
A delay line for tests and the bench: a target "5 ms away" on loopback.

netem is missing from this project's kernels, so the delay is made here,
in two parts that together cost what a real path of C{oneWay} seconds
each way costs:

  - L{DelayedConnect}: an endpoint whose connect starts one round trip
    (C{2 * oneWay}) late, as a TCP handshake takes a round trip before
    the connection can carry anything;
  - L{DelayLine}: a relay in front of the target that holds every chunk
    C{oneWay} seconds in each direction (and an end the same).

A client-first request through a new connection then costs two round
trips (handshake, then request and answer), and one through a connection
opened in advance costs one: what the warm pool saves.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from zope.interface import implementer


class _Direction:
    """
    Bytes on their way to one side, each chunk delivered C{delay} seconds
    after it was sent, in order; C{None} in the queue is the end.
    """

    def __init__(self, clock: IReactorTime, delay: float) -> None:
        self.clock = clock
        self.delay = delay
        self.queue: deque = deque()
        self.transport = None
        self.due: deque = deque()

    def send(self, data: bytes | None) -> None:
        self.due.append(data)
        self.clock.callLater(self.delay, self._arrive)

    def _arrive(self) -> None:
        self.queue.append(self.due.popleft())
        self.flush()

    @property
    def idle(self) -> bool:
        return not self.due

    def flush(self) -> None:
        if self.transport is None:
            return
        while self.queue:
            data = self.queue.popleft()
            if data is None:
                self.transport.loseConnection()
            else:
                self.transport.write(data)


class _Side(Protocol):
    def __init__(self, line: DelayLine, inbound: _Direction, outbound: _Direction) -> None:
        self.line = line
        self.inbound = inbound
        self.outbound = outbound

    def connectionMade(self) -> None:
        self.line.open += 1
        self.inbound.transport = self.transport
        self.inbound.flush()

    def dataReceived(self, data: bytes) -> None:
        self.outbound.send(data)

    def connectionLost(self, reason) -> None:
        self.line.open -= 1
        self.inbound.transport = None
        self.outbound.send(None)
        self.line.directions.update((self.inbound, self.outbound))


class DelayLine(Factory):
    """
    Accepts connections and relays each to C{127.0.0.1:port}, every chunk
    held C{oneWay} seconds each way.

    @ivar open: its connections open now, both sides counted (a test
        waits for none before it ends).
    """

    noisy = False

    def __init__(self, reactor, port: int, oneWay: float, connectLate: bool = False) -> None:
        """
        @param connectLate: connect to the target C{oneWay} seconds after a
            connection is accepted (when a SYN would reach it), so that a
            server-first greeting arrives one round trip after the connect
            began, as over a real path, even through an endpoint that does
            not delay its connect (the real C{twistd} process's).
        """
        self.reactor = reactor
        self.port = port
        self.oneWay = oneWay
        self.connectLate = connectLate
        self.open = 0
        self.directions: set[_Direction] = set()

    def closed(self) -> bool:
        """
        Whether every connection through the line is closed, and nothing
        of theirs is still on its way.
        """
        return self.open == 0 and all(direction.idle for direction in self.directions)

    def buildProtocol(self, addr) -> _Side:
        toClient = _Direction(self.reactor, self.oneWay)
        toTarget = _Direction(self.reactor, self.oneWay)
        near = _Side(self, toClient, toTarget)
        upstream = ClientFactory()
        upstream.noisy = False
        upstream.protocol = lambda: _Side(self, toTarget, toClient)
        delay = self.oneWay if self.connectLate else 0
        self.reactor.callLater(delay, self.reactor.connectTCP, "127.0.0.1", self.port, upstream)
        return near


@implementer(IStreamClientEndpoint)
class DelayedConnect:
    """
    An endpoint whose connect starts C{roundTrip} seconds late: the time
    a TCP handshake over the delayed path takes.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, clock: IReactorTime, roundTrip: float) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.roundTrip = roundTrip

    def connect(self, protocolFactory) -> Deferred:
        d: Deferred = Deferred()

        def start() -> None:
            self.endpoint.connect(protocolFactory).chainDeferred(d)

        self.clock.callLater(self.roundTrip, start)
        return d
