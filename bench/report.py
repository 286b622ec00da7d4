"""
From measurements to a report: medians, ratios per repetition, the
bottleneck check, the targets, and their rendering as terminal tables.

The summary built here is plain data (what C{--json} writes); the tables
are drawn from it alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.scenarios import TARGET_PROXY, TARGETS, Scenario

DIRECT = "direct"
HAPROXY = "haproxy"
REFERENCES = (DIRECT, HAPROXY)

FAR_ENOUGH = 1.5
"""
How many times faster than every proxy I{direct} must be on a throughput
for the load generator and backends to be trusted not to limit the proxy.
"""

OTHERS_ON_PROXY_CPU = "othersOnProxyCpu"
OTHERS_ON_LOAD_CPU = "othersOnLoadCpu"
DISTURBED = 0.20
"""
The share of a CPU other processes may take during a measurement before
the report warns that the figure is disturbed.  Kernel work that no process
is charged for (softirqs) shows as up to about 10% on its own.
"""


@dataclass
class Measurement:
    """
    One proxy, one scenario, one repetition: its figures or why it failed.
    """

    figures: dict | None = None
    error: str | None = None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


def median(values: Sequence[float | None]) -> float | None:
    """
    The median of the values that are there, or C{None} if none is.
    """
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def summarizeScenario(scenario: Scenario, proxies: Sequence[str], runs: dict[str, list[Measurement]]) -> dict:
    """
    The JSON-ready summary of one scenario: every figure of every
    repetition, medians, and ratios against direct and HAProxy per repetition.
    """
    entry: dict = {
        "name": scenario.name,
        "title": scenario.title,
        "skipped": scenario.skipped,
        "metrics": [
            {"key": m.key, "label": m.label, "higherIsBetter": m.higherIsBetter} for m in scenario.metrics
        ],
        "ratioMetrics": list(scenario.ratioMetrics),
        "results": {},
        "ratios": {},
        "warnings": [],
    }
    if scenario.skipped:
        return entry
    keys = [m.key for m in scenario.metrics]
    for name in proxies:
        measured = runs.get(name)
        if not measured:
            continue
        figures = [m.figures for m in measured]
        entry["results"][name] = {
            "runs": figures,
            "errors": [m.error for m in measured],
            "median": {k: median([_number(f.get(k)) if f else None for f in figures]) for k in keys},
        }
    for name, result in entry["results"].items():
        entry["ratios"][name] = {}
        for reference in REFERENCES:
            if reference not in entry["results"]:
                continue
            theirs = entry["results"][reference]["runs"]
            entry["ratios"][name][reference] = {
                key: [
                    _ratio(_number(mine.get(key)) if mine else None, _number(ref.get(key)) if ref else None)
                    for mine, ref in zip(result["runs"], theirs, strict=False)
                ]
                for key in scenario.ratioMetrics
            }
    entry["warnings"] = _ceilingWarnings(scenario, entry["results"]) + _disturbanceWarnings(
        scenario, entry["results"]
    )
    return entry


def _disturbanceWarnings(scenario: Scenario, results: dict) -> list[str]:
    # Pinning keeps our processes apart, not other people's off our CPUs.
    disturbed = []
    for name, result in results.items():
        for rep, figures in enumerate(result["runs"], 1):
            shares = [
                (where, _number((figures or {}).get(key)))
                for where, key in (("proxy CPU", OTHERS_ON_PROXY_CPU), ("load CPU", OTHERS_ON_LOAD_CPU))
            ]
            busy = [f"{where} {share:.0%}" for where, share in shares if share and share > DISTURBED]
            if busy:
                disturbed.append(f"{name} #{rep} ({', '.join(busy)})")
    if not disturbed:
        return []
    return [
        f"{scenario.name}: other processes took over {DISTURBED:.0%} of our CPUs during "
        f"{'; '.join(disturbed)}: those figures are disturbed"
    ]


def _ceilingWarnings(scenario: Scenario, results: dict) -> list[str]:
    # Direct is the load generator and the backend alone: if a proxy comes
    # near it, what limits that proxy's figure may be them, not the proxy.
    if not scenario.ceiling or DIRECT not in results:
        return []
    main = scenario.metrics[0]
    direct = results[DIRECT]["median"].get(main.key)
    warnings = []
    for name, result in results.items():
        value = result["median"].get(main.key)
        if name == DIRECT or direct is None or value is None:
            continue
        if direct < FAR_ENOUGH * value:
            warnings.append(
                f"{scenario.name}: direct is only {direct / value:.2f}× {name} "
                f"({formatFigure(direct)} vs {formatFigure(value)} {main.label}): "
                f"the load generator and backends may be what limits {name} here "
                "(ratios against it flatter the others)"
            )
    return warnings


def evaluateTargets(scenarios: list[dict]) -> list[dict]:
    """
    Hold tcpproxy to each target whose scenario was run: the median of the
    per-repetition ratios against HAProxy, or the median figure itself.
    """
    byName = {s["name"]: s for s in scenarios}
    verdicts = []
    for target in TARGETS:
        scenario = byName.get(target.scenario)
        if scenario is None or scenario["skipped"]:
            continue
        row = {
            "label": target.label,
            "scenario": target.scenario,
            "target": target.describe(),
            "against": target.against,
            "measured": None,
            "perRepetition": [],
            "verdict": "n/a",
            "why": None,
        }
        result = scenario["results"].get(TARGET_PROXY)
        if result is None:
            row["why"] = f"{TARGET_PROXY} not measured"
        elif target.against:
            ratios = scenario["ratios"].get(TARGET_PROXY, {}).get(target.against)
            if ratios is None:
                row["why"] = f"{target.against} not measured"
            else:
                row["perRepetition"] = ratios[target.metric]
                row["measured"] = median(ratios[target.metric])
        else:
            row["perRepetition"] = [_number(f.get(target.metric)) if f else None for f in result["runs"]]
            row["measured"] = result["median"].get(target.metric)
        if row["measured"] is not None:
            row["verdict"] = "PASS" if target.met(row["measured"]) else "MISS"
        elif row["why"] is None:
            row["why"] = "no successful measurement"
        verdicts.append(row)
    return verdicts


def formatFigure(value: float | None) -> str:
    """
    A figure with as many decimals as its size deserves.
    """
    if value is None:
        return "-"
    magnitude = abs(value)
    if value == int(value) and magnitude < 100:
        return str(int(value))
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _showRatios(ratios: Sequence[float | None]) -> str:
    return " ".join("-" if r is None else f"{r:.2f}" for r in ratios)


def _table(rows: list[list[str]], align: str, indent: str = "  ") -> list[str]:
    # align: one letter a column, "l" or "r".
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if how == "l" else cell.rjust(width)
            for cell, width, how in zip(row, widths, align, strict=True)
        ]
        lines.append(indent + "  ".join(cells).rstrip())
    return lines


def renderScenario(entry: dict) -> list[str]:
    """
    The terminal table of one scenario: medians, then for each ratio metric
    the figures and the ratios of every repetition.
    """
    lines = [f"== {entry['name']}: {entry['title']} =="]
    if entry["skipped"]:
        return [*lines, f"  {entry['skipped']}", ""]
    results = entry["results"]
    if not results:
        return [*lines, "  nothing measured", ""]
    metrics = entry["metrics"]
    header = ["median of runs"] + [m["label"] for m in metrics]
    rows = [header]
    for name, result in results.items():
        rows.append([name] + [formatFigure(result["median"][m["key"]]) for m in metrics])
    lines += _table(rows, "l" + "r" * len(metrics))
    labels = {m["key"]: m for m in metrics}
    for key in entry["ratioMetrics"]:
        metric = labels[key]
        better = "higher" if metric["higherIsBetter"] else "lower"
        rows = [[f"{metric['label']} ({better} is better)", "per repetition", "× direct", "× haproxy"]]
        for name, result in results.items():
            values = " ".join(formatFigure(_number(f.get(key)) if f else None) for f in result["runs"])
            ratios = entry["ratios"].get(name, {})
            rows.append(
                [
                    name,
                    values,
                    _showRatios(ratios[DIRECT][key]) if DIRECT in ratios else "-",
                    _showRatios(ratios[HAPROXY][key]) if HAPROXY in ratios else "-",
                ]
            )
        lines += _table(rows, "lrrr")
    for name, result in results.items():
        for rep, error in enumerate(result["errors"], 1):
            if error:
                lines.append(f"  ERROR {name}, repetition {rep}: {error}")
        for rep, figures in enumerate(result["runs"], 1):
            kinds = (figures or {}).get("errorKinds")
            if kinds:
                shown = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
                lines.append(f"  {name}, repetition {rep}: connection errors: {shown}")
    lines += [f"  warning: {w}" for w in entry["warnings"]]
    return [*lines, ""]


def renderTargets(verdicts: list[dict]) -> list[str]:
    """
    Each target next to what tcpproxy measured, with PASS or MISS.
    """
    if not verdicts:
        return []
    lines = [
        f"== targets for {TARGET_PROXY}: median of the per-repetition ratios "
        "(or of the figures), same run, proxy pinned to one core =="
    ]
    rows = [["target", "scenario", "wanted", "measured", "per repetition", "verdict"]]
    for v in verdicts:
        suffix = f"× {v['against']}" if v["against"] else ""
        measured = "-" if v["measured"] is None else f"{v['measured']:.2f}{suffix}"
        verdict = v["verdict"] if v["why"] is None else f"{v['verdict']} ({v['why']})"
        rows.append(
            [v["label"], v["scenario"], v["target"], measured, _showRatios(v["perRepetition"]), verdict]
        )
    return [*lines, *_table(rows, "lllrrl"), ""]


def renderHeader(meta: dict) -> list[str]:
    lines = [f"tcpproxy benchmark: {meta['mode']}, {meta['repeat']} repetition(s), started {meta['started']}"]
    machine = meta["machine"]
    lines.append(
        f"machine: {machine['cpus']} CPUs ({machine['cpuModel']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, Twisted {meta['twisted']}, load average {machine['loadAverageAtStart']}"
    )
    lines.append(f"pinning: {meta['pinning']}")
    b = meta["budget"]
    lines.append(
        f"each measurement: {b['warmup']:g}s warm-up then a {b['window']:g}s window; "
        f"idle memory with {b['idleConnections']} connections; backpressure: {b['pushBytes'] / 1e6:g} MB "
        f"offered for {b['pushSeconds']:g}s"
    )
    for proxy in meta["proxies"]:
        lines.append(f"  {proxy['name']:<12} {proxy['status']:<8} {proxy['description']}")
    return [*lines, ""]


def render(summary: dict) -> str:
    """
    The whole report as terminal text.
    """
    lines = renderHeader(summary["meta"])
    for entry in summary["scenarios"]:
        lines += renderScenario(entry)
    lines += renderTargets(summary["targets"])
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    for failure in summary["failures"]:
        lines.append(f"FAILED: {failure}")
    lines.append(f"run took {summary['seconds']:.0f}s")
    return "\n".join(lines) + "\n"
