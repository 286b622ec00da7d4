"""
The channel between the main process and its workers (C{--workers N}):
L{AMP <twisted.protocols.amp>} commands over a Unix socket pair, one per
worker.

A Unix socket rather than a pipe, so that a listening socket the main
process binds on a reload reaches every worker as a descriptor
(L{amp.Descriptor}, C{SCM_RIGHTS}).  AMP carries each command and its
answer as one box of bounded values (64 KiB each): what may be longer (a
worker's C{/metrics} text, its C{/status}) is fetched in chunks (L{Fetch}).

The commands, all sent by the main process:

  - L{AdoptPort}: a listening socket, bound by the main process, for the
    next reload.
  - L{ConfigChunk}, then L{Reload}: apply the configuration file's bytes
    as the main process read and checked them (a worker never reads the
    file itself: one edited meanwhile, or left invalid, cannot make the
    workers differ).
  - L{Fetch}: the worker's metrics or status, a chunk at a time.
  - L{SetTargetState}: drain a target, or put it back (the admin
    endpoint's target control, applied by every worker).

Stopping is a signal (C{SIGTERM}), not a command: it works the same when
an operator sends it to a worker directly.
"""

from __future__ import annotations

from twisted.protocols import amp

CHUNK = 60_000
"""
Bytes of a L{Fetch} answer at most: below AMP's 64 KiB per value.
"""


class AdoptPort(amp.Command):
    """
    Here is a listening socket on C{address}:C{port}, bound by the main
    process: take it for the next reload that adds this port (or moves
    every port to this address).
    """

    arguments = [
        (b"address", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"socket", amp.Descriptor()),
    ]
    response: list = []


class ConfigChunk(amp.Command):
    """
    The next L{CHUNK} bytes (at most) of the configuration file for the
    next L{Reload}.
    """

    arguments = [(b"data", amp.String())]
    response: list = []


class Reload(amp.Command):
    """
    Apply the configuration file's bytes sent by L{ConfigChunk} since the
    last reload, as C{SIGHUP} does to one process; answer how it went (a
    L{tcpproxy.applying} status).
    """

    arguments: list = []
    response = [(b"status", amp.Unicode())]


class Fetch(amp.Command):
    """
    A chunk of the worker's C{metrics} (Prometheus text) or C{status}
    (JSON), from byte C{offset}.

    The document is made when C{offset} is 0, and kept, under the C{token}
    answered, until its last chunk is fetched: the chunks of one document
    are consistent whatever the worker does in between.
    """

    arguments = [
        (b"what", amp.Unicode()),
        (b"token", amp.Integer()),
        (b"offset", amp.Integer()),
    ]
    response = [
        (b"token", amp.Integer()),
        (b"chunk", amp.String()),
        (b"total", amp.Integer()),
    ]


class UnknownTarget(Exception):
    """
    The worker has no such app, or the app no such target.
    """


class SetTargetState(amp.Command):
    """
    Drain C{target} of C{app} (C{action} C{"drain"}) or put it back
    (C{"ready"}), as the admin endpoint does (L{tcpproxy.health}).
    """

    arguments = [
        (b"app", amp.Unicode()),
        (b"target", amp.Unicode()),
        (b"action", amp.Unicode()),
        (b"why", amp.Unicode()),
    ]
    response = [(b"state", amp.Unicode()), (b"changed", amp.Boolean())]
    errors = {UnknownTarget: b"UNKNOWN_TARGET"}


class QuietAMP(amp.AMP):
    """
    AMP that does not log its connection's start and end: the control
    channel of a worker is logged as the worker (started, ended), and two
    more lines per worker would only be noise.
    """

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
