"""
Sending a new client to a target: the balancer's order, walked by the
dialer, under each target's C{MaxConnections}, with a queue for the
clients that find every target full.

  - Each target the dialer tries is counted in the app's L{Load} as it is
    dialled, and out again when the dial fails, or, once connected, when
    the connection ends (L{Dispatcher.ended}).  A target at its
    C{MaxConnections} is skipped, as a target that is down is.
  - When every target of a client's order is at its limit, the client
    waits in the app's queue, first come first served, for up to the
    app's C{QueueTimeout} seconds (HAProxy's C{timeout queue}); with 0, the
    default, it is refused at once.  It is served as soon as any target
    frees a slot.  While it waits, the relay holds what it sends as it does
    during any dial (C{PREDIAL_BUFFER}): to the relay, waiting is dialling.
    A client that leaves while queued cancels its dial, which takes it out
    of the queue.
  - A client turned away (at once, or after its wait) ends as one no
    target could take (L{NoTargetAvailable}), each target's reason being
    that it is full: the access log says so.

The queue's length is logged when a client joins it, and is a metric
(C{tcpproxy_queue_length}).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcpproxy.config import Target
from tcpproxy.dialer import Dialled, NoTargetAvailable


def fullReason(target: Target) -> str:
    """
    Why a target at its limit was not tried, for the access log.
    """
    return f"at its MaxConnections ({target.maxConnections})"


class _Walk:
    """
    One client's walk along its order, as the dialer asks for each next
    target: full targets are skipped, the one handed out is counted in the
    L{Load}, and counted out when the next is asked for (it failed).

    @ivar held: the target counted for this client now, or C{None}.
    """

    __slots__ = ("_load", "_order", "_index", "held")

    def __init__(self, load, order: list[Target]) -> None:
        self._load = load
        self._order = order
        self._index = 0
        self.held: Target | None = None

    def __iter__(self) -> _Walk:
        return self

    def __next__(self) -> Target:
        load = self._load
        if self.held is not None:
            load.closed(self.held)
            self.held = None
        order = self._order
        counts = load.counts
        while self._index < len(order):
            target = order[self._index]
            self._index += 1
            limit = target.maxConnections
            if limit is None or counts.get(target, 0) < limit:
                load.opened(target)
                self.held = target
                return target
        raise StopIteration

    def release(self) -> None:
        """
        The dial ended without a connection (it failed or was cancelled):
        count out the target it was dialling.
        """
        if self.held is not None:
            self._load.closed(self.held)
            self.held = None


def _hasRoom(load, order: list[Target]) -> bool:
    counts = load.counts
    for target in order:
        limit = target.maxConnections
        if limit is None or counts.get(target, 0) < limit:
            return True
    return False


class _Queued:
    """
    A client waiting in the queue for a target with a free slot.

    @ivar result: what its relay holds as its dial: fires with a
        L{Dialled}, or fails with L{NoTargetAvailable} when its wait is
        over, or with L{CancelledError} if the client leaves.
    """

    def __init__(self, dispatcher: Dispatcher, protocolFactory: IProtocolFactory, source: str) -> None:
        self.dispatcher = dispatcher
        self.protocolFactory = protocolFactory
        self.source = source
        self.dialling: Deferred[Dialled] | None = None
        self.timer: IDelayedCall | None = None
        self.result: Deferred[Dialled] = Deferred(self._cancel)

    def _cancel(self, result: Deferred[Dialled]) -> None:
        if self.dialling is not None:
            self.dialling.cancel()
            return
        self.dispatcher._leave(self)

    def timedOut(self, waited: float) -> None:
        self.timer = None
        self.dispatcher._leave(self)
        order = self.dispatcher.factory.balancer.order(self.source)
        why = f"for the {waited:g}s the client waited in the queue"
        self.result.errback(NoTargetAvailable([(target, f"{fullReason(target)} {why}") for target in order]))


class Dispatcher:
    """
    Gives an app's new clients their dial (L{dispatch}) and counts their
    connections out (L{ended}); keeps the app's queue.

    It reads the app's current settings, balancer and dialer from its
    factory (a L{tcpproxy.app.ProxyServerFactory}) for each client, so a
    reload applies to the next one; the queue outlives reloads.

    @ivar queue: the clients waiting, oldest first (a dict as an ordered
        set: a client that leaves is taken out in constant time).
    """

    log = Logger()

    def __init__(self, factory) -> None:
        self.factory = factory
        self.queue: dict[_Queued, None] = {}

    def dispatch(self, protocolFactory: IProtocolFactory, source: str) -> Deferred[Dialled]:
        """
        Dial a target for a client from C{source} (its IP address).

        @return: a L{Deferred} as L{tcpproxy.dialer.IDialer.dial}'s: fires
            with a L{Dialled}, fails with L{NoTargetAvailable}; cancelling it
            abandons the dial or the wait.
        """
        factory = self.factory
        balancer = factory.balancer
        if balancer.limited or self.queue:
            order = balancer.order(source)
            if self.queue or not _hasRoom(balancer.load, order):
                return self._full(protocolFactory, source, order)
            return self._dial(protocolFactory, order)
        return self._dial(protocolFactory, balancer.order(source))

    def _dial(self, protocolFactory: IProtocolFactory, order: list[Target]) -> Deferred[Dialled]:
        balancer = self.factory.balancer
        walk = _Walk(balancer.load, order)
        d = self.factory.dialer.dial(protocolFactory, walk)
        scaler = self.factory.scaler
        if scaler is not None:
            # No running target took the client: wake a stopped one.
            d = scaler.dialled(d, protocolFactory)
        if balancer.limited or self.queue:
            # A target that failed on the way freed a slot too.
            d.addBoth(self._settled, walk)
        else:
            d.addErrback(self._dialFailed, walk)
        return d

    @staticmethod
    def _dialFailed(reason: Failure, walk: _Walk) -> Failure:
        walk.release()
        return reason

    def _settled(self, result, walk: _Walk):
        if isinstance(result, Failure):
            walk.release()
        if self.queue:
            self._wake()
        return result

    def _full(self, protocolFactory: IProtocolFactory, source: str, order: list[Target]) -> Deferred[Dialled]:
        """
        Every target of C{order} is at its limit (or others wait already):
        queue the client, or refuse it if the app has no C{QueueTimeout}.
        """
        app = self.factory.app
        scaler = self.factory.scaler
        if scaler is not None and scaler.wakeable():
            # A stopped target takes it rather than the queue (scale to zero).
            return scaler.wake(protocolFactory, [(target, fullReason(target)) for target in order])
        if not app.queueTimeout:
            failures = [(target, fullReason(target)) for target in order]
            return _failed(NoTargetAvailable(failures))
        queued = _Queued(self, protocolFactory, source)
        self.queue[queued] = None
        queued.timer = self.factory.clock.callLater(app.queueTimeout, queued.timedOut, app.queueTimeout)
        self.log.info(
            "app {app}: every target is at its MaxConnections: a client waits, {length} in the queue",
            app=app.name,
            length=len(self.queue),
        )
        if len(self.queue) == 1 and _hasRoom(self.factory.balancer.load, order):
            # Only the queue held it back, and the queue was itself
            # waiting for a wake-up: serve it now.
            self._wake()
        return queued.result

    def _leave(self, queued: _Queued) -> None:
        self.queue.pop(queued, None)
        if queued.timer is not None and queued.timer.active():
            queued.timer.cancel()
        queued.timer = None

    def _wake(self) -> None:
        """
        Serve the clients at the head of the queue while a target of
        theirs has a free slot.
        """
        queue = self.queue
        balancer = self.factory.balancer
        while queue:
            queued = next(iter(queue))
            order = balancer.order(queued.source)
            if not _hasRoom(balancer.load, order):
                return
            self._leave(queued)
            d = queued.dialling = self._dial(queued.protocolFactory, order)
            d.addBoth(self._served, queued)

    @staticmethod
    def _served(result, queued: _Queued) -> None:
        queued.dialling = None
        if queued.result.called:
            # Cancelled: the client left while its dial was under way.
            return None
        if isinstance(result, Failure):
            queued.result.errback(result)
        else:
            queued.result.callback(result)
        return None

    def ended(self, target: Target) -> None:
        """
        A connection to C{target} (counted when it was dialled) has ended:
        count it out, and serve whoever waits for the slot.
        """
        self.factory.balancer.load.closed(target)
        scaler = self.factory.scaler
        if scaler is not None:
            scaler.ended(target)
        if self.queue:
            self._wake()

    def changed(self) -> None:
        """
        The app's settings changed (a reload): a raised limit, or a new
        target, may serve those who wait.
        """
        if self.queue:
            self._wake()


def _failed(exception: Exception) -> Deferred[Dialled]:
    d: Deferred[Dialled] = Deferred()
    d.errback(exception)
    return d
