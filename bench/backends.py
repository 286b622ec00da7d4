"""
The loopback backends behind every proxy under test, in a process of their own.

One listening port serves every scenario, so each proxy is configured with a
single target exactly as a user would: the first byte a connection sends
picks what the backend does with the rest.

  - L{ECHO}: send back every byte (bulk echo, ping-pong, connection rate,
    idle connections).
  - L{SINK}: read and discard as fast as possible (bulk one-way).
  - L{SLOW}: read at L{SLOW_RATE} bytes a second (backpressure).

The server is a single C{epoll} loop on non-blocking sockets reading into
preallocated buffers, so that it costs as little CPU as a Python server can:
it must never be what limits a proxy's figures (the run checks this by
measuring I{direct}, the backend with no proxy in front).

Run as C{python -m bench.backends --fd N}: the benchmark binds and listens on
the socket itself (so the port is known and connectable at once) and hands it
over; the process exits when its parent does.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from bench.system import checkoutEnvironment, childSetup

ECHO = b"E"
SINK = b"S"
SLOW = b"W"

SLOW_RATE = 1024 * 1024
"""
Bytes a second a L{SLOW} connection is read at.
"""

_TICK = 0.02
_BUFFER = 256 * 1024
_ACCEPT_BATCH = 64
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = (ConnectionResetError, BrokenPipeError, TimeoutError)


class _Conn:
    """
    One accepted connection: its socket, mode, and bytes to echo that the
    client has not taken yet.
    """

    __slots__ = ("sock", "mode", "pending", "head")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mode = b""
        self.pending = b""
        self.head = b""


_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxyHeaderLength(data: bytes) -> int | None:
    """
    The length of the PROXY protocol header (HAProxy's
    C{doc/proxy-protocol.txt}, v1 or v2) at the start of C{data}, as a
    proxy with C{SendProxy} sends it first; 0 if C{data} starts with none,
    C{None} if it holds only part of one.  Nothing in it is checked: the
    backends only skip it, to pick their mode by the byte after it.
    """
    if data[:1] == b"P":
        if len(data) < 6:
            return None if b"PROXY "[: len(data)] == data else 0
        if data[:6] != b"PROXY ":
            return 0
        end = data.find(b"\r\n")
        return None if end < 0 else end + 2
    if data[:1] == b"\r":
        if len(data) < 16:
            return None if _V2_SIGNATURE[: len(data)] == data[:12] else 0
        if data[:12] != _V2_SIGNATURE:
            return 0
        return 16 + int.from_bytes(data[14:16], "big")
    return 0


class BackendServer:
    """
    The C{epoll} loop serving L{ECHO}, L{SINK} and L{SLOW} connections on
    one listening socket.
    """

    def __init__(self, listener: socket.socket, slowRate: int = SLOW_RATE, more: tuple = ()) -> None:
        """
        @param more: more listening sockets served alike (the same loop
            behind several ports, as several targets of one app).
        """
        self._listeners = {}
        self._slowRate = slowRate
        self._epoll = select.epoll()
        for each in (listener, *more):
            each.setblocking(False)
            self._listeners[each.fileno()] = each
            self._epoll.register(each.fileno(), _IN)
        self._conns: dict[int, _Conn] = {}
        self._slow: set[int] = set()
        self._buffer = bytearray(_BUFFER)
        self._view = memoryview(self._buffer)

    def serve(self, parent: int | None = None) -> None:
        """
        Serve until the process with pid C{parent} is gone (forever if
        C{None}).
        """
        listeners = self._listeners
        conns = self._conns
        buffer = self._buffer
        view = self._view
        poll = self._epoll.poll
        nextTick = time.monotonic() + _TICK
        while True:
            timeout = max(0.0, nextTick - time.monotonic())
            for fd, events in poll(timeout):
                conn = conns.get(fd)
                if conn is not None and conn.mode == ECHO and events == _IN:
                    # The hot path (echo, nothing pending), kept inline.
                    try:
                        n = conn.sock.recv_into(buffer)
                        if n == 0:
                            self._close(fd)
                            continue
                        try:
                            sent = conn.sock.send(view[:n])
                        except BlockingIOError:
                            sent = 0
                    except BlockingIOError:
                        continue
                    except _GONE:
                        self._close(fd)
                        continue
                    if sent < n:
                        # Stop reading until the client takes what it was sent.
                        conn.pending = bytes(view[sent:n])
                        self._epoll.modify(fd, _OUT)
                elif fd in listeners:
                    self._accept(listeners[fd])
                else:
                    self._ready(fd, events)
            now = time.monotonic()
            if now >= nextTick:
                self._readSlow(_TICK)
                nextTick = now + _TICK
                if parent is not None and os.getppid() != parent:
                    return

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns[sock.fileno()] = _Conn(sock)
            self._epoll.register(sock.fileno(), _IN)

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is None:
            return
        self._slow.discard(fd)
        # Closing the socket takes it out of the epoll set.
        conn.sock.close()

    def _ready(self, fd: int, events: int) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            return
        try:
            if events & _OUT:
                self._flush(fd, conn)
            elif events & (_IN | select.EPOLLHUP | select.EPOLLERR):
                self._read(fd, conn)
        except _GONE:
            self._close(fd)

    def _read(self, fd: int, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(self._buffer)
        except BlockingIOError:
            return
        if n == 0:
            self._close(fd)
            return
        data = self._view[:n]
        if not conn.mode and (conn.head or data[:1] in (b"P", b"\r")):
            # A PROXY header first (a proxy with SendProxy): skip it.
            head = conn.head + bytes(data)
            length = proxyHeaderLength(head)
            if length is None or len(head) < length:
                conn.head = head
                return
            conn.head = b""
            data = memoryview(head)[length:]
            if not data:
                return
        if not conn.mode:
            conn.mode = bytes(data[:1])
            data = data[1:]
            if conn.mode == SLOW:
                # Read on the clock from now on, not when data arrives.
                self._epoll.unregister(fd)
                self._slow.add(fd)
                return
            if conn.mode not in (ECHO, SINK):
                self._close(fd)
                return
        if conn.mode == ECHO and data:
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                # Stop reading until the client takes what it was sent.
                conn.pending = bytes(data[sent:])
                self._epoll.modify(fd, _OUT)

    def _flush(self, fd: int, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            return
        conn.pending = conn.pending[sent:]
        if not conn.pending:
            self._epoll.modify(fd, _IN)

    def _readSlow(self, elapsed: float) -> None:
        quota = int(self._slowRate * elapsed)
        for fd in list(self._slow):
            conn = self._conns[fd]
            left = quota
            try:
                while left > 0:
                    n = conn.sock.recv_into(self._buffer, min(left, _BUFFER))
                    if n == 0:
                        self._close(fd)
                        break
                    left -= n
            except BlockingIOError:
                pass
            except _GONE:
                self._close(fd)


class NotReady(Exception):
    """
    Nothing echoed at an address in time; the text says what happened.
    """


def waitUntilEchoing(address: tuple[str, int], timeout: float, alive: Callable[[], bool]) -> None:
    """
    Poll-connect to C{address} until an echo comes back through it: the
    backend itself, or a proxy in front of it, is then ready.

    @param alive: called between attempts; a false answer ends the wait.
    @raise NotReady: C{timeout} seconds passed, or C{alive} said no.
    """
    deadline = time.monotonic() + timeout
    probe = b"ready?"
    last = "no attempt"
    while time.monotonic() < deadline:
        if not alive():
            raise NotReady("the process exited")
        try:
            with socket.create_connection(address, timeout=2.0) as sock:
                sock.sendall(ECHO + probe)
                reply = b""
                while len(reply) < len(probe):
                    data = sock.recv(64)
                    if not data:
                        break
                    reply += data
            if reply == probe:
                return
            last = f"the echo came back as {reply!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise NotReady(f"nothing echoed after {timeout:g}s ({last})")


class BackendProcess:
    """
    The parent's handle on the backend process: bind, start, stop.

    @ivar address: where the backend listens, once started.
    @ivar addresses: every port it listens on (C{ports} of them), the first
        being L{address}.
    """

    address: tuple[str, int] | None = None

    def __init__(self, cpus: frozenset[int] | None, host: str = "127.0.0.1", ports: int = 1) -> None:
        self._cpus = cpus
        self._host = host
        self._ports = ports
        self.addresses: list[tuple[str, int]] = []
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> tuple[str, int]:
        """
        Start serving; return the address once an echo came back.

        @raise NotReady: it did not answer.
        """
        listeners = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(self._ports)]
        try:
            for listener in listeners:
                listener.bind((self._host, 0))
                listener.listen(4096)
            self.addresses = [listener.getsockname() for listener in listeners]
            self.address = self.addresses[0]
            fds = [str(listener.fileno()) for listener in listeners]
            self._process = subprocess.Popen(
                [sys.executable, "-m", "bench.backends", *(arg for fd in fds for arg in ("--fd", fd))],
                pass_fds=[listener.fileno() for listener in listeners],
                env=checkoutEnvironment(),
                stdin=subprocess.DEVNULL,
                preexec_fn=childSetup(self._cpus),
                start_new_session=True,
            )
        finally:
            for listener in listeners:
                listener.close()
        for address in self.addresses:
            waitUntilEchoing(address, timeout, self.alive)
        return self.address

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backends")
    parser.add_argument(
        "--fd", type=int, required=True, action="append", help="a listening TCP socket to serve (repeatable)"
    )
    parser.add_argument("--slow-rate", type=int, default=SLOW_RATE, help="bytes/s for slow readers")
    options = parser.parse_args(argv)
    listener, *more = (socket.socket(fileno=fd) for fd in options.fd)
    try:
        BackendServer(listener, options.slow_rate, tuple(more)).serve(parent=os.getppid())
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
