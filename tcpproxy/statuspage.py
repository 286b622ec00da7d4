"""
The admin endpoint's status page (C{GET /}): what C{/status} says, as
one small HTML document that a person reads at a glance.

  - No external asset (style inline, no script, no font or image to
    fetch): it renders offline, from a host with no way out.
  - It refreshes itself (C{<meta http-equiv="refresh">}, every
    L{REFRESH} seconds), with no script.
  - One table per app; each target's row is coloured by its state (green
    up, red down, amber draining,
    grey stopped by scale to zero), and says so in words too.
"""

from __future__ import annotations

import datetime
from html import escape

REFRESH = 2
"""
Seconds between two loads of the page.
"""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .3em; }
.meta, .app { color: #555; margin: .2em 0; }
.ready { color: #1b7a1b; font-weight: bold; }
.stopping { color: #b00020; font-weight: bold; }
table { border-collapse: collapse; min-width: 40em; background: #fff; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.up td.state { background: #c8f0c8; }
tr.down td.state { background: #f6c4c4; }
tr.draining td.state { background: #fbe3a6; }
tr.stopped td.state { background: #dddddd; }
tr.down { color: #8a0000; }
"""


def _time(when: float | None) -> str:
    if when is None:
        return "-"
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _limit(value: object) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def renderPage(status: dict, now: float) -> str:
    """
    The page for C{status} (what L{tcpproxy.admin.statusOf} returns), as
    of C{now} (a Unix time).
    """
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        "<title>tcpproxy status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>tcpproxy</h1>",
    ]
    state = (
        '<span class="ready" id="readiness">ready</span>'
        if status["ready"]
        else '<span class="stopping" id="readiness">stopping (draining)</span>'
    )
    config = status["config"]
    out.append(
        f'<p class="meta">{state} &middot; configuration {escape(str(config["path"]))}, loaded '
        f"{_time(config['loadedAt'])} &middot; page of {_time(now)}, refreshed every {REFRESH}s</p>"
    )
    for app in status["apps"]:
        conns = app["connections"]
        refused = sum(conns["refused"].values())
        refusedText = ", ".join(f"{reason} {n}" for reason, n in conns["refused"].items() if n)
        limits = app["limits"]
        out.append(f"<h2>app {escape(app['name'])}</h2>")
        out.append(
            f'<p class="app">ports {", ".join(map(str, app["ports"]))}{" (TLS)" if app["tls"] else ""}'
            f" &middot; <b>{conns['active']}</b> open, {conns['total']} in all, {refused} refused"
            f"{f' ({escape(refusedText)})' if refusedText else ''}"
            f" &middot; {_bytes(app['bytesReceived'])} in, {_bytes(app['bytesSent'])} out"
            f" &middot; limits: MaxConnections {_limit(limits['maxConnections'])},"
            f" per client {_limit(limits['maxConnectionsPerClient'])},"
            f" ConnectTimeout {_limit(limits['connectTimeout'])}s</p>"
        )
        pool = app.get("pool")
        if pool is not None:
            out.append(
                f'<p class="app">warm pool: {pool["size"]} idle connection(s) per target,'
                f" each kept up to {_limit(pool['maxIdle'])}s</p>"
            )
        out.append(f'<table class="targets" data-app="{escape(app["name"])}">')
        out.append(
            "<tr><th>target</th><th>state</th><th>open</th>"
            + ("<th>pooled (idle)</th>" if pool is not None else "")
            + "<th>connections</th><th>failed connects</th><th>last error</th></tr>"
        )
        for target in app["targets"]:
            errors = sum(target["errors"].values())
            last = target["lastError"]
            lastText = "-" if last is None else f"{_time(last['at'])}: {last['reason']}"
            out.append(
                f'<tr class="{target["state"]}"><td>{escape(target["target"])}</td>'
                f'<td class="state">{target["state"]}</td>'
                f'<td class="n">{target["active"]}</td>'
                + (f'<td class="n pooled">{target["pooled"]}</td>' if pool is not None else "")
                + f'<td class="n">{target["connections"]}</td>'
                f'<td class="n">{errors}</td><td>{escape(lastText)}</td></tr>'
            )
        out.append("</table>")
    if "workers" in status:
        out.extend(_workers(status["workers"]))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _workers(workers: list[dict]) -> list[str]:
    """
    With C{--workers N}: a table of the workers (the apps above are their
    sums), each with its pid, restarts and open connections.
    """
    out = [
        "<h2>workers</h2>",
        '<table class="workers">',
        "<tr><th>worker</th><th>pid</th><th>state</th><th>restarts</th><th>open</th><th>connections</th></tr>",
    ]
    for worker in workers:
        active = sum(app["connections"]["active"] for app in worker["apps"])
        total = sum(app["connections"]["total"] for app in worker["apps"])
        state = "up" if worker["running"] else "down"
        out.append(
            f'<tr class="{state}"><td class="n">{worker["worker"]}</td>'
            f'<td class="n">{worker["pid"] or "-"}</td>'
            f'<td class="state">{"running" if worker["running"] else "not answering"}</td>'
            f'<td class="n">{worker["restarts"]}</td><td class="n">{active}</td>'
            f'<td class="n">{total}</td></tr>'
        )
    out.append("</table>")
    return out
