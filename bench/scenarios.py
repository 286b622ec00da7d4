"""
The scenarios: what each one measures, in which units, and for how long.

A scenario is given a started proxy (or L{Direct}) and a L{Budget}, drives it
with the load generator and returns its figures as a flat C{dict}.  Scenarios
that read the proxy's memory want a fresh proxy process for every
measurement (L{Scenario.freshProcess}), so that memory freed by earlier
traffic is not reused and hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench import load
from bench.proxies import TLS_NAME
from bench.system import processCpuSeconds


@dataclass(frozen=True)
class Budget:
    """
    How much time and traffic each measurement gets.

    @ivar warmup: seconds of traffic before the window opens.
    @ivar window: seconds the figures are measured over.
    @ivar idleConnections: connections held for the idle-memory scenario.
    @ivar pushBytes: bytes offered to the slow reader.
    @ivar pushSeconds: how long the slow reader is pushed and watched.
    @ivar settle: pause between measurements, for closed connections to go.
    """

    warmup: float
    window: float
    idleConnections: int
    pushBytes: int
    pushSeconds: float
    settle: float


FULL = Budget(
    warmup=0.5, window=2.0, idleConnections=2000, pushBytes=200 * 10**6, pushSeconds=5.0, settle=0.3
)
QUICK = Budget(
    warmup=0.05, window=0.25, idleConnections=200, pushBytes=10 * 10**6, pushSeconds=0.5, settle=0.05
)


@dataclass(frozen=True)
class Metric:
    """
    One figure a scenario reports.

    @ivar key: its name in the results and the JSON.
    @ivar label: its column heading, with the unit.
    @ivar higherIsBetter: which way is better, for the reader of ratios.
    """

    key: str
    label: str
    higherIsBetter: bool


MB_S = Metric("MB/s", "MB/s", True)
REQ_S = Metric("req/s", "req/s", True)
LATENCIES = tuple(Metric(key, f"{key} µs", False) for key in ("p50", "p90", "p99", "p999"))
CONN_S = Metric("conn/s", "conn/s", True)
CPU_PER_CONN = Metric("cpuUsPerConn", "proxy CPU µs/conn", False)
ERRORS = Metric("errors", "errors", False)
KIB_PER_CONN = Metric("KiB/conn", "KiB/conn", False)
RSS_BEFORE = Metric("rssBeforeMiB", "RSS before MiB", False)
RSS_HELD = Metric("rssHeldMiB", "RSS held MiB", False)
GROWTH = Metric("growthMiB", "RSS growth MiB", False)
PUSHED = Metric("pushedMB", "taken MB", False)
PLAIN_REQ_S = Metric("plainReqS", "without PROXY req/s", True)
WITH_RATIO = Metric("withPerWithout", "with/without", True)
CPU_WITH = Metric("cpuUsPerReqWith", "CPU µs/req with", False)
CPU_WITHOUT = Metric("cpuUsPerReqWithout", "CPU µs/req without", False)
CPU_RATIO = Metric("cpuWithPerWithout", "CPU with/without", False)


class Scenario:
    """
    The common part of every scenario.

    @cvar name: what C{--scenario} selects it by.
    @cvar metrics: the figures it reports, the first being the main one.
    @cvar ratioMetrics: the keys of the figures given as ratios per repetition.
    @cvar ceiling: whether I{direct} must be far above every proxy on the
        main figure (for throughputs; not for memory, which direct lacks).
    @cvar timed: its figures depend on the CPU time the processes get (so
        other processes on our CPUs disturb them).
    @cvar needsProcess: only meaningful for a proxy with a process.
    @cvar needsTLS: only meaningful for a proxy that terminates TLS (one
        with a C{tlsAddress}).
    @cvar needsProxyProtocol: only meaningful for a proxy that takes and
        sends PROXY headers (one with a C{proxyProtocolAddress}).
    @cvar freshProcess: wants a proxy process started for each measurement.
    @cvar skipped: why the scenario is not run at all, or C{None}.
    """

    name: str
    title: str
    metrics: tuple[Metric, ...]
    ratioMetrics: tuple[str, ...]
    ceiling = True
    timed = True
    needsProcess = False
    needsTLS = False
    needsProxyProtocol = False
    freshProcess = False
    skipped: str | None = None

    def measure(self, proxy, budget: Budget) -> dict:
        raise NotImplementedError()


class Bulk(Scenario):
    """
    Bulk throughput, one-way to a sink or echoed back.
    """

    def __init__(self, connections: int, echo: bool) -> None:
        self.connections = connections
        self.echo = echo
        way = "echo" if echo else "sink"
        self.name = f"bulk-{way}-{connections}"
        plural = "s" if connections > 1 else ""
        self.title = (
            f"bulk, {'echoed back' if echo else 'one-way to a sink'}, {connections} connection{plural}"
        )
        self.metrics = (MB_S,)
        self.ratioMetrics = (MB_S.key,)

    def measure(self, proxy, budget: Budget) -> dict:
        return load.bulk(proxy.address, self.connections, self.echo, budget.warmup, budget.window)


class PingPong(Scenario):
    """
    64-byte ping-pong: request rate and round-trip latency percentiles.
    """

    size = 64

    def __init__(self, connections: int) -> None:
        self.connections = connections
        self.name = f"pingpong-{connections}"
        plural = "s" if connections > 1 else ""
        self.title = f"{self.size}-byte ping-pong, {connections} connection{plural}"
        self.metrics = (REQ_S, *LATENCIES)
        self.ratioMetrics = (REQ_S.key, "p99")

    def measure(self, proxy, budget: Budget) -> dict:
        return load.pingPong(proxy.address, self.connections, self.size, budget.warmup, budget.window)


PROXY_HEADER = b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 443\r\n"
"""
What the load generator sends first, as a balancer does, where the proxy
takes a PROXY header.
"""


class PingPongProxyProtocol(Scenario):
    """
    L{PingPong} with the PROXY protocol both ways (a v1 header received,
    C{AcceptProxy}; a v2 header sent to the backend, C{SendProxy}), against
    the same ping-pong without, on the same proxy in the same repetition:
    what the header stages cost.
    """

    size = 64
    ceiling = False
    needsProxyProtocol = True

    def __init__(self, connections: int) -> None:
        self.connections = connections
        self.name = f"pingpong-{connections}-proxyproto"
        self.title = (
            f"{self.size}-byte ping-pong, {connections} connections, with AcceptProxy and SendProxy "
            "against without (same proxy, same repetition)"
        )
        self.metrics = (REQ_S, PLAIN_REQ_S, WITH_RATIO, CPU_WITH, CPU_WITHOUT, CPU_RATIO)
        self.ratioMetrics = (WITH_RATIO.key, CPU_RATIO.key)

    def measure(self, proxy, budget: Budget) -> dict:
        """
        Without, with, with, without (ABBA, half a window each): the two
        sides of the comparison see the same drift of a busy machine.  The
        proxy's CPU time per request is compared too, which other
        processes on the machine disturb less than the rates.
        """
        half = budget.window / 2
        pid = getattr(proxy, "pid", None)

        def run(address, preamble: bytes) -> tuple[float, float | None]:
            before = None if pid is None else processCpuSeconds(pid)
            figures = load.pingPong(address, self.connections, self.size, budget.warmup, half, preamble)
            used = None if before is None else processCpuSeconds(pid) - before
            return figures[REQ_S.key], used

        plain, withHeaders = proxy.address, proxy.proxyProtocolAddress
        runs = [
            run(plain, b""),
            run(withHeaders, PROXY_HEADER),
            run(withHeaders, PROXY_HEADER),
            run(plain, b""),
        ]
        without, withProxy = (runs[0], runs[3]), (runs[1], runs[2])
        rateWithout = sum(rate for rate, _ in without) / 2
        rateWith = sum(rate for rate, _ in withProxy) / 2
        figures = {REQ_S.key: rateWith, PLAIN_REQ_S.key: rateWithout, WITH_RATIO.key: rateWith / rateWithout}
        if pid is not None:
            # Warm-ups included on both sides alike (same durations).
            cpuWith = sum(used for _, used in withProxy) * 1e6 / (rateWith * 2 * half)
            cpuWithout = sum(used for _, used in without) * 1e6 / (rateWithout * 2 * half)
            figures[CPU_WITH.key] = cpuWith
            figures[CPU_WITHOUT.key] = cpuWithout
            figures[CPU_RATIO.key] = cpuWith / cpuWithout
        return figures


class ConnectionRate(Scenario):
    """
    Connect, one small echo, close: sequentially or several at a time.
    """

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.name = "connrate-seq" if concurrency == 1 else f"connrate-{concurrency}"
        how = "sequential" if concurrency == 1 else f"{concurrency} concurrent"
        self.title = f"connection rate: connect, one small echo, close; {how}"
        self.metrics = (CONN_S, ERRORS, CPU_PER_CONN)
        self.ratioMetrics = (CONN_S.key, CPU_PER_CONN.key)

    def measure(self, proxy, budget: Budget) -> dict:
        """
        Besides the rate, the proxy's CPU time per connection: when the load
        generator is what limits a proxy's rate (as it may limit HAProxy's
        here), that is what still tells the proxies apart.
        """
        pid = getattr(proxy, "pid", None)
        before = None if pid is None else processCpuSeconds(pid)
        figures = load.connectionRate(proxy.address, self.concurrency, budget.warmup, budget.window)
        if before is not None and figures["connections"]:
            used = processCpuSeconds(pid) - before
            figures[CPU_PER_CONN.key] = used * 1e6 / figures["connections"]
        return figures


class IdleMemory(Scenario):
    """
    The proxy's resident memory per idle relayed connection: the growth of
    its RSS with many connections held open, each relayed to the backend.
    """

    name = "idle-memory"
    title = "memory per idle connection (proxy RSS growth / connections held)"
    metrics = (KIB_PER_CONN, RSS_BEFORE, RSS_HELD)
    ratioMetrics = (KIB_PER_CONN.key,)
    ceiling = False
    timed = False
    needsProcess = True
    freshProcess = True

    def measure(self, proxy, budget: Budget) -> dict:
        count = budget.idleConnections
        # Warm up first (imports, first allocations), so that only what each
        # connection costs is counted.
        load.closeAll(load.openIdle(proxy.address, 10))
        time.sleep(budget.settle + 0.2)
        before = proxy.residentKiB()
        held = load.openIdle(proxy.address, count)
        try:
            time.sleep(budget.settle + 0.2)
            after = proxy.residentKiB()
        finally:
            load.closeAll(held)
        return {
            KIB_PER_CONN.key: (after - before) / count,
            RSS_BEFORE.key: before / 1024,
            RSS_HELD.key: after / 1024,
            "connections": count,
        }


class Backpressure(Scenario):
    """
    A fast client pushing into a backend that reads at 1 MB/s: the proxy
    must stop reading the client rather than buffer what the reader cannot
    take.  Its RSS is sampled throughout; the growth is the peak minus the
    RSS before.
    """

    name = "backpressure"
    title = "bytes offered as fast as taken to a 1 MB/s reader (proxy RSS growth)"
    metrics = (GROWTH, PUSHED)
    ratioMetrics = (GROWTH.key,)
    ceiling = False
    timed = False
    needsProcess = True
    freshProcess = True

    def measure(self, proxy, budget: Budget) -> dict:
        load.closeAll(load.openIdle(proxy.address, 1))
        time.sleep(budget.settle)
        before = proxy.residentKiB()
        result = load.push(proxy.address, budget.pushBytes, budget.pushSeconds, proxy.residentKiB)
        return {
            GROWTH.key: (result["peak"] - before) / 1024,
            PUSHED.key: result["pushedMB"],
            "offeredMB": budget.pushBytes / 1e6,
            "seconds": budget.pushSeconds,
        }


class TlsTermination(Scenario):
    """
    TLS termination throughput: one connection, bulk, one-way to a sink
    (as C{bulk-sink-1}, so the two compare in the same run), through the
    proxy's TLS port; the load generator speaks TLS with Python's C{ssl}.
    Only proxies that terminate TLS are measured (not I{direct}, whose
    backend speaks none, nor portforward).
    """

    name = "tls"
    title = "TLS termination throughput, one connection, one-way to a sink"
    metrics = (MB_S,)
    ratioMetrics = (MB_S.key,)
    ceiling = False
    needsTLS = True

    def measure(self, proxy, budget: Budget) -> dict:
        return load.tlsBulk(proxy.tlsAddress, TLS_NAME, budget.warmup, budget.window)


REQ_P50 = Metric("p50", "p50 µs", False)
REQ_P99 = Metric("p99", "p99 µs", False)
CPU_PER_REQ = Metric("cpuUsPerReq", "proxy CPU µs/req", False)


def _cpuPer(proxy, count: str, measure) -> dict:
    """
    Run C{measure()} and add the proxy's CPU time per unit of the figure
    C{count} (requests, connections) to its figures.
    """
    pid = getattr(proxy, "pid", None)
    before = None if pid is None else processCpuSeconds(pid)
    figures = measure()
    if before is not None and figures.get(count):
        figures["cpuUsPer"] = (processCpuSeconds(pid) - before) * 1e6 / figures[count]
    return figures


class TlsPingPong(Scenario):
    """
    Small requests on a kept-alive TLS connection (what HTTPS keep-alive
    does through an L4 proxy that terminates TLS): 64 bytes echoed back,
    one at a time, with the proxy's CPU time per request.
    """

    name = "tls-pingpong"
    title = "TLS termination, 64-byte ping-pong on one kept-alive connection"
    metrics = (REQ_S, REQ_P50, REQ_P99, CPU_PER_REQ)
    ratioMetrics = (REQ_S.key, CPU_PER_REQ.key)
    ceiling = False
    needsTLS = True
    size = 64

    def measure(self, proxy, budget: Budget) -> dict:
        figures = _cpuPer(
            proxy,
            "requests",
            lambda: load.tlsPingPong(proxy.tlsAddress, TLS_NAME, self.size, budget.warmup, budget.window),
        )
        if "cpuUsPer" in figures:
            figures[CPU_PER_REQ.key] = figures.pop("cpuUsPer")
        return figures


class TlsConnectionRate(Scenario):
    """
    New TLS connections, one after the other: connect, handshake, one small
    echo, close; with the proxy's CPU time per connection.
    """

    name = "tls-connrate"
    title = "TLS termination, new connections: connect, handshake, one small echo, close; sequential"
    metrics = (CONN_S, ERRORS, CPU_PER_CONN)
    ratioMetrics = (CONN_S.key, CPU_PER_CONN.key)
    ceiling = False
    needsTLS = True

    def measure(self, proxy, budget: Budget) -> dict:
        figures = _cpuPer(
            proxy,
            "connections",
            lambda: load.tlsConnectionRate(proxy.tlsAddress, TLS_NAME, budget.warmup, budget.window),
        )
        if "cpuUsPer" in figures:
            figures[CPU_PER_CONN.key] = figures.pop("cpuUsPer")
        return figures


SCENARIOS: tuple[Scenario, ...] = (
    Bulk(1, echo=False),
    Bulk(8, echo=False),
    Bulk(1, echo=True),
    Bulk(8, echo=True),
    PingPong(1),
    PingPong(50),
    PingPongProxyProtocol(50),
    ConnectionRate(1),
    ConnectionRate(20),
    IdleMemory(),
    Backpressure(),
    TlsTermination(),
    TlsPingPong(),
    TlsConnectionRate(),
)


def selectScenarios(spec: str | None) -> list[Scenario]:
    """
    The scenarios named by a C{--scenario} value: a comma-separated list of
    names or name prefixes (C{bulk} selects every C{bulk-*}).

    @raise ValueError: a name selects nothing; the text lists the names.
    """
    if not spec:
        return list(SCENARIOS)
    chosen: list[Scenario] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        matches = [s for s in SCENARIOS if s.name == word or s.name.startswith(word + "-")]
        if not matches:
            names = ", ".join(s.name for s in SCENARIOS)
            raise ValueError(f"no scenario is called {word!r}; the scenarios are: {names}")
        chosen.extend(s for s in matches if s not in chosen)
    return [s for s in SCENARIOS if s in chosen]


@dataclass(frozen=True)
class Target:
    """
    One goal tcpproxy is held to, from the issue.

    @ivar scenario: the scenario's name.
    @ivar metric: the figure's key.
    @ivar against: C{"haproxy"} for a ratio against HAProxy in the same
        repetition, or C{None} for the figure itself.
    @ivar atLeast: the figure (or ratio) must be at least C{limit}, else at most.
    """

    label: str
    scenario: str
    metric: str
    against: str | None
    atLeast: bool
    limit: float

    def describe(self) -> str:
        op = "≥" if self.atLeast else "≤"
        if self.against:
            return f"{self.metric} {op} {self.limit:g}× {self.against}"
        return f"{self.metric} {op} {self.limit:g}"

    def met(self, value: float) -> bool:
        return value >= self.limit if self.atLeast else value <= self.limit


TARGETS: tuple[Target, ...] = (
    Target("bulk one-way, 1 conn", "bulk-sink-1", MB_S.key, "haproxy", True, 1.5),
    Target("bulk echoed, 1 conn", "bulk-echo-1", MB_S.key, "haproxy", True, 1.5),
    Target("ping-pong 50 conns", "pingpong-50", REQ_S.key, "haproxy", True, 0.8),
    Target("ping-pong 1 conn", "pingpong-1", "p99", "haproxy", False, 1.05),
    Target("connections 20 concurrent", "connrate-20", CONN_S.key, "haproxy", True, 0.8),
    Target("ping-pong 50 conns, PROXY both ways", "pingpong-50-proxyproto", WITH_RATIO.key, None, True, 0.9),
    Target("memory per idle conn", "idle-memory", KIB_PER_CONN.key, None, False, 3.5),
    Target("backpressure RSS growth", "backpressure", GROWTH.key, None, False, 2.0),
    Target("TLS bulk, 1 conn", "tls", MB_S.key, "haproxy", True, 0.8),
    Target("TLS small requests, kept alive", "tls-pingpong", REQ_S.key, "haproxy", True, 0.8),
    Target("TLS new connections", "tls-connrate", CONN_S.key, "haproxy", True, 0.8),
)
TARGET_PROXY = "tcpproxy"
