"""
Reporting a load run: the tables on the terminal and the JSON document.

Both are built from the same L{RunResult}s, so a figure in the JSON is the
figure in the table.
"""

from __future__ import annotations

import json

from tcpproxy.tester.load import RunResult
from tcpproxy.tester.stats import Figures

SCHEMA_VERSION = 1

_LATENCY_COLUMNS = ("min", "p50", "p90", "p99", "p999", "max")


def _latency(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _row(label: str, count: int, figures: Figures) -> list[str]:
    return [
        label,
        str(count),
        str(figures.sent),
        str(figures.errors),
        str(figures.dropped),
        f"{figures.reqPerSec:.1f}",
        f"{figures.mbPerSec:.3f}",
        *(_latency(figures.latency[key]) for key in _LATENCY_COLUMNS),
    ]


def _layout(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def formatTable(result: RunResult) -> str:
    """
    One row per app and one in total, then what the figures are over and
    every kind of error, naming the app and port.
    """
    header = ["app", "conns", "messages", "errors", "dropped", "req/s", "MB/s", *_LATENCY_COLUMNS]
    rows = [_row(name, result.connections.get(name, 0), figures) for name, figures in result.apps.items()]
    rows.append(_row("total", sum(result.connections.values()), result.total))
    lines = _layout(header, rows)
    lines.append(
        f"latency in microseconds; {result.seconds:.2f}s, {result.connectionsPerPort} connection(s) "
        f"per port, {result.pacing}; {result.payload} per message"
    )
    if result.errorKinds:
        lines.append("errors:")
        for app, port, kind, count in result.errorKinds:
            lines.append(f"  app {json.dumps(app)} port {port}: {count} x {kind}")
    return "\n".join(lines)


def formatSweep(results: list[RunResult]) -> str:
    """
    The totals of a sweep, one row per connection count.
    """
    header = ["conns/port", "conns", "messages", "errors", "dropped", "req/s", "MB/s", *_LATENCY_COLUMNS]
    rows = []
    for result in results:
        row = _row(str(result.connectionsPerPort), sum(result.connections.values()), result.total)
        rows.append(row)
    return "\n".join(_layout(header, rows) + ["latency in microseconds"])


def runDocument(result: RunResult) -> dict:
    """
    One run as JSON: the figures of L{formatTable} and the time series.
    """
    return {
        "connectionsPerPort": result.connectionsPerPort,
        "seconds": round(result.seconds, 6),
        "pacing": result.pacing,
        "payload": result.payload,
        "ports": [{"app": p.app, "port": p.port, "address": str(p.target)} for p in result.ports],
        "connections": dict(result.connections),
        "total": result.total.asDict(),
        "apps": {name: figures.asDict() for name, figures in result.apps.items()},
        "errors": [
            {"app": app, "port": port, "kind": kind, "count": count}
            for app, port, kind, count in result.errorKinds
        ],
        "series": [sample.asDict() for sample in result.samples],
    }


def reportDocument(results: list[RunResult], config: str, settings: dict) -> dict:
    """
    The whole C{--report} document: every run (one, or one per sweep step).

    @param config: the configuration file the ports came from.
    @param settings: the options as given, for the record.
    """
    return {
        "tool": "tcpproxy-tester load",
        "schema": SCHEMA_VERSION,
        "config": config,
        "settings": settings,
        "runs": [runDocument(result) for result in results],
    }


def writeReport(path: str, document: dict) -> None:
    """
    Write C{document} to C{path} as indented JSON.

    @raise OSError: as the file system refuses it.
    """
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
