"""
The load generator: clients that drive a proxy (or a backend directly) and
measure it.

Each function opens its own connections to an address, runs for a bounded
time, closes everything it opened and returns plain figures.  They are
written for speed rather than elegance -- one C{epoll} loop on non-blocking
sockets, preallocated buffers, no per-event allocation beyond what the
socket module does -- because in the I{direct} measurement the load generator
and the backend alone set the ceiling every proxy is compared with.

Throughput is counted on the client side over a window that opens after a
warm-up: by then the socket buffers along the path are full, so what is
sent (or received back) in the window is what the far end took in it.
"""

from __future__ import annotations

import errno
import math
import select
import socket
import ssl
import time
from collections.abc import Callable, Sequence

from bench.backends import ECHO, SINK, SLOW

Address = tuple[str, int]

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_FAIL = select.EPOLLERR | select.EPOLLHUP
_SEND_CHUNK = 256 * 1024
_READ_BUFFER = 1024 * 1024
_POLL = 0.05
CONNECT_TIMEOUT = 5.0
"""
Seconds a connection (with its first exchange) may take before it is
counted as failed.
"""


class LoadError(Exception):
    """
    A measurement could not be made: the text says what went wrong, for
    the report.
    """


def openConnection(
    address: Address, mode: bytes, timeout: float = CONNECT_TIMEOUT, preamble: bytes = b""
) -> socket.socket:
    """
    Connect to C{address} with C{TCP_NODELAY} and pick the backend's C{mode},
    after C{preamble} (a PROXY protocol header, as a balancer sends it).
    """
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(preamble + mode)
    except BaseException:
        sock.close()
        raise
    return sock


def _openMany(address: Address, count: int, mode: bytes, preamble: bytes = b"") -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(openConnection(address, mode, preamble=preamble))
    except OSError as e:
        closeAll(socks)
        raise LoadError(f"connecting to {address[0]}:{address[1]} failed: {_describe(e)}") from None
    return socks


def closeAll(socks: Sequence[socket.socket]) -> None:
    """
    Close every socket of C{socks}.
    """
    for sock in socks:
        sock.close()


def _describe(e: OSError) -> str:
    if isinstance(e, TimeoutError) or e.errno is None:
        return str(e) or type(e).__name__
    return errno.errorcode.get(e.errno, str(e.errno))


def bulk(address: Address, connections: int, echo: bool, warmup: float, duration: float) -> dict[str, float]:
    """
    Push bytes as fast as they are taken over C{connections} connections,
    to a sink (one-way) or to an echo (C{echo}, read back as fast too).

    @return: C{{"MB/s": ...}}, bytes (10**6) a second delivered to the sink,
        or received back from the echo, over the window.
    @raise LoadError: a connection broke, or nothing moved in the window.
    """
    socks = _openMany(address, connections, ECHO if echo else SINK)
    poller = select.epoll()
    try:
        byFd = {}
        for sock in socks:
            sock.setblocking(False)
            byFd[sock.fileno()] = sock
            poller.register(sock.fileno(), _OUT | (_IN if echo else 0))
        chunk = memoryview(bytes(_SEND_CHUNK))
        buffer = bytearray(_READ_BUFFER)
        sent = received = 0
        markAt = time.perf_counter() + warmup
        mark: tuple[float, int, int] | None = None
        try:
            while True:
                for fd, events in poller.poll(_POLL):
                    sock = byFd[fd]
                    if events & (_IN | _FAIL):
                        try:
                            n = sock.recv_into(buffer)
                        except BlockingIOError:
                            n = -1
                        if n == 0:
                            raise LoadError("the connection was closed in the middle of the transfer")
                        if n > 0:
                            received += n
                    if events & _OUT:
                        try:
                            sent += sock.send(chunk)
                        except BlockingIOError:
                            pass
                now = time.perf_counter()
                if mark is None:
                    if now >= markAt:
                        mark = (now, sent, received)
                elif now >= mark[0] + duration:
                    break
        except OSError as e:
            raise LoadError(f"the connection broke during the transfer: {_describe(e)}") from None
        moved = received - mark[2] if echo else sent - mark[1]
        if moved <= 0:
            raise LoadError(f"no data moved in {duration:g}s: the path stalled")
        return {"MB/s": moved / (now - mark[0]) / 1e6}
    finally:
        poller.close()
        closeAll(socks)


def tlsBulk(address: Address, serverName: str, warmup: float, duration: float) -> dict[str, float]:
    """
    Push bytes over one TLS connection (Python's C{ssl}, certificate not
    checked) to a sink as fast as they are taken.

    The client's encryption costs CPU on the load generator's side as well:
    the figure is the TLS path's, client included, as for every proxy.

    @return: C{{"MB/s": ...}}, plaintext bytes (10**6) a second sent over
        the window (the socket buffers are full by then, as in L{bulk}).
    @raise LoadError: the connection or the handshake failed.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise LoadError(f"connecting to {address[0]}:{address[1]} failed: {_describe(e)}") from None
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = context.wrap_socket(raw, server_hostname=serverName)
    except (OSError, ssl.SSLError) as e:
        raw.close()
        raise LoadError(f"TLS handshake with {address[0]}:{address[1]} failed: {e}") from None
    try:
        chunk = memoryview(bytes(_SEND_CHUNK))
        sent = 0
        sock.sendall(SINK)
        markAt = time.perf_counter() + warmup
        mark: tuple[float, int] | None = None
        while True:
            sent += sock.send(chunk)
            now = time.perf_counter()
            if mark is None:
                if now >= markAt:
                    mark = (now, sent)
            elif now >= mark[0] + duration:
                break
        moved = sent - mark[1]
        if moved <= 0:
            raise LoadError(f"no data moved in {duration:g}s: the path stalled")
        return {"MB/s": moved / (now - mark[0]) / 1e6}
    except (OSError, ssl.SSLError) as e:
        raise LoadError(f"the TLS connection broke during the transfer: {e}") from None
    finally:
        sock.close()


class _Window:
    """
    The measurement window of a loop: it opens C{warmup} seconds after it
    is made, and closes C{duration} seconds later.

    @ivar start: when it opened (C{time.perf_counter}), or C{None} yet.
    @ivar now: when L{over} was last asked.
    """

    def __init__(self, warmup: float, duration: float) -> None:
        self._openAt = time.perf_counter() + warmup
        self._duration = duration
        self.start: float | None = None
        self.now = 0.0

    @property
    def open(self) -> bool:
        return self.start is not None

    def over(self) -> bool:
        """
        Whether the window has closed (opening it when its time has come).
        """
        self.now = time.perf_counter()
        if self.start is None:
            if self.now >= self._openAt:
                self.start = self.now
            return False
        return self.now >= self.start + self._duration

    @property
    def seconds(self) -> float:
        return self.now - self.start


def _tlsContext() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _tlsConnect(context: ssl.SSLContext, address: Address, serverName: str, mode: bytes) -> ssl.SSLSocket:
    """
    Connect, complete the TLS handshake, and pick the backend's C{mode}.

    @raise OSError: or L{ssl.SSLError}, as the connection or handshake fails.
    """
    raw = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = context.wrap_socket(raw, server_hostname=serverName)
        sock.sendall(mode)
    except BaseException:
        raw.close()
        raise
    return sock


def tlsPingPong(address: Address, serverName: str, size: int, warmup: float, duration: float) -> dict:
    """
    Over one kept-alive TLS connection, send C{size} bytes and wait for
    them to come back, again and again: small requests, as HTTPS keep-alive
    makes them.

    @return: requests a second over the window (C{"req/s"}), their count
        (C{"requests"}), and the p50 and p99 round-trip times in microseconds.
    @raise LoadError: the connection broke, or no round trip completed.
    """
    try:
        sock = _tlsConnect(_tlsContext(), address, serverName, ECHO)
    except (OSError, ssl.SSLError) as e:
        raise LoadError(f"TLS connection to {address[0]}:{address[1]} failed: {e}") from None
    payload = b"p" * size
    samples: list[int] = []
    clock = time.perf_counter_ns
    window = _Window(warmup, duration)
    try:
        while not window.over():
            started = clock()
            sock.sendall(payload)
            got = 0
            while got < size:
                data = sock.recv(size - got)
                if not data:
                    raise LoadError("the connection was closed in the middle of the ping-pong")
                got += len(data)
            if window.open:
                samples.append(clock() - started)
    except (OSError, ssl.SSLError) as e:
        raise LoadError(f"the TLS connection broke during the ping-pong: {e}") from None
    finally:
        sock.close()
    if not samples:
        raise LoadError(f"no round trip completed in {duration:g}s: the path stalled")
    samples.sort()
    micro = [s / 1000 for s in samples]
    return {
        "req/s": len(samples) / window.seconds,
        "requests": len(samples),
        "p50": percentile(micro, 0.50),
        "p99": percentile(micro, 0.99),
    }


def tlsConnectionRate(address: Address, serverName: str, warmup: float, duration: float) -> dict:
    """
    One after the other: connect, TLS handshake, one small echo, close.

    @return: connections a second over the window (C{"conn/s"}), their
        count (C{"connections"}), and the errors (C{"errors"}).
    @raise LoadError: no connection succeeded.
    """
    context = _tlsContext()
    done = errors = 0
    window = _Window(warmup, duration)
    while not window.over():
        try:
            sock = _tlsConnect(context, address, serverName, ECHO)
            try:
                sock.sendall(b"ping")
                if sock.recv(4) != b"ping":
                    errors += 1
                elif window.open:
                    done += 1
            finally:
                sock.close()
        except (OSError, ssl.SSLError):
            errors += 1
    if not done:
        raise LoadError(f"no TLS connection succeeded ({errors} errors)")
    return {"conn/s": done / window.seconds, "connections": done, "errors": errors}


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """
    The nearest-rank percentile of an already sorted sequence.
    """
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def pingPong(
    address: Address, connections: int, size: int, warmup: float, duration: float, preamble: bytes = b""
) -> dict[str, float]:
    """
    Over each of C{connections} connections, send C{size} bytes, wait for
    them to come back, and again, as fast as it goes.

    @param preamble: sent first on each connection (a PROXY header).

    @return: requests a second over the window, and the p50, p90, p99 and
        p99.9 round-trip times in microseconds.
    @raise LoadError: a connection broke, or no round trip completed.
    """
    socks = _openMany(address, connections, ECHO, preamble)
    poller = select.epoll()
    try:
        byFd = {}
        for sock in socks:
            sock.setblocking(False)
            byFd[sock.fileno()] = sock
            poller.register(sock.fileno(), _IN)
        payload = b"p" * size
        buffer = bytearray(_READ_BUFFER)
        got = dict.fromkeys(byFd, 0)
        sentAt = {}
        samples: list[int] = []
        record = samples.append
        clock = time.perf_counter_ns
        try:
            for fd, sock in byFd.items():
                sentAt[fd] = clock()
                sock.send(payload)
            markAt = time.perf_counter() + warmup
            mark = None
            while True:
                for fd, _ in poller.poll(_POLL):
                    try:
                        n = byFd[fd].recv_into(buffer)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        raise LoadError("the connection was closed in the middle of the ping-pong")
                    have = got[fd] + n
                    if have < size:
                        got[fd] = have
                        continue
                    if have > size:
                        raise LoadError(f"{have} bytes came back for {size} sent")
                    now = clock()
                    if mark is not None:
                        record(now - sentAt[fd])
                    got[fd] = 0
                    sentAt[fd] = now
                    if byFd[fd].send(payload) != size:
                        raise LoadError("a ping did not fit in an empty socket buffer")
                now = time.perf_counter()
                if mark is None:
                    if now >= markAt:
                        mark = now
                        del samples[:]
                elif now >= mark + duration:
                    break
        except OSError as e:
            raise LoadError(f"the connection broke during the ping-pong: {_describe(e)}") from None
        if not samples:
            raise LoadError(f"no round trip completed in {duration:g}s: the path stalled")
        samples.sort()
        micro = [s / 1000 for s in samples]
        return {
            "req/s": len(samples) / (now - mark),
            "p50": percentile(micro, 0.50),
            "p90": percentile(micro, 0.90),
            "p99": percentile(micro, 0.99),
            "p999": percentile(micro, 0.999),
        }
    finally:
        poller.close()
        closeAll(socks)


class _Attempt:
    """
    One connect-echo-close in flight: its socket, the bytes of the reply
    received so far (-1 while connecting) and when it began.
    """

    __slots__ = ("sock", "got", "began")

    def __init__(self, sock: socket.socket, began: float) -> None:
        self.sock = sock
        self.got = -1
        self.began = began


class _ConnectLoop:
    """
    Keep C{concurrency} connect-echo-close attempts in flight, counting
    completions and failures (by kind).

    After a successful exchange the socket is handed to C{keep} if given
    (the idle-memory scenario holds connections open), else closed.
    """

    _PAYLOAD = b"c" * 16

    def __init__(
        self, address: Address, concurrency: int, keep: Callable[[socket.socket], None] | None = None
    ) -> None:
        self.address = address
        self.concurrency = concurrency
        self.keep = keep
        self.poller = select.epoll()
        self.attempts: dict[int, _Attempt] = {}
        self.done = 0
        self.errors: dict[str, int] = {}
        self._request = ECHO + self._PAYLOAD
        self._buffer = bytearray(4096)

    def close(self) -> None:
        for attempt in self.attempts.values():
            attempt.sock.close()
        self.attempts.clear()
        self.poller.close()

    def failed(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def _end(self, fd: int, kind: str | None) -> None:
        attempt = self.attempts.pop(fd)
        if kind is None:
            self.done += 1
            if self.keep is not None:
                self.poller.unregister(fd)
                self.keep(attempt.sock)
                return
        else:
            self.failed(kind)
        # Closing the socket takes it out of the epoll set.
        attempt.sock.close()

    def start(self, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed(errno.errorcode.get(code, str(code)))
            return
        self.attempts[sock.fileno()] = _Attempt(sock, now)
        self.poller.register(sock.fileno(), _OUT)

    def step(self, now: float, wanted: int) -> None:
        """
        Top up to C{concurrency} attempts (at most C{wanted} more started),
        then handle what is ready.
        """
        while len(self.attempts) < self.concurrency and wanted > 0:
            self.start(now)
            wanted -= 1
        for fd, _ in self.poller.poll(_POLL):
            attempt = self.attempts.get(fd)
            if attempt is None:
                continue
            sock = attempt.sock
            try:
                if attempt.got < 0:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        self._end(fd, errno.errorcode.get(code, str(code)))
                        continue
                    sock.send(self._request)
                    attempt.got = 0
                    self.poller.modify(fd, _IN)
                    continue
                n = sock.recv_into(self._buffer)
            except BlockingIOError:
                continue
            except OSError as e:
                self._end(fd, _describe(e))
                continue
            if n == 0:
                self._end(fd, "closed before the reply")
                continue
            attempt.got += n
            if attempt.got >= len(self._PAYLOAD):
                self._end(fd, None)

    def expire(self, now: float) -> None:
        """
        Count attempts older than L{CONNECT_TIMEOUT} as failed.
        """
        for fd, attempt in list(self.attempts.items()):
            if now - attempt.began > CONNECT_TIMEOUT:
                self._end(fd, f"no reply within {CONNECT_TIMEOUT:g}s")


def connectionRate(address: Address, concurrency: int, warmup: float, duration: float) -> dict:
    """
    Connect, exchange one small echo, close; C{concurrency} at a time, for
    the warm-up and then the window.

    @return: completed connections a second over the window, completed
        connections over the whole run, and the errors over the whole run (with C{"errorKinds"} saying which).
    @raise LoadError: not a single connection succeeded.
    """
    loop = _ConnectLoop(address, concurrency)
    try:
        start = time.perf_counter()
        markAt = start + warmup
        mark: tuple[float, int] | None = None
        lastExpiry = start
        while True:
            now = time.perf_counter()
            if mark is None:
                if now >= markAt:
                    mark = (now, loop.done)
            elif now >= mark[0] + duration:
                break
            loop.step(now, concurrency)
            if now - lastExpiry > 0.5:
                loop.expire(now)
                lastExpiry = now
        if not loop.done:
            raise LoadError(f"no connection succeeded; errors: {_showErrors(loop.errors)}")
        return {
            "conn/s": (loop.done - mark[1]) / (now - mark[0]),
            "connections": loop.done,
            "errors": sum(loop.errors.values()),
            "errorKinds": dict(loop.errors),
        }
    finally:
        loop.close()


def connectMany(address: Address, concurrency: int, count: int, timeout: float) -> dict:
    """
    Connect, exchange one small echo, close, as L{connectionRate} does, for
    C{count} connections (not for a time): what a count of instructions per
    connection needs.

    @return: the connections completed and the errors (with C{"errorKinds"}).
    @raise LoadError: the C{count} did not complete within C{timeout} seconds.
    """
    loop = _ConnectLoop(address, concurrency)
    try:
        start = lastExpiry = time.perf_counter()
        while loop.done + sum(loop.errors.values()) < count:
            now = time.perf_counter()
            if now - start > timeout:
                raise LoadError(
                    f"{loop.done} of {count} connections in {timeout:g}s; errors: {_showErrors(loop.errors)}"
                )
            begun = loop.done + sum(loop.errors.values()) + len(loop.attempts)
            loop.step(now, count - begun)
            if now - lastExpiry > 0.5:
                loop.expire(now)
                lastExpiry = now
        return {
            "connections": loop.done,
            "errors": sum(loop.errors.values()),
            "errorKinds": dict(loop.errors),
        }
    finally:
        loop.close()


def _showErrors(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(errors.items())) or "none"


def openIdle(
    address: Address, count: int, concurrency: int = 64, timeout: float = 60.0
) -> list[socket.socket]:
    """
    Open C{count} connections, each proven relayed to the backend by one
    echo, and leave them open and idle.

    @return: the sockets, which the caller closes.
    @raise LoadError: a connection failed, or they were not all open in time.
    """
    held: list[socket.socket] = []
    loop = _ConnectLoop(address, concurrency, keep=held.append)
    try:
        deadline = time.perf_counter() + timeout
        while loop.done < count:
            now = time.perf_counter()
            if now > deadline:
                raise LoadError(f"only {loop.done} of {count} connections open after {timeout:g}s")
            loop.step(now, count - loop.done - len(loop.attempts))
            loop.expire(now)
            if loop.errors:
                raise LoadError(
                    f"opening {count} idle connections: {loop.done} open, errors: {_showErrors(loop.errors)}"
                )
    except BaseException:
        closeAll(held)
        raise
    finally:
        loop.close()
    return held


def push(
    address: Address, total: int, duration: float, sample: Callable[[], int], every: float = 0.05
) -> dict[str, float]:
    """
    Offer C{total} bytes, as fast as they are taken, to a backend that reads
    slowly; call C{sample} every C{every} seconds throughout C{duration}.

    @return: C{"pushedMB"}, the bytes (10**6) the path took from the client,
        and C{"peak"}, the largest value C{sample} returned.
    """
    sock = openConnection(address, SLOW)
    poller = select.epoll()
    try:
        sock.setblocking(False)
        poller.register(sock.fileno(), _OUT)
        chunk = memoryview(bytes(_SEND_CHUNK))
        pushed = 0
        peak = sample()
        start = time.perf_counter()
        nextSample = start + every
        end = start + duration
        try:
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                if now >= nextSample:
                    peak = max(peak, sample())
                    nextSample = now + every
                wait = min(nextSample, end) - now
                if pushed >= total:
                    time.sleep(wait)
                    continue
                if poller.poll(wait):
                    try:
                        pushed += sock.send(chunk[: total - pushed])
                    except BlockingIOError:
                        pass
                    if pushed >= total:
                        poller.unregister(sock.fileno())
        except OSError as e:
            raise LoadError(f"the connection broke while pushing: {_describe(e)}") from None
        peak = max(peak, sample())
        return {"pushedMB": pushed / 1e6, "peak": peak}
    finally:
        poller.close()
        sock.close()
