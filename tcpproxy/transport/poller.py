"""
Readiness for the fast engine's transports (L{tcpproxy.transport.tcp}): an
epoll set of its own, watched by the reactor as one reader.

Why not register each socket with the reactor: every readiness event a
reactor delivers goes through C{callWithLogger} and a log context, and every
change of interest through the reactor's bookkeeping of readers and writers
-- about a sixth of the relay's time for small messages.  Here the reactor
sees a single file descriptor (the inner epoll's, readable whenever one of
its sockets is ready) and this module hands each ready socket's events to its
handler directly.  Timers, signals, logging and the other apps' Twisted
transports stay the reactor's.
"""

from __future__ import annotations

import select
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

AVAILABLE = hasattr(select, "epoll")
"""
Whether this platform has epoll (Linux); without it there is no fast engine
and every connection runs on Twisted's own transports.
"""

READ = getattr(select, "EPOLLIN", 1)
WRITE = getattr(select, "EPOLLOUT", 4)
GONE = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)
"""
Error or hang-up: reported whatever the interest.
"""

BATCH = 512
"""
Events handled per turn of the reactor at most; more wait for the next turn,
so that timers and other readers are not starved under load.
"""


@implementer(IReadDescriptor)
class Poller:
    """
    An inner epoll set, one reader of the reactor's.

    A handler is called with the epoll event mask of its descriptor.  Interest
    is level-triggered, as the reactor's own: a handler that leaves data
    unread is called again on the next turn.  Error and hang-up are reported
    whatever the interest, so a descriptor with nothing left to wait for must
    be removed (L{unregister}), not set to an empty interest, unless its
    handler wants exactly those (a client watched while its target is dialled).
    """

    log = Logger()

    def __init__(self, reactor: IReactorFDSet) -> None:
        self._reactor = reactor
        self._epoll = select.epoll()
        # Indexed by descriptor number: descriptors are small numbers that
        # the kernel hands out lowest first, so a list holds a handler in 8
        # bytes (and no number object), where a dictionary took about 37
        # bytes and the key's own int object: with two descriptors per
        # relayed connection, about 100 bytes less for every idle one.
        # C{None} where no handler is.
        self._handlers: list[Callable[[int], None] | None] = []
        self._stale: set[int] = set()
        self._soon: list[tuple[Callable, tuple]] = []
        self._inBatch = False
        self._soonCall = None
        reactor.addReader(self)

    def soon(self, f: Callable, *args) -> None:
        """
        Call C{f(*args)} once the events being handled are done (or on the
        reactor's next turn, outside a batch): what a transport must not do
        from inside a call its protocol made, such as C{connectionLost}
        from C{loseConnection}, without a L{DelayedCall} each.
        """
        self._soon.append((f, args))
        if not self._inBatch and self._soonCall is None:
            self._soonCall = self._reactor.callLater(0, self._runSoon)

    def _runSoon(self) -> None:
        self._soonCall = None
        inBatch, self._inBatch = self._inBatch, True
        try:
            while self._soon:
                calls, self._soon = self._soon, []
                for f, args in calls:
                    try:
                        f(*args)
                    except Exception:
                        self.log.failure("closing a connection failed")
        finally:
            self._inBatch = inBatch

    def register(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self._epoll.register(fd, events)
        try:
            self._handlers[fd] = handler
        except IndexError:
            # A number higher than any before: grow the table to it (lists
            # over-allocate, so this is rare).
            self._handlers.extend([None] * (fd + 1 - len(self._handlers)))
            self._handlers[fd] = handler

    def modify(self, fd: int, events: int, handler: Callable[[int], None] | None = None) -> None:
        self._epoll.modify(fd, events)
        if handler is not None:
            self._handlers[fd] = handler

    def handOver(self, fd: int, handler: Callable[[int], None]) -> None:
        """
        Give C{fd}'s events, with the interest it has, to another handler.
        """
        self._handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        self._handlers[fd] = None
        self._stale.add(fd)
        self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """
        Drop C{fd}'s handler, for a descriptor about to be closed: closing
        it takes it out of the epoll set (a system call saved), as long as
        no duplicate of it is open.
        """
        self._handlers[fd] = None
        self._stale.add(fd)

    def __len__(self) -> int:
        """
        The descriptors watched, counted when asked (for tests and
        diagnostics): no count kept up to date on every connection.
        """
        return sum(handler is not None for handler in self._handlers)

    def close(self) -> None:
        """
        Stop being watched by the reactor; the handlers left are forgotten.
        The calls asked for with L{soon} run first: they are closes already
        decided (an aborted connection's C{connectionLost}), as the reactor
        still runs those of Twisted's own transports.
        """
        call, self._soonCall = self._soonCall, None
        if call is not None and call.active():
            call.cancel()
        if self._soon:
            self._runSoon()
        self._reactor.removeReader(self)
        self._handlers.clear()
        self._epoll.close()
        if self._soonCall is not None and self._soonCall.active():
            self._soonCall.cancel()
        self._soonCall = None

    # IReadDescriptor

    def fileno(self) -> int:
        return self._epoll.fileno() if not self._epoll.closed else -1

    def doRead(self) -> None:
        handlers = self._handlers
        # Descriptors dropped by a handler of this batch: a later event of the
        # batch for the same number is the old socket's, even if a new socket
        # got that number meanwhile (its own readiness comes next turn).
        stale = self._stale = set()
        self._inBatch = True
        try:
            for fd, events in self._epoll.poll(0, BATCH):
                if fd in stale:
                    continue
                # Every descriptor in the epoll set was registered, so its
                # number is within the table.
                handler = handlers[fd]
                if handler is None:
                    continue
                try:
                    handler(events)
                except Exception:
                    # A bug, not a network event: drop that connection, not the proxy.
                    self.log.failure("connection handler failed; dropping its connection")
                    # The object the handler is a method of, or the handler
                    # itself (a transport is its own handler).
                    owner = getattr(handler, "__self__", handler)
                    abort = getattr(owner, "abortConnection", None)
                    if abort is not None:
                        try:
                            abort()
                        except Exception:
                            self.log.failure("dropping the connection failed too")
        finally:
            self._inBatch = False
        if self._soon:
            self._runSoon()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped its readers (it is stopping).
        pass

    def logPrefix(self) -> str:
        return "tcpproxy"
