"""
What the proxy counts, and the Prometheus collector that reads it.

The counters are kept where the events happen, once per connection or
per connect attempt, never per byte: the app's factory counts clients in
and out (L{tcpproxy.limits.ConnectionCounter}) and hands each ended
connection to its L{AppStats}; the dialer tells L{AppStats} of every
connect attempt's outcome.  Bytes are counted by the relay anyway (for
the access log): those of open connections are read at scrape time,
those of ended ones were added up when they ended.

L{ProxyCollector} turns all of it into the series of the C{/metrics} page
(L{tcpproxy.admin}), at scrape time, as a C{prometheus_client} custom
collector: nothing is done for Prometheus between two scrapes.  Labels
are C{app}, C{target} and C{reason}, never a client's address (which
would make one series per client).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tcpproxy.access import END_NO_TARGET
from tcpproxy.config import Target
from tcpproxy.limits import REFUSED_APP_LIMIT, REFUSED_CLIENT_LIMIT, REFUSED_DENIED
from tcpproxy.pool import WarmPool

if TYPE_CHECKING:
    from tcpproxy.app import ProxyServerFactory

REFUSED_TLS = "tls_handshake"
REFUSED_DRAINING = "draining"
REFUSED_NO_TARGET = "no_target"
REFUSED_LIMIT = "limit"

REFUSAL_REASONS = (REFUSED_DENIED, REFUSED_LIMIT, REFUSED_NO_TARGET, REFUSED_TLS, REFUSED_DRAINING)
"""
The C{reason} label of C{tcpproxy_refused_total}, each always present.
"""

_REFUSAL_LABEL = {REFUSED_APP_LIMIT: REFUSED_LIMIT, REFUSED_CLIENT_LIMIT: REFUSED_LIMIT}
"""
The label of a refusal counted under another name by the app's counter
(the limits' own names, which its log lines use).
"""

CONNECT_ERRORS = ("refused", "timeout", "unreachable", "dns", "tls", "reset")
"""
The C{reason} label of C{tcpproxy_target_connect_errors_total}, as the
dialer classifies a failed connect (L{tcpproxy.dialer.failureKind}).
"""

POOL_DROPPED = ("closed", "expired")
"""
The C{reason} label of C{tcpproxy_target_pool_dropped_total}: why the
warm pool (L{tcpproxy.pool}) gave up an idle connection without handing
it to a client.  C{closed}: the target closed or reset it, or it failed
(seen as it happened, or when a client was about to take it): many of
these mean the target drops idle connections sooner than the pool's
C{MaxIdle}.  C{expired}: it waited C{MaxIdle} seconds for a client.
"""

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""
Upper bounds (seconds) of the connect-time histogram: from a loopback
connect (tens of microseconds) to a C{ConnectTimeout}.
"""

DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
"""
Upper bounds (seconds) of the connection-duration histogram: from a
request and its answer to a day-long stream.
"""


class Histogram:
    """
    Observations in fixed buckets, as Prometheus counts them (a value goes
    in the first bucket whose bound is at least the value; C{+Inf} last).
    A list and a sum: what C{prometheus_client}'s own histogram keeps, less
    its lock and per-observation objects.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """
        C{(le, count)} pairs, cumulative, C{+Inf} last: Prometheus' form.
        """
        buckets, total = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class TargetStats:
    """
    One target's connects, as its app's dialer reported them.

    @ivar connections: connects that succeeded.
    @ivar errors: failed connects, by kind (L{CONNECT_ERRORS}).
    @ivar lastError: C{(when, reason text)} of the last failed connect, or C{None}.
    @ivar connectTime: L{Histogram} of the seconds successful connects took
        (TLS handshake included).
    @ivar poolHits: clients given a connection of the app's warm pool.
    @ivar poolMisses: clients for whom the target was dialled because its
        pool had no idle connection (the first target of their order only:
        the one the pool is asked for).  C{poolHits / (poolHits +
        poolMisses)} is the pool's hit ratio.
    @ivar poolDropped: idle pooled connections given up, by
        L{POOL_DROPPED} reason.
    """

    __slots__ = ("connections", "errors", "lastError", "connectTime", "poolHits", "poolMisses", "poolDropped")

    def __init__(self) -> None:
        self.connections = 0
        self.errors: Counter[str] = Counter()
        self.lastError: tuple[float, str] | None = None
        self.connectTime = Histogram(CONNECT_BUCKETS)
        self.poolHits = 0
        self.poolMisses = 0
        self.poolDropped: Counter[str] = Counter()


class AppStats:
    """
    One app's totals beyond what its L{ConnectionCounter} keeps: bytes and
    durations of the connections that ended, and its targets' connects.

    It lives as long as the app's factory (reloads included); a target's
    figures go when the target leaves the configuration (L{keepTargets}).

    @ivar bytesIn: bytes from the clients of the connections that ended.
    @ivar bytesOut: bytes to those clients.
    @ivar noTarget: connections closed because no target could be reached.
    @ivar duration: L{Histogram} of the seconds connections lasted.
    @ivar targets: L{TargetStats} by target.
    """

    def __init__(self, targets: Iterable[Target] = ()) -> None:
        self.bytesIn = 0
        self.bytesOut = 0
        self.noTarget = 0
        self.duration = Histogram(DURATION_BUCKETS)
        self.targets: dict[Target, TargetStats] = {}
        self.keepTargets(targets)

    def keepTargets(self, targets: Iterable[Target]) -> None:
        """
        The app's targets are now C{targets} (a reload): the ones that stay
        keep their figures.
        """
        self.targets = {t: self.targets.get(t) or TargetStats() for t in targets}

    def ended(self, bytesIn: int, bytesOut: int, end: str, duration: float) -> None:
        """
        A connection ended, after C{duration} seconds, the way C{end} says.
        """
        self.bytesIn += bytesIn
        self.bytesOut += bytesOut
        if end == END_NO_TARGET:
            self.noTarget += 1
        self.duration.observe(duration)

    def connected(self, target: Target, seconds: float) -> None:
        """
        The dialer connected to C{target} in C{seconds}.
        """
        stats = self.targets.get(target)
        if stats is not None:
            stats.connections += 1
            stats.connectTime.observe(seconds)

    def failed(self, target: Target, kind: str, why: str, when: float) -> None:
        """
        A connect to C{target} failed at C{when}: C{kind} is one of
        L{CONNECT_ERRORS}, C{why} the words of the log.
        """
        stats = self.targets.get(target)
        if stats is not None:
            stats.errors[kind] += 1
            stats.lastError = (when, why)

    def pooled(self, target: Target, hit: bool) -> None:
        """
        A client's first target was C{target}: it was given a pooled
        connection (C{hit}), or C{target} was dialled for it.
        """
        stats = self.targets.get(target)
        if stats is not None:
            if hit:
                stats.poolHits += 1
            else:
                stats.poolMisses += 1

    def poolDropped(self, target: Target, reason: str) -> None:
        """
        An idle pooled connection to C{target} was given up, for
        C{reason} (one of L{POOL_DROPPED}).
        """
        stats = self.targets.get(target)
        if stats is not None:
            stats.poolDropped[reason] += 1


def refusals(factory: ProxyServerFactory) -> dict[str, int]:
    """
    How many clients the app of C{factory} refused, by L{REFUSAL_REASONS}.
    """
    counts = dict.fromkeys(REFUSAL_REASONS, 0)
    for reason, count in factory.counter.refusals.items():
        label = _REFUSAL_LABEL.get(reason, reason)
        counts[label] = counts.get(label, 0) + count
    counts[REFUSED_NO_TARGET] += factory.stats.noTarget
    return counts


def openByTarget(factory: ProxyServerFactory) -> Counter[Target]:
    """
    The app's open connections, counted by the target they are relayed to
    (or being dialled): the counts its balancer keeps
    (L{tcpproxy.balancer.Load}), which the policies and the targets'
    C{MaxConnections} read too.
    """
    return Counter(factory.balancer.load.counts)


def idleByTarget(factory: ProxyServerFactory) -> Counter[Target] | None:
    """
    The idle connections the app's warm pool holds now, by target; C{None}
    if the app has no pool.
    """
    dialer = factory.dialer
    if not isinstance(dialer, WarmPool):
        return None
    return Counter({target: len(idle) for target, idle in dialer.idle.items()})


def bytesTotals(factory: ProxyServerFactory) -> tuple[int, int]:
    """
    Bytes from and to the app's clients so far: those of ended connections,
    and those the open ones have relayed until now.
    """
    bytesIn, bytesOut = factory.stats.bytesIn, factory.stats.bytesOut
    for relay in factory.relays:
        bytesIn += relay.bytesIn
        bytesOut += relay.bytesOut
    return bytesIn, bytesOut


class ProxyCollector(Collector):
    """
    The proxy's series, read from a running L{tcpproxy.service.ProxyService}
    at each scrape (a C{prometheus_client} custom collector).

    Apps are those of the running configuration; a removed app's series go
    with it.
    """

    def __init__(self, service) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service
        factories = list(service.factories.values())

        def family(kind, name, doc, labels, rows):
            metric = kind(name, doc, labels=labels)
            for labelValues, value in rows:
                metric.add_metric(labelValues, value)
            return metric

        accepted, active, refused, received, sent, queued = [], [], [], [], [], []
        tActive, tTotal, tErrors, tUp, tConnect, durations = [], [], [], [], [], []
        tStopped, pIdle, pHits, pMisses, pDropped = [], [], [], [], []
        for factory in factories:
            app = factory.app.name
            accepted.append(([app], factory.counter.opened))
            active.append(([app], factory.counter.total))
            queued.append(([app], len(factory.dispatcher.queue)))
            for reason, count in refusals(factory).items():
                refused.append(([app, reason], count))
            bytesIn, bytesOut = bytesTotals(factory)
            received.append(([app], bytesIn))
            sent.append(([app], bytesOut))
            durations.append(([app], factory.stats.duration))
            open = openByTarget(factory)
            for target, stats in factory.stats.targets.items():
                labels = [app, str(target)]
                tActive.append((labels, open[target]))
                tTotal.append((labels, stats.connections))
                for kind in CONNECT_ERRORS:
                    tErrors.append(([*labels, kind], stats.errors[kind]))
                state = factory.health.stateOf(target)
                tUp.append((labels, 1 if state == "up" else 0))
                tStopped.append((labels, 1 if state == "stopped" else 0))
                tConnect.append((labels, stats.connectTime))
            idle = idleByTarget(factory)
            if idle is None:
                continue
            for target, stats in factory.stats.targets.items():
                labels = [app, str(target)]
                pIdle.append((labels, idle[target]))
                pHits.append((labels, stats.poolHits))
                pMisses.append((labels, stats.poolMisses))
                for reason in POOL_DROPPED:
                    pDropped.append(([*labels, reason], stats.poolDropped[reason]))

        yield family(CounterMetricFamily, "tcpproxy_connections", "Clients accepted.", ["app"], accepted)
        yield family(GaugeMetricFamily, "tcpproxy_connections_active", "Clients open now.", ["app"], active)
        yield family(
            GaugeMetricFamily,
            "tcpproxy_queue_length",
            "Clients waiting for a target below its MaxConnections.",
            ["app"],
            queued,
        )
        yield family(
            CounterMetricFamily, "tcpproxy_refused", "Clients refused, by reason.", ["app", "reason"], refused
        )
        yield family(CounterMetricFamily, "tcpproxy_bytes_received", "Bytes from clients.", ["app"], received)
        yield family(CounterMetricFamily, "tcpproxy_bytes_sent", "Bytes to clients.", ["app"], sent)
        yield family(
            GaugeMetricFamily,
            "tcpproxy_target_connections_active",
            "Connections open to the target now (those being dialled included).",
            ["app", "target"],
            tActive,
        )
        yield family(
            CounterMetricFamily,
            "tcpproxy_target_connections",
            "Connections made to the target.",
            ["app", "target"],
            tTotal,
        )
        yield family(
            CounterMetricFamily,
            "tcpproxy_target_connect_errors",
            "Failed connects to the target, by reason.",
            ["app", "target", "reason"],
            tErrors,
        )
        yield family(
            GaugeMetricFamily,
            "tcpproxy_target_up",
            "1 if the target is in rotation (up and not drained), else 0.",
            ["app", "target"],
            tUp,
        )
        yield family(
            GaugeMetricFamily,
            "tcpproxy_target_stopped",
            "1 if the target is stopped by scale to zero (not down: woken for the next client), else 0.",
            ["app", "target"],
            tStopped,
        )
        yield family(
            GaugeMetricFamily,
            "tcpproxy_target_pool_idle_connections",
            "Idle connections the app's warm pool holds open to the target now (apps with a Pool).",
            ["app", "target"],
            pIdle,
        )
        yield family(
            CounterMetricFamily,
            "tcpproxy_target_pool_hits",
            "Clients given a pooled connection to the target, with no dial.",
            ["app", "target"],
            pHits,
        )
        yield family(
            CounterMetricFamily,
            "tcpproxy_target_pool_misses",
            "Clients for whom the target was dialled because its pool had no idle connection.",
            ["app", "target"],
            pMisses,
        )
        yield family(
            CounterMetricFamily,
            "tcpproxy_target_pool_dropped",
            "Idle pooled connections given up: closed by the target (or failed), or expired after MaxIdle.",
            ["app", "target", "reason"],
            pDropped,
        )
        yield _histogram(
            "tcpproxy_target_connect_seconds",
            "Time to connect to the target, TLS handshake included.",
            ["app", "target"],
            tConnect,
        )
        yield _histogram(
            "tcpproxy_connection_duration_seconds", "How long connections lasted.", ["app"], durations
        )
        yield family(
            CounterMetricFamily,
            "tcpproxy_reloads",
            "Configuration reloads, by result.",
            ["result"],
            [([result], service.reloadCounts[result]) for result in _reloadResults(service)],
        )
        yield GaugeMetricFamily(
            "tcpproxy_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded (Unix time).",
            value=service.loadedAt,
        )


RELOAD_RESULTS = ("applied", "applied_with_errors", "not_applied", "no_change", "refused")
"""
The C{result} label of C{tcpproxy_reloads_total}: a reload's status
(L{tcpproxy.applying}) with underscores for spaces, each always present.
"""


def _reloadResults(service) -> list[str]:
    return [*RELOAD_RESULTS, *sorted(set(service.reloadCounts) - set(RELOAD_RESULTS))]


def _histogram(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], Histogram]]) -> Metric:
    metric = HistogramMetricFamily(name, doc, labels=labels)
    for labelValues, histogram in rows:
        metric.add_metric(labelValues, histogram.cumulative(), histogram.sum)
    return metric
