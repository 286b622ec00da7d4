"""
The C{tcpproxy-tester} command line: C{check} and C{load}.

A user's mistake -- a missing or refused configuration, an unknown app or
port, conflicting options, a proxy that is not running -- is reported as
one C{tcpproxy-tester: error: ...} line (or a few) with exit status 2 (1 for
an unreachable proxy), never as a traceback.
"""

from __future__ import annotations

import math
import sys
from typing import TextIO

from twisted.python import usage

from tcpproxy.config import ConfigError, ProxyConfig, loadConfig
from tcpproxy.tester.shapes import SHAPES

PROG = "tcpproxy-tester"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _positiveInt(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not 1 or more")
    return value


_positiveInt.coerceDoc = "An integer, 1 or more."  # type: ignore[attr-defined]


def _nonNegativeInt(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


_nonNegativeInt.coerceDoc = "An integer, 0 or more."  # type: ignore[attr-defined]


def _positiveFloat(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{text} is not a number greater than 0")
    return value


_positiveFloat.coerceDoc = "A number greater than 0."  # type: ignore[attr-defined]


def _nonNegativeFloat(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{text} is not a number, 0 or more")
    return value


_nonNegativeFloat.coerceDoc = "A number, 0 or more."  # type: ignore[attr-defined]


class _TargetOptions(usage.Options):
    """
    What every subcommand shares: the configuration and which ports.
    """

    optParameters = [
        ["config", "c", "config.json", "The proxy's JSON configuration file."],
        ["host", None, None, "Connect here instead of the configuration's BindAddress."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["app"] = []
        self["port"] = []

    def opt_app(self, name: str) -> None:
        """
        Only this app (repeatable; default: every app).
        """
        self["app"].append(name)

    def opt_port(self, port: str) -> None:
        """
        Only this port (repeatable; default: every port of the chosen apps).
        """
        try:
            self["port"].append(_positiveInt(port))
        except ValueError:
            raise usage.UsageError(f"--port {port!r} is not a port number") from None

    def selectPorts(self, config: ProxyConfig):
        from tcpproxy.tester.targets import selectPorts

        return selectPorts(config, tuple(self["app"]), tuple(self["port"]), self["host"])


class CheckOptions(_TargetOptions):
    synopsis = "[--config FILE] [--app NAME] [--port N] [--any-reply] [options]"
    longdesc = (
        "Run a conformance suite, on trial, against a running proxy: every port of every "
        "app accepts, echoes small and multi-MiB messages byte for byte, serves concurrent "
        "connections and honours half-close.  Exit status 0 when every check passes."
    )
    optFlags = [
        [
            "any-reply",
            None,
            "Accept any non-empty reply instead of an exact echo (for targets that are not echo servers).",
        ],
    ]
    optParameters = [
        ["message", "m", None, "The small message to send (default: a line of text)."],
        ["large-size", None, 4 * 1024 * 1024, "Bytes in the large message.", _positiveInt],
        ["concurrency", None, 10, "Connections opened at once by the concurrency check.", _positiveInt],
        ["timeout", "t", 10.0, "Seconds each step (connect, reply, close) may take.", _positiveFloat],
    ]

    def postOptions(self) -> None:
        if self["message"] is not None and not self["message"]:
            raise usage.UsageError("--message is empty; give it some text")


class LoadOptions(_TargetOptions):
    synopsis = "[--config FILE] [--app NAME] [--port N] [options]"
    longdesc = (
        "Send echo traffic through every port of every app and report messages, errors, "
        "drops, throughput and latency percentiles (HDR histogram).  Closed loop by default; "
        "--rate or --shape for an open loop.  Exit status 1 when errors plus dropped "
        "messages exceed --max-errors."
    )
    optParameters = [
        ["connections", "n", 1, "Connections per port.", _positiveInt],
        ["connect-rate", None, None, "Open connections gradually, this many per second.", _positiveFloat],
        ["messages", None, None, "Messages per connection (default: send for --duration).", _positiveInt],
        [
            "duration",
            "d",
            None,
            "Seconds to send for (default 10, unless --messages is given).",
            _positiveFloat,
        ],
        ["message", "m", None, "Send this text as each message."],
        ["message-file", "f", None, "Send the lines of this file (newline included), in turn."],
        ["size", "s", None, "Send messages of this many random bytes (default 64).", _positiveInt],
        ["rate", "r", None, "Open loop: messages per second per connection.", _positiveFloat],
        ["burst", None, 1, "Open loop: messages sent back to back per tick.", _positiveInt],
        ["shape", None, None, f"Open loop: total rate over time, one of {', '.join(SHAPES)}."],
        ["max-rate", None, None, "Shape: highest total messages per second.", _positiveFloat],
        ["min-rate", None, 0.0, "Shape: lowest total messages per second.", _nonNegativeFloat],
        [
            "period",
            None,
            10.0,
            "Shape: seconds per cycle (sine, sawtooth), or to climb (step).",
            _positiveFloat,
        ],
        [
            "step",
            None,
            None,
            "Step shape: rate added at each step (default: a tenth of the climb).",
            _positiveFloat,
        ],
        [
            "step-every",
            None,
            None,
            "Step shape: seconds between steps (default: a tenth of --period).",
            _positiveFloat,
        ],
        ["end", None, "drain", "How to end: drain (wait for replies in flight) or cut (stop at once)."],
        ["drain-timeout", None, 5.0, "Seconds --end drain waits for replies in flight.", _nonNegativeFloat],
        ["connect-timeout", None, 5.0, "Seconds a connection may take to open.", _positiveFloat],
        ["sweep", None, None, "Run once per connection count, e.g. 1,10,100 (instead of --connections)."],
        [
            "max-errors",
            None,
            0,
            "Exit with status 1 when errors plus dropped messages exceed this.",
            _nonNegativeInt,
        ],
        ["report", None, None, "Write the figures and per-second series to this JSON file."],
        ["plot", None, None, "Draw throughput and latency to this PNG file (needs matplotlib)."],
    ]
    optFlags = [
        ["quiet", "q", "No progress line."],
    ]

    def postOptions(self) -> None:
        given = [name for name in ("message", "message-file", "size") if self[name] is not None]
        if len(given) > 1:
            raise usage.UsageError(f"--{given[0]} and --{given[1]} cannot be used together")
        if self["end"] not in ("drain", "cut"):
            raise usage.UsageError(f"--end {self['end']!r}: say drain or cut")
        if self["rate"] is not None and (self["shape"] is not None or self["max-rate"] is not None):
            raise usage.UsageError(
                "--rate (per connection) and --shape/--max-rate (in total) cannot be used together"
            )
        if self["max-rate"] is not None and self["shape"] is None:
            self["shape"] = "constant"
        if self["shape"] is not None:
            if self["shape"] not in SHAPES:
                raise usage.UsageError(f"--shape {self['shape']!r}: shapes are {', '.join(SHAPES)}")
            if self["max-rate"] is None:
                raise usage.UsageError(f"--shape {self['shape']} needs --max-rate")
        if (self["step"] is not None or self["step-every"] is not None) and self["shape"] != "step":
            raise usage.UsageError("--step and --step-every only make sense with --shape step")
        if self["burst"] != 1 and self["rate"] is None and self["shape"] is None:
            raise usage.UsageError("--burst only makes sense in an open loop (--rate or --shape)")
        if self["messages"] is None and self["duration"] is None:
            self["duration"] = 10.0
        if self["sweep"] is not None:
            try:
                counts = [_positiveInt(part) for part in self["sweep"].split(",") if part.strip()]
            except ValueError:
                counts = []
            if not counts:
                raise usage.UsageError(f"--sweep {self['sweep']!r}: give connection counts like 1,10,100")
            self["sweep"] = counts
        if self["plot"] is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    "--plot needs matplotlib, which is not installed: pip install 'tcpproxy[plot]'"
                ) from None


class TesterOptions(usage.Options):
    synopsis = "check|load [options]   (see: tcpproxy-tester check --help, tcpproxy-tester load --help)"
    longdesc = "Test a running tcpproxy with the same configuration file: check it works, or load it."
    subCommands = [
        ["check", None, CheckOptions, "Conformance run (on trial) against every port of every app."],
        ["load", None, LoadOptions, "Load the proxy and report throughput and latency percentiles."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say check or load")

    def opt_version(self) -> None:
        """
        Show the version and exit.
        """
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"{PROG} {version('tcpproxy')}")
        except PackageNotFoundError:
            print(f"{PROG} (tcpproxy, not installed)")
        raise SystemExit(0)


class UserError(Exception):
    """
    A mistake the user can fix; the text is the whole message.
    """

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        Exception.__init__(self, message)
        self.status = status


def _settingsRecord(options: LoadOptions) -> dict:
    """
    The load options as given, for the JSON report.
    """
    return {key: options[key] for key in sorted(options.keys()) if key not in ("help", "version")}


def runCheck(options: CheckOptions, stdout: TextIO) -> int:
    from tcpproxy.tester.check import DEFAULT_MESSAGE, CheckSettings, runChecks

    config = _loadConfig(options)
    ports = _selectPorts(options, config)
    message = DEFAULT_MESSAGE if options["message"] is None else options["message"].encode("utf-8")
    settings = CheckSettings(
        anyReply=options["any-reply"],
        message=message,
        largeSize=options["large-size"],
        concurrency=options["concurrency"],
        timeout=options["timeout"],
    )
    return runChecks(ports, settings, stdout)


def _loadConfig(options: _TargetOptions) -> ProxyConfig:
    try:
        return loadConfig(options["config"])
    except ConfigError as e:
        raise UserError(str(e)) from None


def _selectPorts(options: _TargetOptions, config: ProxyConfig):
    from tcpproxy.tester.targets import SelectionError

    try:
        return options.selectPorts(config)
    except SelectionError as e:
        raise UserError(str(e)) from None


def _payloads(options: LoadOptions):
    from tcpproxy.tester import payloads

    try:
        if options["message"] is not None:
            return payloads.fromText(options["message"])
        if options["message-file"] is not None:
            return payloads.fromFile(options["message-file"])
        return payloads.fromSize(options["size"] or 64)
    except payloads.PayloadError as e:
        raise UserError(str(e)) from None


def _pacer(options: LoadOptions, reactor):
    from tcpproxy.tester.pacing import ClosedLoop, OpenLoop
    from tcpproxy.tester.shapes import Constant, makeShape

    if options["rate"] is not None:
        return OpenLoop(reactor, Constant(options["rate"]), perConnection=True, burst=options["burst"])
    if options["shape"] is not None:
        try:
            shape = makeShape(
                options["shape"],
                options["max-rate"],
                options["min-rate"],
                options["period"],
                options["step"],
                options["step-every"],
            )
        except ValueError as e:
            raise UserError(str(e)) from None
        return OpenLoop(reactor, shape, perConnection=False, burst=options["burst"])
    return ClosedLoop(reactor)


async def runLoad(reactor, options: LoadOptions, stdout: TextIO, stderr: TextIO) -> int:
    """
    Run C{load} (once, or once per step of a sweep), print the tables, write
    the report and the plot.

    @return: the exit status.
    """
    from tcpproxy.tester.load import LoadRun, LoadSettings, Unreachable
    from tcpproxy.tester.progress import ProgressLine
    from tcpproxy.tester.report import formatSweep, formatTable, reportDocument, writeReport

    config = _loadConfig(options)
    ports = _selectPorts(options, config)
    payloads = _payloads(options)
    counts = options["sweep"] or [options["connections"]]
    results = []
    interrupted: list[bool] = []
    for count in counts:
        settings = LoadSettings(
            connections=count,
            connectRate=options["connect-rate"],
            messages=options["messages"],
            duration=options["duration"],
            end=options["end"],
            drainTimeout=options["drain-timeout"],
            connectTimeout=options["connect-timeout"],
        )
        label = f"[{count} conn/port] " if options["sweep"] else ""
        progress = None if options["quiet"] else ProgressLine(stderr, label=label)
        run = LoadRun(reactor, ports, settings, _pacer(options, reactor), payloads, onSample=progress)

        def interrupt(run=run):
            interrupted.append(True)
            return run.interrupt()

        trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupt)
        try:
            result = await run.run()
        except Unreachable as e:
            raise UserError(
                f"{e}\nIs the proxy running?  (twistd -n tcpproxy --config {options['config']})",
                EXIT_FAILED,
            ) from None
        finally:
            reactor.removeSystemEventTrigger(trigger)
            if progress is not None:
                progress.finish()
        results.append(result)
        if options["sweep"]:
            stdout.write(f"== {count} connection(s) per port ==\n")
        stdout.write(formatTable(result) + "\n")
        if options["sweep"]:
            stdout.write("\n")
        stdout.flush()
        if interrupted:
            break
    if options["sweep"]:
        stdout.write("== sweep ==\n" + formatSweep(results) + "\n")
    if options["report"] is not None:
        try:
            writeReport(options["report"], reportDocument(results, config.source, _settingsRecord(options)))
        except OSError as e:
            raise UserError(f"--report {options['report']}: cannot write it: {e.strerror or e}") from None
        stdout.write(f"report written to {options['report']}\n")
    if options["plot"] is not None:
        from tcpproxy.tester.plot import PlotError, plotRun, plotSweep

        try:
            if options["sweep"]:
                plotSweep(results, options["plot"])
            else:
                plotRun(results[0], options["plot"])
        except PlotError as e:
            raise UserError(str(e)) from None
        stdout.write(f"plot written to {options['plot']}\n")
    bad = sum(r.total.errors + r.total.dropped for r in results)
    if bad > options["max-errors"]:
        stderr.write(
            f"{PROG}: {bad} errors and dropped messages, more than --max-errors {options['max-errors']}\n"
        )
        return EXIT_FAILED
    return EXIT_OK


def _fail(stderr: TextIO, message: str, status: int) -> int:
    stderr.write(f"{PROG}: error: {message}\n")
    stderr.flush()
    return status


def main(argv: list[str] | None = None) -> None:
    """
    The console script: parse, run the subcommand, exit with its status.
    """
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(run(argv, sys.stdout, sys.stderr))


def run(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    """
    L{main} without the exit, for tests.
    """
    options = TesterOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        hint = f"{PROG} {options.subCommand} --help" if options.subCommand else f"{PROG} --help"
        return _fail(stderr, f"{e}\n(see {hint})", EXIT_USAGE)
    sub = options.subOptions
    try:
        if options.subCommand == "check":
            return runCheck(sub, stdout)
        return _react(sub, stdout, stderr)
    except UserError as e:
        return _fail(stderr, str(e), e.status)


def _react(options: LoadOptions, stdout: TextIO, stderr: TextIO) -> int:
    """
    Run C{load} on the global reactor; Ctrl-C ends the run as --end says and
    still prints the figures.
    """
    from twisted.internet import defer, reactor
    from twisted.internet.error import ReactorNotRunning

    status: list[int] = []
    errors: list[UserError] = []

    async def body() -> None:
        try:
            status.append(await runLoad(reactor, options, stdout, stderr))
        except UserError as e:
            errors.append(e)

    def stop(_: object) -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def go() -> None:
        d = defer.ensureDeferred(body())
        d.addErrback(lambda f: errors.append(UserError(f.getTraceback(), EXIT_FAILED)))
        d.addBoth(stop)

    reactor.callWhenRunning(go)
    reactor.run()
    if errors:
        raise errors[0]
    return status[0] if status else EXIT_FAILED
