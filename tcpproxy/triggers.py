"""
What starts a configuration reload: C{SIGHUP}, and (with C{--watch}) a
change of the configuration file.

A trigger knows nothing of configurations: it is started with a callable
(L{tcpproxy.service.ProxyService.reload}) and calls it, in the reactor
thread, whenever its event happens; it is stopped with the service.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer


class IReloadTrigger(Interface):
    """
    Something that asks for a reload now and then.
    """

    def start(reload: Callable[[], object]) -> None:
        """
        From now on, call C{reload()} (in the reactor thread) on each event.
        """

    def stop() -> None:
        """
        Call C{reload} no more, and undo what L{start} set up.
        """


class EarlySignal:
    """
    Catch a signal from the first moment of start-up until a
    L{ReloadOnSignal} takes it over.

    Without a handler, C{SIGHUP} ends the process; C{twistd} installs none,
    and the reload handler can only be installed once the service starts,
    after the configuration is read, the ports bound, logging set up (and,
    for a daemon, the fork).  A C{SIGHUP} in between (C{systemctl reload}
    right after C{start}) would kill the proxy.  This handler only notes
    that one came; the L{ReloadOnSignal} given this object reloads once for
    it, as soon as the proxy serves.

    @ivar pending: a signal came that nobody has acted on yet.
    """

    def __init__(self, signum: int = signal.SIGHUP) -> None:
        self.signum = signum
        self.pending = False
        self._previous = signal.signal(signum, self._received)

    def _received(self, signum: int, frame: object) -> None:
        self.pending = True

    def take(self) -> bool:
        """
        Whether a signal came since the last call (or since start-up).
        """
        pending, self.pending = self.pending, False
        return pending

    def release(self) -> None:
        """
        Put back the handler this one replaced (start-up failed: nobody
        will take the signal over).
        """
        if signal.getsignal(self.signum) == self._received:
            signal.signal(self.signum, signal.SIG_DFL if self._previous is None else self._previous)


@implementer(IReloadTrigger)
class ReloadOnSignal:
    """
    Reload when the process receives a signal (C{SIGHUP}, by convention).

    C{twistd} installs no C{SIGHUP} handler of its own (without one the
    signal would end the process), so this one is installed at start and the
    one it replaced is put back at stop.  The handler only passes the event
    to the reactor with C{callFromThread}, the one reactor call that is safe
    from a signal handler: the handler may run between any two bytecodes of
    the reactor's own work.

    Given an L{EarlySignal}, a signal that came during start-up is acted on
    once, when this trigger starts: the file is then reloaded as if the
    signal came now.
    """

    log = Logger()

    def __init__(
        self, reactor: IReactorFromThreads, signum: int = signal.SIGHUP, early: EarlySignal | None = None
    ) -> None:
        self._reactor = reactor
        self._signum = signum
        self._early = early
        self._reload: Callable[[], object] | None = None
        self._previous = None

    def start(self, reload: Callable[[], object]) -> None:
        self._reload = reload
        self._previous = signal.signal(self._signum, self._received)
        if self._early is not None and self._early.take():
            self.log.info(
                "{signal} received during start-up: reloading the configuration now",
                signal=signal.Signals(self._signum).name,
            )
            self._reactor.callFromThread(reload)

    def _received(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._reload)

    def stop(self) -> None:
        if self._reload is None:
            return
        # Put the old handler back only if ours is still in place: whoever
        # replaced ours meanwhile keeps theirs.
        if signal.getsignal(self._signum) == self._received:
            previous = self._previous
            signal.signal(self._signum, signal.SIG_DFL if previous is None else previous)
        self._reload = self._previous = None


def fileSignature(path: str) -> tuple:
    """
    What identifies one version of the file at C{path}: a file replaced (an
    editor's rename), rewritten or touched gets a different signature; a
    missing or unreadable file has one too, so its return is noticed.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return ("unreadable", e.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@implementer(IReloadTrigger)
class ReloadOnChange:
    """
    Reload when the configuration file changes (C{--watch}).

    The file is polled -- C{stat} every C{interval} seconds -- rather than
    watched with inotify: no dependency, the same on every platform, and a
    check a second costs nothing.  Each version of the file is reloaded
    once: an invalid one is reported once (by the reload) and waited on
    until it changes again.

    @ivar interval: seconds between two checks.
    """

    log = Logger()

    def __init__(
        self, path: str, clock: IReactorTime, interval: float = 1.0, seen: tuple | None = None
    ) -> None:
        """
        @param seen: the L{fileSignature} of the version that runs, taken
            before it was read; by default the file is taken as it is at
            L{start}.  Pass it when the service starts well after the file
            was read (C{twistd} forks, writes its pidfile, starts logging in
            between): an edit made meanwhile is then reloaded, not missed.
        """
        self.path = path
        self.interval = interval
        self._clock = clock
        self._seen = seen
        self._reload: Callable[[], object] | None = None
        self._call: LoopingCall | None = None

    def start(self, reload: Callable[[], object]) -> None:
        self._reload = reload
        if self._seen is None:
            self._seen = fileSignature(self.path)
        self._call = LoopingCall(self._check)
        self._call.clock = self._clock
        self._call.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("watching {path} stopped", f, path=self.path)
        )

    def _check(self) -> None:
        seen = fileSignature(self.path)
        if seen != self._seen:
            self._seen = seen
            self._reload()

    def stop(self) -> None:
        if self._call is not None and self._call.running:
            self._call.stop()
        self._call = self._reload = None
