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
    from matplotlib.ticker import FuncFormatter

    values = []
    for key, label in LATENCIES:
        points = [(xv, row[key]) for xv, row in zip(x, rows, strict=True) if row[key] is not None]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
            values.extend(p[1] for p in points)
    axis.set_ylabel("latency (µs)")
    axis.set_yscale("log")
    # Plain numbers, not powers of ten; over a narrow range (where a decade
    # has at most one tick) the 2s and 5s are labelled too.
    narrow = bool(values) and max(values) < 100 * min(values)
    axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axis.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:,.0f}" if narrow and f"{v:.0e}"[0] in "25" else "")
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="upper left")


def _fromZero(axis) -> None:
    """
    Start the y axis at 0, with room above the highest point.
    """
    highest = max((max(line.get_ydata(), default=0) for line in axis.get_lines()), default=0)
    axis.set_ylim(0, highest * 1.1 or 1)


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
    # A last interval much shorter than the rest is the tail of the drain:
    # its rate says little, and drawn it looks like a collapse.
    samples = result.samples
    if len(samples) > 1 and samples[-1].total.seconds < 0.5 * samples[0].total.seconds:
        samples = samples[:-1]
    x = [s.t for s in samples]
    throughput.plot(x, [s.total.reqPerSec for s in samples], marker=".", label="replies/s")
    if any(s.targetRate is not None for s in samples):
        target = [(s.t, s.targetRate) for s in samples if s.targetRate is not None]
        throughput.plot([p[0] for p in target], [p[1] for p in target], linestyle="--", label="target rate")
    throughput.set_ylabel("replies per second")
    _fromZero(throughput)
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
    _fromZero(throughput)
    throughput.grid(True, alpha=0.3)
    throughput.legend(loc="upper left")
    throughput.set_title(f"tcpproxy-tester load sweep: {results[0].pacing}", fontsize="medium")
    _latencyAxis(latency, x, [r.total.latency for r in results])
    if len(x) > 1 and max(x) / min(x) >= 10:
        latency.set_xscale("log")
    from matplotlib.ticker import NullFormatter, NullLocator

    latency.xaxis.set_minor_locator(NullLocator())
    latency.xaxis.set_minor_formatter(NullFormatter())
    latency.set_xticks(x, [str(count) for count in x])
    latency.set_xlabel("connections per port")
    _save(figure, path)
