"""
The command line: C{python -m bench [--quick] [--repeat N] [--json FILE]
[--only NAMES] [--scenario NAMES]}.

Exit status: 0 if the suite worked (whatever the figures), 1 if a proxy did
not start or a measurement could not be made, 2 for a usage error, 130 if
interrupted.  Targets that are missed do not change it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile

from bench.backends import NotReady
from bench.proxies import findHAProxy
from bench.report import render
from bench.runner import ON_REQUEST, PROXY_NAMES, BenchmarkRun
from bench.scenarios import FULL, QUICK, SCENARIOS, selectScenarios
from bench.system import planCpus, raiseFileLimit


def _proxyList(text: str) -> list[str]:
    names = [word.strip() for word in text.split(",") if word.strip()]
    unknown = [name for name in names if name not in PROXY_NAMES]
    if unknown or not names:
        named = ", ".join(map(repr, unknown)) or "(none given)"
        raise argparse.ArgumentTypeError(f"unknown proxy {named}; choose from {', '.join(PROXY_NAMES)}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    scenarios = ", ".join(s.name for s in SCENARIOS)
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark tcpproxy against no proxy (direct), HAProxy and Twisted's portforward, "
            "on loopback backends started by the benchmark itself."
        ),
        epilog=f"Scenarios: {scenarios}. A prefix selects several (bulk, pingpong, connrate).",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke mode: one repetition, tiny sizes, under a minute"
    )
    p.add_argument(
        "--repeat", type=_positive, help="repetitions of each scenario (default 3; 1 with --quick)"
    )
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    p.add_argument(
        "--only",
        type=_proxyList,
        metavar="NAMES",
        help=f"comma-separated proxies to measure, from {', '.join(PROXY_NAMES)} (direct is always measured;"
        " tcpproxy-admin, tcpproxy with its admin endpoint on, and tcpproxy-2w, with two worker"
        " processes, only when named here)",
    )
    p.add_argument("--scenario", metavar="NAMES", help="comma-separated scenarios (or prefixes) to run")
    p.add_argument(
        "--haproxy", metavar="PATH", help="the haproxy binary (default: found on PATH or /usr/sbin)"
    )
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure tcpproxy from another checkout (say, a worktree of the commit before a change)"
        ' as proxy "baseline", in the same run',
    )
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    if not sys.platform.startswith("linux"):
        sys.stderr.write("bench: error: the benchmark needs Linux (CPU pinning, /proc)\n")
        return 2
    try:
        scenarios = selectScenarios(options.scenario)
    except ValueError as e:
        parser().error(str(e))
    if options.haproxy and not os.access(options.haproxy, os.X_OK):
        parser().error(f"--haproxy {options.haproxy!r} is not an executable file")
    if options.json:
        folder = os.path.dirname(os.path.abspath(options.json))
        if not os.path.isdir(folder):
            parser().error(f"--json {options.json!r}: no directory {folder!r}")
    if options.baseline and not os.path.isdir(os.path.join(options.baseline, "tcpproxy")):
        parser().error(f"--baseline {options.baseline!r} is not a tcpproxy checkout")
    wanted = set(options.only or [name for name in PROXY_NAMES if name not in ON_REQUEST]) | {"direct"}
    if not options.baseline:
        wanted.discard("baseline")
    proxies = sorted(wanted, key=PROXY_NAMES.index)
    repeat = options.repeat or (1 if options.quick else 3)
    budget = QUICK if options.quick else FULL

    plan = planCpus()
    if plan.load is not None:
        os.sched_setaffinity(0, plan.load)
    raiseFileLimit()
    # A plain kill must stop the children too: turn it into the same
    # unwinding as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="tcpproxy-bench-") as workdir:
        run = BenchmarkRun(
            scenarios,
            proxies,
            budget,
            repeat,
            plan,
            workdir,
            quick=options.quick,
            haproxyBinary=options.haproxy or findHAProxy(),
            baselineRoot=options.baseline,
        )
        try:
            summary = run.run()
        except KeyboardInterrupt:
            sys.stderr.write("bench: interrupted; every process it started was stopped\n")
            return 130
        except NotReady as e:
            sys.stderr.write(f"bench: error: the backends did not start: {e}\n")
            return 1
    sys.stdout.write(render(summary))
    if options.json:
        with open(options.json, "w") as f:
            json.dump(summary, f, indent=2, allow_nan=False, default=str)
            f.write("\n")
        sys.stdout.write(f"figures written to {options.json}\n")
    return 1 if summary["failures"] else 0
