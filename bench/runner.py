"""
One benchmark run: backends and proxies up, every scenario measured on
every proxy repetition by repetition, everything stopped, a summary out.

Within a repetition the proxies are measured one right after the other,
so that the ratios between them compare moments, not minutes, of a machine
whose speed drifts.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from typing import TextIO

import twisted
from bench import report
from bench.backends import BackendProcess
from bench.load import LoadError
from bench.proxies import Direct, HAProxy, PortForward, ProxyStartError, TcpProxy
from bench.report import Measurement
from bench.scenarios import Budget, Scenario
from bench.system import CpuPlan, CpuWatch, allowedCpus, describeMachine

PROXY_NAMES = ("direct", "tcpproxy", "tcpproxy-admin", "tcpproxy-2w", "baseline", "haproxy", "portforward")
"""
C{baseline} is tcpproxy from another checkout (C{--baseline DIR});
C{tcpproxy-admin} is tcpproxy with its admin endpoint on, and
C{tcpproxy-2w} tcpproxy with two worker processes (C{--workers 2}), each
measured only when C{--only} names it.
"""

ON_REQUEST = ("tcpproxy-admin", "tcpproxy-2w")
"""
The proxies measured only when C{--only} names them.
"""
"""
Every proxy under test, in the order they are measured and shown.
"""

_TRACEBACK_LINES = 12


class BenchmarkRun:
    """
    Run C{scenarios} on the proxies named, C{repeat} times, within C{budget}.

    @ivar notes: things the reader should know (skips, log findings).
    @ivar failures: what went wrong with the suite itself: a proxy that did
        not start, a measurement that could not be made.
    """

    def __init__(
        self,
        scenarios: list[Scenario],
        proxyNames: list[str],
        budget: Budget,
        repeat: int,
        plan: CpuPlan,
        workdir: str,
        quick: bool,
        haproxyBinary: str | None = None,
        progress: TextIO = sys.stderr,
        baselineRoot: str | None = None,
    ) -> None:
        self.scenarios = scenarios
        self.proxyNames = [name for name in PROXY_NAMES if name in proxyNames]
        self.budget = budget
        self.repeat = repeat
        self.plan = plan
        self.workdir = workdir
        self.quick = quick
        self.haproxyBinary = haproxyBinary
        self.baselineRoot = baselineRoot
        self.progress = progress
        self.notes: list[str] = []
        self.failures: list[str] = []
        self._instances: list = []
        self._running: dict = {}
        self._status: dict[str, tuple[str, str]] = {}
        self._backend: BackendProcess | None = None
        self._started = 0.0

    def _make(self, name: str, label: str):
        if name == "direct":
            proxy = Direct()
        else:
            where = os.path.join(self.workdir, label)
            cpus = self.plan.proxy
            if name == "tcpproxy":
                proxy = TcpProxy(where, cpus)
            elif name == "tcpproxy-admin":
                proxy = TcpProxy(where, cpus, admin=True)
            elif name == "tcpproxy-2w":
                proxy = TcpProxy(where, cpus, workers=2)
            elif name == "baseline":
                proxy = TcpProxy(where, cpus, root=self.baselineRoot)
            elif name == "haproxy":
                proxy = HAProxy(where, cpus, self.haproxyBinary)
            else:
                proxy = PortForward(where, cpus)
        self._instances.append((label, proxy))
        return proxy

    def _say(self, text: str) -> None:
        self.progress.write(f"[{time.monotonic() - self._started:5.1f}s] {text}\n")
        self.progress.flush()

    def run(self) -> dict:
        """
        Do the whole run and return its summary (see L{bench.report}).

        Every process started is stopped before this returns or raises,
        including on C{KeyboardInterrupt}.
        """
        self._started = time.monotonic()
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        machine = describeMachine()
        results: dict[str, dict[str, list[Measurement]]] = {}
        try:
            self._backend = BackendProcess(self.plan.load)
            self._backend.start()
            self._say(f"backends listening on {self._backend.address[0]}:{self._backend.address[1]}")
            self._startAll()
            for scenario in self.scenarios:
                if scenario.skipped:
                    self.notes.append(f"{scenario.name}: {scenario.skipped}")
                    continue
                results[scenario.name] = self._measureScenario(scenario)
        finally:
            self._stopAll()
            self._readLogs()
        return self._summarize(started, machine, results)

    def _startAll(self) -> None:
        # Scenarios that read memory start their own processes; the others
        # share one long-running process per proxy.
        shared = any(not s.freshProcess and not s.skipped for s in self.scenarios)
        for name in self.proxyNames:
            proxy = self._make(name, "shared")
            why = proxy.unavailable()
            if why:
                self._status[name] = ("skipped", why)
                self.notes.append(f"{name}: {why}")
                continue
            if shared:
                try:
                    proxy.start(self._backend.address)
                except ProxyStartError as e:
                    self._status[name] = ("FAILED", f"{proxy.description}: did not start")
                    self.failures.append(str(e))
                    continue
                self._running[name] = proxy
            self._status[name] = ("ok", self._describe(proxy))
            self._say(f"{name} ready at {_where(proxy)}")

    def _describe(self, proxy) -> str:
        if proxy.pid is None:
            return proxy.description
        return f"{proxy.description}; pid {proxy.pid} on CPU {allowedCpus(proxy.pid)}"

    def _measureScenario(self, scenario: Scenario) -> dict[str, list[Measurement]]:
        names = [n for n, (status, _) in self._status.items() if status == "ok"]
        if scenario.needsProcess:
            names = [n for n in names if n != "direct"]
        if scenario.needsTLS:
            names = [n for n in names if getattr(self._running.get(n), "tlsAddress", None)]
        if scenario.needsProxyProtocol:
            names = [n for n in names if getattr(self._running.get(n), "proxyProtocolAddress", None)]
        measured: dict[str, list[Measurement]] = {name: [] for name in names}
        for rep in range(1, self.repeat + 1):
            shown = []
            for name in _inTurn(names, rep):
                measurement = self._measureOnce(scenario, name, rep)
                measured[name].append(measurement)
                if measurement.error:
                    self.failures.append(f"{scenario.name}, {name}, repetition {rep}: {measurement.error}")
                    shown.append(f"{name} ERROR")
                else:
                    key = scenario.metrics[0].key
                    shown.append(f"{name} {report.formatFigure(measurement.figures.get(key))}")
                time.sleep(self.budget.settle)
            unit = scenario.metrics[0].label
            self._say(f"{scenario.name} {rep}/{self.repeat} ({unit}): " + ", ".join(shown))
        return measured

    def _measureOnce(self, scenario: Scenario, name: str, rep: int) -> Measurement:
        if scenario.freshProcess:
            proxy = self._make(name, f"{scenario.name}-{rep}")
            try:
                proxy.start(self._backend.address)
            except ProxyStartError as e:
                return Measurement(error=str(e))
            try:
                return self._attempt(scenario, proxy)
            finally:
                proxy.stop()
        proxy = self._running.get(name)
        if proxy is None:
            return Measurement(error=f"{name} is not running")
        if not proxy.alive():
            error = f"{name} had exited before this measurement; restarted"
            proxy.stop()
            try:
                proxy.start(self._backend.address)
            except ProxyStartError as e:
                error = f"{name} had exited before this measurement and did not restart: {e}"
            return Measurement(error=error)
        return self._attempt(scenario, proxy)

    def _attempt(self, scenario: Scenario, proxy) -> Measurement:
        watches = self._watch(proxy) if scenario.timed else {}
        try:
            figures = scenario.measure(proxy, self.budget)
        except (LoadError, OSError, ProcessLookupError) as e:
            return Measurement(error=_explain(e, proxy))
        for key, watch in watches.items():
            figures[key] = watch.othersShare()
        if not proxy.alive():
            return Measurement(figures, f"{proxy.name} exited during the measurement")
        if not self._backend.alive():
            return Measurement(figures, "the backend process exited during the measurement")
        return Measurement(figures)

    def _watch(self, proxy) -> dict[str, CpuWatch]:
        # Other people's processes on our CPUs, during this measurement.
        if self.plan.proxy is None:
            return {}
        watches = {report.OTHERS_ON_LOAD_CPU: CpuWatch(self.plan.load, [os.getpid(), self._backend.pid])}
        if proxy.pid is not None:
            watches[report.OTHERS_ON_PROXY_CPU] = CpuWatch(self.plan.proxy, [proxy.pid])
        return watches

    def _stopAll(self) -> None:
        for _, proxy in self._instances:
            proxy.stop()
        self._running.clear()
        if self._backend is not None:
            self._backend.stop()

    def _readLogs(self) -> None:
        # A proxy may survive a bug that only shows in its log.
        for label, proxy in self._instances:
            lines = proxy.logText().splitlines()
            starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
            if starts:
                first = "\n".join("    " + line for line in lines[starts[0] : starts[0] + _TRACEBACK_LINES])
                self.notes.append(
                    f"{proxy.name} ({label} process) logged {len(starts)} traceback(s); the first:\n{first}"
                )

    def _summarize(self, started: str, machine: dict, results: dict) -> dict:
        scenarios = [
            report.summarizeScenario(s, self.proxyNames, results.get(s.name, {})) for s in self.scenarios
        ]
        meta = {
            "mode": "quick smoke run (figures not meaningful)" if self.quick else "full run",
            "repeat": self.repeat,
            "started": started,
            "machine": machine,
            "twisted": twisted.__version__,
            "pinning": self.plan.description,
            "budget": vars(self.budget),
            "proxies": [
                {"name": name, "status": status, "description": text}
                for name, (status, text) in self._status.items()
            ],
        }
        warnings = [w for s in scenarios for w in s["warnings"]]
        return {
            "meta": meta,
            "scenarios": scenarios,
            "targets": report.evaluateTargets(scenarios),
            "warnings": warnings,
            "notes": self.notes,
            "failures": self.failures,
            "seconds": time.monotonic() - self._started,
        }


def _where(proxy) -> str:
    if proxy.address is None:
        # Not started yet: every scenario of the run starts its own process.
        return "a fresh process per scenario"
    host, port = proxy.address
    return f"{host}:{port}" + (
        "" if proxy.pid is None else f" (pid {proxy.pid}, CPU {allowedCpus(proxy.pid)})"
    )


def _explain(error: Exception, proxy) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, ProcessLookupError):
        text = "the proxy process is gone"
    if proxy.pid is not None and not proxy.alive():
        text += f" ({proxy.name} exited)"
    return text


def _inTurn(names: list[str], rep: int) -> list[str]:
    """
    The order in which repetition C{rep} measures C{names}: as given, but
    for tcpproxy and tcpproxy-admin, which swap places every other
    repetition.  Measured one right after the other, the second of two
    proxies gets a machine that has drifted (on a busy one, by tens of per
    cent); alternating puts that drift on both alike, and the median of
    their per-repetition ratio is what Admin costs.
    """
    order = list(names)
    if rep % 2 == 0 and "tcpproxy" in order and "tcpproxy-admin" in order:
        i, j = order.index("tcpproxy"), order.index("tcpproxy-admin")
        order[i], order[j] = order[j], order[i]
    return order
