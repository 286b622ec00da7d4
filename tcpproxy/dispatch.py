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
  - With scale to zero (L{tcpproxy.scaling}), a client that no running
    target takes (every one full, or failed) wakes a stopped target
    instead, and is given to it if it has room.  A client the woken
    targets could not take either because they are full in turn waits in
    the queue as above (once: a client served from the queue is not
    queued again).  Clients that wait in the queue wake a stopped target
    too: whenever the targets change (one stopped or woken, a reload)
    and some still wait, the first stopped target is woken for them
    (L{tcpproxy.scaling.ScaleToZero.wakeOne}), and they are served from
    the queue once it is up.

The queue's length is logged when a client joins it, and is a metric
(C{tcpproxy_queue_length}).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def hasRoom(load, order: Sequence[Target]) -> bool:
    """
    Whether a target of C{order} is below its C{MaxConnections} in C{load}
    (a L{tcpproxy.balancer.Load}).
    """
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
    @ivar earlier: why targets did not take it before it was queued (a
        stopped target woken for it that failed to start, say), for the
        log if its wait is in vain.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        protocolFactory: IProtocolFactory,
        source: str,
        earlier: Sequence[tuple[Target, str]] = (),
    ) -> None:
        self.dispatcher = dispatcher
        self.protocolFactory = protocolFactory
        self.source = source
        self.earlier = earlier
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
        failures = [(target, f"{fullReason(target)} {why}") for target in order]
        failures += [(target, reason) for target, reason in self.earlier if target not in order]
        self.result.errback(NoTargetAvailable(failures))


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
            if self.queue or not hasRoom(balancer.load, order):
                return self._full(protocolFactory, source, order)
            return self._dial(protocolFactory, order, source)
        return self._dial(protocolFactory, balancer.order(source), source)

    def _dial(
        self, protocolFactory: IProtocolFactory, order: list[Target], source: str | None
    ) -> Deferred[Dialled]:
        """
        Dial the first target of C{order} that has room and answers; with
        scale to zero, wake a stopped one if none does.

        @param source: the client's IP address, or C{None} for a client
            served from the queue (it is not queued again).
        """
        balancer = self.factory.balancer
        walk = _Walk(balancer.load, order)
        d = self.factory.dialer.dial(protocolFactory, walk)
        if self.factory.scaler is not None:
            d.addErrback(self._noneRunning, protocolFactory, source, order)
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
        wake a stopped target (scale to zero), else queue the client, or
        refuse it if the app has no C{QueueTimeout}.
        """
        failures = [(target, fullReason(target)) for target in order]
        scaler = self.factory.scaler
        if scaler is not None and scaler.wakeable():
            # A stopped target takes it rather than the queue.
            return self._woken(scaler.wake(protocolFactory, failures), protocolFactory, source, order)
        if not self.factory.app.queueTimeout:
            return _failed(NoTargetAvailable(failures))
        return self._enqueue(protocolFactory, source)

    def _noneRunning(self, reason: Failure, protocolFactory: IProtocolFactory, source: str | None, order):
        """
        No running target took the client (C{reason}): wake a stopped one,
        if any (scale to zero).
        """
        reason.trap(NoTargetAvailable)
        scaler = self.factory.scaler
        if scaler is None or not scaler.wakeable():
            return reason
        woken = scaler.wake(protocolFactory, reason.value.failures)
        return self._woken(woken, protocolFactory, source, order)

    def _woken(
        self, d: Deferred[Dialled], protocolFactory: IProtocolFactory, source: str | None, order: list[Target]
    ) -> Deferred[Dialled]:
        """
        C{d}, a client's wake-up of stopped targets
        (L{tcpproxy.scaling.ScaleToZero.wake}); if none could take it and
        a target it could have is at its limit, the client waits in the
        queue for a slot, as one finding every running target full does
        (unless it was served from the queue already: C{source} is C{None}).
        """
        if source is not None:
            d.addErrback(self._unplaced, protocolFactory, source, order)
        return d

    def _unplaced(self, reason: Failure, protocolFactory: IProtocolFactory, source: str, order: list[Target]):
        reason.trap(NoTargetAvailable)
        if not self.factory.app.queueTimeout:
            return reason
        load = self.factory.balancer.load
        failures = reason.value.failures
        if all(hasRoom(load, (target,)) for target in (*order, *(target for target, _ in failures))):
            return reason  # nothing it waits for would free a slot: every target failed
        return self._enqueue(protocolFactory, source, failures)

    def _enqueue(
        self, protocolFactory: IProtocolFactory, source: str, earlier: Sequence[tuple[Target, str]] = ()
    ) -> Deferred[Dialled]:
        """
        Queue a client for up to the app's C{QueueTimeout} seconds.

        @param earlier: why targets did not take it before (for the log,
            should its wait be in vain).
        """
        app = self.factory.app
        queued = _Queued(self, protocolFactory, source, earlier)
        self.queue[queued] = None
        queued.timer = self.factory.clock.callLater(app.queueTimeout, queued.timedOut, app.queueTimeout)
        self.log.info(
            "app {app}: every target is at its MaxConnections: a client waits, {length} in the queue",
            app=app.name,
            length=len(self.queue),
        )
        if len(self.queue) == 1:
            # A slot that freed while no one waited served no one: if the
            # queue (or a wake-up) was all that held this client back,
            # serve it now.
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
            if not hasRoom(balancer.load, order):
                return
            self._leave(queued)
            d = queued.dialling = self._dial(queued.protocolFactory, order, None)
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
        The app's targets changed (a reload, or, with scale to zero, a
        target stopped or woken): a raised limit, or a new target, may
        serve those who wait; if some still wait, a stopped target is
        woken for them.
        """
        if not self.queue:
            return
        self._wake()
        scaler = self.factory.scaler
        if self.queue and scaler is not None:
            scaler.wakeOne()


def _failed(exception: Exception) -> Deferred[Dialled]:
    d: Deferred[Dialled] = Deferred()
    d.errback(exception)
    return d
