"""
The plain-TCP fast path: relay an app's clients on bare sockets, with the
reactor used only for readiness (through L{tcpproxy.poller}).

Twisted's transports cost, per connection, a transport object per side, a
protocol per side, Deferreds and an endpoint for the dial, a L{Failure} at
close; and per chunk, a loop turn and two C{epoll_ctl} calls through the
reactor's bookkeeping.  For an app that needs none of what they bring --
no TLS on either side, no bandwidth limit, targets given as IP addresses
(a hostname needs Twisted's resolver) -- this module does the same work with
a handful of system calls:

  - The listening port hands the accepted socket over (L{SocketPort}); the
    app's limits admit it as for any client (L{ProxyServerFactory.admit}).
  - The targets are dialled in the balancer's order with non-blocking
    C{connect}, each attempt bounded by the app's C{ConnectTimeout}; a failed
    attempt is told to the health tracker and the next target is tried.
    The client is not read while its target is dialled: what it sends waits
    in the kernel, and a client that resets is seen (error and hang-up are
    reported for it) and ends the dial.
  - Each direction (a L{_Flow}) reads a chunk and sends it on at once.  What
    the receiver does not take is kept (one chunk at most) and reading that
    direction stops until it is sent: backpressure, with memory bounded by
    one chunk per direction.  A direction that keeps reading full chunks
    (bulk) switches to C{splice} through a pipe of its own: the bytes go from
    socket to socket inside the kernel, and the pipe is the bounded buffer.
  - EOF from one side is passed on with C{shutdown(SHUT_WR)} once what is in
    flight has been sent; the pair closes once both directions are done.  A
    side that fails closes at once; the other is closed once what it was
    owed has been sent (or when the drain or idle timeout aborts it).

What does not change with the path: the app's factory keeps the open
connections (drain, abort), counts them (limits), sweeps them for idleness,
and writes the access-log line (L{ProxyServerFactory.relayEnded}).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections import OrderedDict

from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from zope.interface import implementer

from tcpproxy.config import IPV4, IPV6, AppConfig, hostPort
from tcpproxy.dialer import OWN_ERRORS, describeError
from tcpproxy.poller import AVAILABLE, GONE, READ, WRITE, Poller
from tcpproxy.relay import (
    END_ABORTED,
    END_CLIENT_LEFT,
    END_CLIENT_LOST,
    END_IDLE,
    END_NO_TARGET,
    END_TARGET_LOST,
    LINGER,
    PREDIAL_BUFFER,
    IRelayed,
    ProxyServerFactory,
)

CHUNK = 64 * 1024
"""
Bytes read at once in copy mode: Twisted's own read size.
"""

SPLICE = AVAILABLE and hasattr(os, "splice")
PIPE_SIZE = 256 * 1024
"""
The pipe a spliced direction asks for (the kernel may give less); it bounds
what that direction holds, in the kernel, when the receiver is slow.
"""
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_WOULD_BLOCK = (BlockingIOError, InterruptedError)
_RESET = struct.pack("ii", 1, 0)
"""
C{SO_LINGER} on, with no time to linger: the close sends a reset.
"""


def canRelay(app: AppConfig) -> bool:
    """
    Whether the fast path can relay C{app}'s clients: plain TCP both ways,
    nothing that must see the bytes, targets that need no name resolution.
    """
    return (
        AVAILABLE
        and app.tls is None
        and app.targetTLS is None
        and not app.bandwidthLimit
        and all(target.kind in (IPV4, IPV6) for target in app.targets)
    )


class FastPath:
    """
    Relays the clients of the apps that L{canRelay}, for one service.

    @ivar poller: the L{Poller} while started, else C{None}.
    @ivar deadlines: the connect deadlines of the dials under way.
    """

    def __init__(self, reactor: IReactorFDSet) -> None:
        self._reactor = reactor
        self.poller: Poller | None = None
        self.deadlines = Deadlines(reactor)

    def start(self) -> None:
        if self.poller is None:
            self.poller = Poller(self._reactor)

    def stop(self) -> None:
        """
        Stop watching sockets; only once no relay is left (the service
        calls this after its drain).
        """
        if self.poller is not None:
            self.poller.close()
            self.poller = None

    def relay(self, factory: ProxyServerFactory, sock: socket.socket, address: tuple, port: int) -> None:
        """
        Relay a client accepted on C{port}, one of C{factory}'s app's ports.
        """
        FastRelay(self, factory, sock, address, port)


class Deadlines:
    """
    Calls C{timedOut()} on each item added with a timeout that has not been
    removed within it, with one timer for all.

    A L{DelayedCall} per dial, made and then cancelled as the target answers
    within a millisecond (as nearly all do), is a good part of what a short
    connection costs when many are dialled at once.  Items added with the same timeout expire in the order
    they were added, so each timeout keeps its items in that order and only
    the oldest is looked at; the one timer is set for the earliest of those,
    and when it finds that item gone it is set for the next one.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queues: dict[float, OrderedDict[object, float]] = {}
        self._call: IDelayedCall | None = None
        self._when = 0.0

    def __len__(self) -> int:
        return sum(map(len, self._queues.values()))

    def add(self, item, timeout: float) -> None:
        deadline = self._clock.seconds() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = OrderedDict()
        queue[item] = deadline
        if self._call is None or deadline < self._when:
            self._schedule(deadline)

    def remove(self, item, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is not None:
            queue.pop(item, None)
            if not queue:
                del self._queues[timeout]
                if not self._queues and self._call is not None:
                    # Nothing left to time out: no timer left behind.
                    self._call.cancel()
                    self._call = None

    def _schedule(self, when: float) -> None:
        if self._call is not None:
            self._call.cancel()
        self._when = when
        self._call = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._expire)

    def _expire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        expired = []
        earliest = None
        for timeout, queue in list(self._queues.items()):
            while queue:
                item, deadline = next(iter(queue.items()))
                if deadline > now:
                    earliest = deadline if earliest is None else min(earliest, deadline)
                    break
                del queue[item]
                expired.append(item)
            if not queue:
                del self._queues[timeout]
        if earliest is not None:
            self._schedule(earliest)
        for item in expired:
            item.timedOut()


class _Flow:
    """
    One direction of a relayed pair: bytes read from C{src}, sent to C{dst}.

    @ivar data: what C{dst} has not taken yet (copy mode), or C{None}.
    @ivar pipe: C{(read end, write end)} once spliced, else C{None}.
    @ivar inPipe: bytes in the pipe not yet sent to C{dst}.
    @ivar eof: C{src} sent EOF.
    @ivar shut: C{dst} was shut for writing (EOF passed on).
    @ivar count: bytes read from C{src}.
    @ivar srcLost: how the pair ends if C{src} fails; C{dstLost} likewise.
    @ivar peer: the flow the other way.
    @ivar discarding: C{dst} is gone and C{src} is closing: what C{src}
        still sends is read and dropped until its EOF (see
        L{FastRelay._update}).
    """

    __slots__ = (
        "src",
        "dst",
        "peer",
        "data",
        "pipe",
        "inPipe",
        "eof",
        "shut",
        "count",
        "srcLost",
        "dstLost",
        "discarding",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, srcLost: str, dstLost: str) -> None:
        self.src = src
        self.dst = dst
        self.peer: _Flow | None = None
        self.discarding = False
        self.srcLost = srcLost
        self.dstLost = dstLost
        self.data = None
        self.pipe = None
        self.inPipe = 0
        self.eof = False
        self.shut = False
        self.count = 0

    def settled(self) -> bool:
        """
        Whether nothing read from C{src} is left to send to C{dst}.
        """
        return self.data is None and not self.inPipe

    def pull(self) -> str | None:
        """
        C{src} is readable: read a chunk and send it on.

        @return: how the pair ends if a side failed, else C{None}.
        """
        if self.discarding:
            return self._discard()
        if self.pipe is not None:
            return self._splicePull()
        try:
            data = self.src.recv(CHUNK)
        except _WOULD_BLOCK:
            return None
        except OSError:
            return self.srcLost
        if not data:
            self.eof = True
            return self.passEOF()
        size = len(data)
        self.count += size
        try:
            sent = self.dst.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError:
            return self.dstLost
        if sent < size:
            self.data = memoryview(data)[sent:]
        elif size == CHUNK and SPLICE:
            self._startSplice()
        return None

    def _discard(self) -> None:
        try:
            if self.src.recv(CHUNK):
                return None
        except _WOULD_BLOCK:
            return None
        except OSError:
            pass
        self.eof = True
        return None

    def push(self) -> str | None:
        """
        C{dst} is writable: send what it did not take before.
        """
        if self.pipe is not None:
            return self._splicePush()
        data = self.data
        try:
            sent = self.dst.send(data)
        except _WOULD_BLOCK:
            return None
        except OSError:
            return self.dstLost
        if sent < len(data):
            self.data = data[sent:]
            return None
        self.data = None
        return self.passEOF() if self.eof else None

    def passEOF(self) -> str | None:
        """
        After C{src}'s EOF: shut C{dst} for writing once nothing is left to
        send to it.
        """
        if self.shut or not self.settled():
            return None
        self.shut = True
        if self.peer.shut:
            # The other way is done too: the pair is closed next, and the
            # close sends this FIN (nothing is left unread on that socket,
            # whose EOF was read), one system call fewer per connection.
            return None
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            return self.dstLost
        return None

    def _startSplice(self) -> None:
        """
        Bulk: from now on, move this direction's bytes with C{splice}.
        """
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors: copying works as well
        try:
            fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the user's pipe budget: the default size works too
        self.pipe = pipe

    def _splicePull(self) -> str | None:
        try:
            size = os.splice(self.src.fileno(), self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except _WOULD_BLOCK:
            return None
        except OSError:
            return self.srcLost
        if not size:
            self.eof = True
            return self.passEOF()
        self.count += size
        self.inPipe = size
        return self._splicePush()

    def _splicePush(self) -> str | None:
        try:
            while self.inPipe:
                sent = os.splice(self.pipe[0], self.dst.fileno(), self.inPipe, flags=_SPLICE_FLAGS)
                self.inPipe -= sent
        except _WOULD_BLOCK:
            return None
        except OSError:
            return self.dstLost
        return self.passEOF() if self.eof else None

    def close(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None
        self.data = None
        self.inPipe = 0


@implementer(IRelayed)
class FastRelay:
    """
    One client of a plain-TCP app, from accept to the access-log line.

    The client and target sockets are registered with the L{Poller}, each
    with the interest its two flows need: read while the flow from it may
    read, write while the flow to it has something left to send.
    """

    __slots__ = (
        "factory",
        "app",
        "poller",
        "client",
        "server",
        "up",
        "down",
        "clientHost",
        "_clientPort",
        "port",
        "started",
        "target",
        "failures",
        "end",
        "closing",
        "idleSeen",
        "idleSince",
        "_targets",
        "deadlines",
        "_clientMask",
        "_serverMask",
    )

    tlsFields: dict[str, str | None] = {}

    def __init__(
        self, fastPath: FastPath, factory: ProxyServerFactory, sock: socket.socket, address: tuple, port: int
    ) -> None:
        self.factory = factory
        self.app = factory.app
        self.poller = poller = fastPath.poller
        self.deadlines = fastPath.deadlines
        self.client = sock
        self.server: socket.socket | None = None
        self.up: _Flow | None = None
        self.down: _Flow | None = None
        self.started = factory.clock.seconds()
        self.clientHost = address[0]
        self._clientPort = address[1]
        self.port = port
        self.target = None
        self.failures: list = []
        self.end: str | None = None
        self.closing = False
        self.idleSeen = 0
        self.idleSince = None
        self._clientMask = self._serverMask = 0
        refused = factory.admit(self.clientHost)
        if refused is not None:
            factory.logRefusal(self.clientAddress, self.port, refused)
            sock.close()
            self.client = None
            return
        factory.relays.add(self)
        # TCP_NODELAY is the listening socket's, inherited (see bindTCP).
        # Nothing is read from the client while its target is dialled; with
        # no interest, only its error or hang-up (a reset) is reported.
        poller.register(sock.fileno(), 0, self._clientWhileDialling)
        self._clientMask = -1  # watched, for nothing but error or hang-up
        self._targets = iter(factory.balancer.order())
        self._dial()

    # Dialling

    def _dial(self) -> None:
        """
        Connect to the next target of the balancer's order, or give up.
        """
        for target in self._targets:
            family = socket.AF_INET6 if target.kind == IPV6 else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as e:
                self._dialFailed(target, e.errno)
                continue
            code = sock.connect_ex((target.host, target.port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                self._dialFailed(target, code)
                continue
            self.server = sock
            self.target = target
            self.poller.register(sock.fileno(), WRITE, self._serverWhileDialling)
            self._serverMask = WRITE
            self.deadlines.add(self, self.app.connectTimeout)
            return
        self.target = None
        self.end = END_NO_TARGET
        self._discardInput()
        self._closeAll()

    def _discardInput(self) -> None:
        """
        Read and drop what the client sent while its target was dialled (as
        much as Twisted's relay would have held): closed with unread bytes,
        its socket would send a reset instead of an orderly close.
        """
        left = PREDIAL_BUFFER
        try:
            while left > 0:
                data = self.client.recv(CHUNK)
                if not data:
                    return
                left -= len(data)
        except OSError:
            pass

    def _dialFailed(self, target, code: int) -> None:
        why = describeError(code, self.app.connectTimeout)
        self.failures.append((target, why))
        health = self.factory.health
        if health is not None and code not in OWN_ERRORS:
            health.connectFailed(target, why)

    def _dropDial(self) -> None:
        """
        Abandon the attempt under way.
        """
        self.deadlines.remove(self, self.app.connectTimeout)
        self._closeSocket(self.server)

    def timedOut(self) -> None:
        """
        Called by L{Deadlines}: the target being dialled did not answer
        within C{ConnectTimeout} (try the next one), or a lingering close
        took longer than L{LINGER} (abort it).
        """
        if self.closing:
            self.abort()
            return
        target = self.target
        self._dropDial()
        self._dialFailed(target, errno.ETIMEDOUT)
        self._dial()

    def _serverWhileDialling(self, events: int) -> None:
        # Writable alone is connected; with error or hang-up, ask which error.
        code = 0 if events == WRITE else self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not code and not events & (WRITE | GONE):
            return  # nothing happened yet
        if code or not events & WRITE:
            target = self.target
            self._dropDial()
            self._dialFailed(target, code or errno.ECONNREFUSED)
            self._dial()
            return
        self.deadlines.remove(self, self.app.connectTimeout)
        health = self.factory.health
        if health is not None:
            health.connectSucceeded(self.target)
        self._connected()

    def _clientWhileDialling(self, events: int) -> None:
        # Only error or hang-up are asked for: the client reset.
        self.end = END_CLIENT_LEFT
        self._dropDial()
        self._closeAll()

    # Relaying

    def _connected(self) -> None:
        client, server = self.client, self.server
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.up = _Flow(client, server, END_CLIENT_LOST, END_TARGET_LOST)
        self.down = _Flow(server, client, END_TARGET_LOST, END_CLIENT_LOST)
        self.up.peer, self.down.peer = self.down, self.up
        poller = self.poller
        poller.modify(client.fileno(), READ, self._clientReady)
        poller.modify(server.fileno(), READ, self._serverReady)
        self._clientMask = self._serverMask = READ
        if self.app.idleTimeout:
            self.factory.idleSweeper.watch(self)

    def _clientReady(self, events: int) -> None:
        self._ready(events, self._clientMask, self.up, self.down)

    def _serverReady(self, events: int) -> None:
        self._ready(events, self._serverMask, self.down, self.up)

    def _ready(self, events: int, mask: int, outbound: _Flow, inbound: _Flow) -> None:
        """
        The socket that C{outbound} reads from and C{inbound} writes to, with
        interest C{mask}, is ready for C{events}.
        """
        lost = None
        acted = False
        if events & WRITE and mask & WRITE:
            acted = True
            lost = inbound.push()
        if lost is None and events & ~WRITE and mask & READ:
            # Readable, or in error or hung up: the read says which.
            acted = True
            lost = outbound.pull()
        if lost is None and not acted and events & GONE:
            # Error or hang-up on a socket that is neither read nor written now.
            lost = outbound.srcLost
        if lost is not None:
            self._lost(lost)
        else:
            self._update()

    def _update(self) -> None:
        """
        Ask for the events each socket's flows need; close the pair once
        both directions are done (or, while closing, once each socket has
        been sent what it was owed).
        """
        up, down = self.up, self.down
        if self.closing:
            for inbound in (up, down):
                sock = inbound.dst
                if sock is None or not inbound.settled():
                    continue
                outbound = inbound.peer
                if outbound.eof:
                    self._closeSocket(sock)
                    continue
                # Its peer may still be sending: closed with unread bytes, the
                # socket would reset, and the peer lose what it was sent but
                # has not read yet.  Pass EOF, then read and drop until its
                # EOF (a lingering close, bounded by LINGER).
                if not inbound.shut:
                    inbound.shut = True
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        self._closeSocket(sock)
                        continue
                if not outbound.discarding:
                    outbound.discarding = True
                    self.deadlines.add(self, LINGER)
            if self.client is None and self.server is None:
                self.deadlines.remove(self, LINGER)
                self._finish()
                return
        elif up.shut and down.shut:
            self._closeAll()
            return
        if self.client is not None:
            mask = self._maskFor(up, down)
            if mask != self._clientMask:
                self._clientMask = self._watch(self.client, self._clientMask, mask, self._clientReady)
        if self.server is not None:
            mask = self._maskFor(down, up)
            if mask != self._serverMask:
                self._serverMask = self._watch(self.server, self._serverMask, mask, self._serverReady)

    def _maskFor(self, outbound: _Flow, inbound: _Flow) -> int:
        mask = 0
        if outbound.eof:
            pass
        elif outbound.discarding or (not self.closing and outbound.settled()):
            mask = READ
        if not inbound.settled():
            mask |= WRITE
        return mask

    def _watch(self, sock: socket.socket, old: int, mask: int, handler) -> int:
        """
        Change C{sock}'s interest from C{old} to C{mask}; return C{mask}.
        """
        if not mask:
            # Hang-up would be reported for ever: stop watching it instead.
            self.poller.unregister(sock.fileno())
        elif not old:
            self.poller.register(sock.fileno(), mask, handler)
        else:
            self.poller.modify(sock.fileno(), mask)
        return mask

    def _lost(self, end: str) -> None:
        """
        A side failed: close it at once, and the other once it has been
        sent what it was owed.
        """
        self.end = self.end or end
        failed = self.client if end == END_CLIENT_LOST else self.server
        self._closeSocket(failed)
        self.closing = True
        self._update()

    def _closeSocket(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        isClient = sock is self.client
        if isClient:
            self.client = None
            watched, self._clientMask = self._clientMask, 0
        else:
            self.server = None
            watched, self._serverMask = self._serverMask, 0
        if watched:
            self.poller.forget(sock.fileno())
        for flow in (self.up, self.down):
            if flow is not None:
                if flow.dst is sock:
                    flow.close()  # whatever it still had for that socket is lost
                    flow.dst = None
                if flow.src is sock:
                    flow.src = None
                    flow.eof = True
        sock.close()

    def _closeAll(self) -> None:
        self._closeSocket(self.client)
        self._closeSocket(self.server)
        self._finish()

    def _finish(self) -> None:
        for flow in (self.up, self.down):
            if flow is not None:
                flow.close()
        factory = self.factory
        if self in factory.relays:
            factory.relayEnded(self)

    # IRelayed

    @property
    def clientAddress(self) -> str:
        # Written only when logged: most connections are not, with AccessLog off.
        return hostPort(self.clientHost, self._clientPort)

    @property
    def bytesIn(self) -> int:
        return 0 if self.up is None else self.up.count

    @property
    def bytesOut(self) -> int:
        return 0 if self.down is None else self.down.count

    @property
    def idleTimeout(self) -> float:
        # The app's settings when this client came (a reload changes new ones).
        return self.app.idleTimeout

    def activity(self) -> int:
        return self.bytesIn + self.bytesOut

    def idleTimedOut(self) -> None:
        """
        No byte either way for C{IdleTimeout}: close both sides once each has
        been sent what it was owed; abort them one check later if they could
        not be.
        """
        if self.closing:
            # Still not closed a whole idle period later.
            self.abort()
            return
        self.end = END_IDLE
        self.closing = True
        self._update()

    def abort(self) -> None:
        """
        Drop both sides at once, with a reset (as Twisted's
        C{abortConnection} does): a peer cut off mid-stream must not take
        the close for an orderly end of what it was sent.
        """
        self.end = self.end or END_ABORTED
        for sock in (self.client, self.server):
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass
        if self.up is None:
            self._dropDial()
        else:
            self.deadlines.remove(self, LINGER)
        self._closeAll()
