"""
C{--plot}: throughput and latency percentiles, against time or, for a
sweep, against the number of connections.

matplotlib is an optional dependency (the C{plot} extra); it is imported
only here, and drawn with its Agg canvas so that no display is needed.
"""

from __future__ import annotations

from tcpproxy.tester.load import RunResult

LATENCIES = (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))


class PlotError(Exception):
    """
    The plot cannot be drawn (matplotlib missing, file not writable).
    """


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib, which is not installed: pip install 'tcpproxy[plot]'"
        ) from None
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    throughput, latency = figure.subplots(2, 1, sharex=True)
    return figure, throughput, latency


def _latencyAxis(axis, x, rows) -> None:
    for key, label in LATENCIES:
        points = [(xv, row[key]) for xv, row in zip(x, rows, strict=True) if row[key] is not None]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    axis.set_ylabel("latency (µs)")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="upper left")


def _save(figure, path: str) -> None:
    try:
        figure.savefig(path, dpi=100)
    except OSError as e:
        raise PlotError(f"--plot {path}: cannot write it: {e.strerror or e}") from None


def plotRun(result: RunResult, path: str) -> None:
    """
    Draw one run's time series: req/s (and the target rate of an open
    loop) above, p50/p99/p99.9 latency below, against seconds into the run.
    """
    figure, throughput, latency = _figure()
    samples = result.samples
    x = [s.t for s in samples]
    throughput.plot(x, [s.total.reqPerSec for s in samples], marker=".", label="replies/s")
    if any(s.targetRate is not None for s in samples):
        target = [(s.t, s.targetRate) for s in samples if s.targetRate is not None]
        throughput.plot([p[0] for p in target], [p[1] for p in target], linestyle="--", label="target rate")
    throughput.set_ylabel("replies per second")
    throughput.set_ylim(bottom=0)
    throughput.grid(True, alpha=0.3)
    throughput.legend(loc="upper left")
    throughput.set_title(
        f"tcpproxy-tester load: {result.connectionsPerPort} connection(s) per port, {result.pacing}",
        fontsize="medium",
    )
    _latencyAxis(latency, x, [s.total.latency for s in samples])
    latency.set_xlabel("seconds into the run")
    _save(figure, path)


def plotSweep(results: list[RunResult], path: str) -> None:
    """
    Draw a sweep: total req/s above, p50/p99/p99.9 latency below, against
    the number of connections per port.
    """
    figure, throughput, latency = _figure()
    x = [r.connectionsPerPort for r in results]
    throughput.plot(x, [r.total.reqPerSec for r in results], marker="o", label="replies/s")
    throughput.set_ylabel("replies per second")
    throughput.set_ylim(bottom=0)
    throughput.grid(True, alpha=0.3)
    throughput.legend(loc="upper left")
    throughput.set_title(f"tcpproxy-tester load sweep: {results[0].pacing}", fontsize="medium")
    _latencyAxis(latency, x, [r.total.latency for r in results])
    if len(x) > 1 and max(x) / min(x) >= 10:
        latency.set_xscale("log")
    latency.set_xlabel("connections per port")
    _save(figure, path)
