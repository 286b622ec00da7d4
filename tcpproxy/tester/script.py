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
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from twisted.python import usage

from tcpproxy.config import ConfigError, ProxyConfig, loadConfig
from tcpproxy.tester.shapes import SHAPES

if TYPE_CHECKING:
    from tcpproxy.tester.payloads import Payloads
    from tcpproxy.tester.shapes import IShape
    from tcpproxy.tester.targets import ProxyPort

PROG = "tcpproxy-tester"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


COERCION_FAILED = "Parameter type enforcement failed: "
"""
What C{usage} puts before a coercer's message; L{run} takes it off, since
the coercers of this module already name the option.
"""


def _number(option: str, kind: type, minimum: float, above: bool = False):
    """
    A coercer for C{--option}: a number of C{kind} at least C{minimum} (or
    greater than it, with C{above}), with a message that names the option.
    """
    what = "a whole number" if kind is int else "a number"
    bound = f"greater than {minimum:g}" if above else f"{minimum:g} or more"

    def coerce(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise ValueError(f"--{option} {text!r}: give {what}, {bound}")
        return value

    coerce.coerceDoc = f"{what[0].upper()}{what[1:]}, {bound}."  # type: ignore[attr-defined]
    return coerce


def _showVersion() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        print(f"{PROG} {version('tcpproxy')}")
    except PackageNotFoundError:
        print(f"{PROG} (tcpproxy, not installed)")
    raise SystemExit(0)


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

    def opt_version(self) -> None:
        """
        Show the version and exit.
        """
        _showVersion()

    def opt_app(self, name: str) -> None:
        """
        Only this app (repeatable; default: every app).
        """
        self["app"].append(name)

    def opt_port(self, port: str) -> None:
        """
        Only this port (repeatable; default: every port of the chosen apps).
        """
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise usage.UsageError(f"--port {port!r}: give a port number, 1-65535")
        self["port"].append(int(port))

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
        ["large-size", None, 4 * 1024 * 1024, "Bytes in the large message", _number("large-size", int, 1)],
        [
            "concurrency",
            None,
            10,
            "Connections opened at once by the concurrency check",
            _number("concurrency", int, 1),
        ],
        [
            "timeout",
            "t",
            10.0,
            "Seconds each step (connect, reply, close) may take",
            _number("timeout", float, 0, above=True),
        ],
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
        ["connections", "n", 1, "Connections per port", _number("connections", int, 1)],
        [
            "connect-rate",
            None,
            None,
            "Open connections gradually, this many per second",
            _number("connect-rate", float, 0, above=True),
        ],
        [
            "messages",
            None,
            None,
            "Messages per connection (default: send for --duration)",
            _number("messages", int, 1),
        ],
        [
            "duration",
            "d",
            None,
            "Seconds to send for (default 10, unless --messages is given)",
            _number("duration", float, 0, above=True),
        ],
        ["message", "m", None, "Send this text as each message."],
        ["message-file", "f", None, "Send the lines of this file (newline included), in turn."],
        [
            "size",
            "s",
            None,
            "Send messages of this many random bytes (default 64)",
            _number("size", int, 1),
        ],
        [
            "rate",
            "r",
            None,
            "Open loop: messages per second per connection",
            _number("rate", float, 0, above=True),
        ],
        ["burst", None, 1, "Open loop: messages sent back to back per tick", _number("burst", int, 1)],
        ["shape", None, None, f"Open loop: total rate over time, one of {', '.join(SHAPES)}."],
        [
            "max-rate",
            None,
            None,
            "Shape: highest total messages per second",
            _number("max-rate", float, 0, above=True),
        ],
        ["min-rate", None, 0.0, "Shape: lowest total messages per second", _number("min-rate", float, 0)],
        [
            "period",
            None,
            10.0,
            "Shape: seconds per cycle (sine, sawtooth), or to climb (step)",
            _number("period", float, 0, above=True),
        ],
        [
            "step",
            None,
            None,
            "Step shape: rate added at each step (default: a tenth of the climb)",
            _number("step", float, 0, above=True),
        ],
        [
            "step-every",
            None,
            None,
            "Step shape: seconds between steps (default: a tenth of --period)",
            _number("step-every", float, 0, above=True),
        ],
        ["end", None, "drain", "How to end: drain (wait for replies in flight) or cut (stop at once)."],
        [
            "drain-timeout",
            None,
            5.0,
            "Seconds --end drain waits for replies in flight",
            _number("drain-timeout", float, 0),
        ],
        [
            "connect-timeout",
            None,
            5.0,
            "Seconds a connection may take to open",
            _number("connect-timeout", float, 0, above=True),
        ],
        ["sweep", None, None, "Run once per connection count, e.g. 1,10,100 (instead of --connections)."],
        [
            "max-errors",
            None,
            0,
            "Exit with status 1 when errors plus dropped messages exceed this",
            _number("max-errors", int, 0),
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
            parts = [part.strip() for part in self["sweep"].split(",")]
            if not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
                raise usage.UsageError(f"--sweep {self['sweep']!r}: give connection counts like 1,10,100")
            counts = [int(part) for part in parts]
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
    synopsis = f"Usage: {PROG}"
    longdesc = (
        "Test a running tcpproxy, reading its own configuration file: "
        f"{PROG} check [options] checks that it works, {PROG} load [options] measures it."
    )
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
        _showVersion()


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


@dataclass(frozen=True)
class LoadPlan:
    """
    Everything C{load} needs that can be wrong by the user's mistake, worked
    out before the reactor starts.
    """

    config: ProxyConfig
    ports: list[ProxyPort]
    payloads: Payloads
    shape: IShape | None
    skipped: list[ProxyPort] = ()
    """
    Ports chosen but left out (TLS ones), said so before the run.
    """


def planLoad(options: LoadOptions) -> LoadPlan:
    """
    Read the configuration, choose the ports, make the messages and the shape.

    @raise UserError: for any of these the user got wrong.
    """
    from tcpproxy.tester import payloads
    from tcpproxy.tester.shapes import Constant, makeShape
    from tcpproxy.tester.targets import TLS_SKIPPED

    config = _loadConfig(options)
    chosen = _selectPorts(options, config)
    ports = [where for where in chosen if not where.tls]
    if not ports:
        raise UserError(f"every port chosen is left out: {TLS_SKIPPED}")
    skipped = [where for where in chosen if where.tls]
    try:
        if options["message"] is not None:
            messages = payloads.fromText(options["message"])
        elif options["message-file"] is not None:
            messages = payloads.fromFile(options["message-file"])
        else:
            messages = payloads.fromSize(options["size"] or 64)
    except payloads.PayloadError as e:
        raise UserError(str(e)) from None
    shape = None
    if options["rate"] is not None:
        shape = Constant(options["rate"])
    elif options["shape"] is not None:
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
    return LoadPlan(config, ports, messages, shape, skipped)


def _pacer(options: LoadOptions, plan: LoadPlan, reactor):
    from tcpproxy.tester.pacing import ClosedLoop, OpenLoop

    if plan.shape is None:
        return ClosedLoop(reactor)
    perConnection = options["rate"] is not None
    return OpenLoop(reactor, plan.shape, perConnection=perConnection, burst=options["burst"])


async def runLoad(reactor, options: LoadOptions, plan: LoadPlan, stdout: TextIO, stderr: TextIO) -> int:
    """
    Run C{load} (once, or once per step of a sweep), print the tables, write
    the report and the plot.

    @return: the exit status.
    @raise UserError: the proxy cannot be reached, or a file cannot be written.
    """
    from tcpproxy.tester.load import LoadRun, LoadSettings, Unreachable
    from tcpproxy.tester.progress import ProgressLine
    from tcpproxy.tester.report import formatSweep, formatTable, reportDocument, writeReport
    from tcpproxy.tester.targets import TLS_SKIPPED

    for where in plan.skipped:
        stderr.write(f"{where}: left out: {TLS_SKIPPED}\n")
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
        run = LoadRun(reactor, plan.ports, settings, _pacer(options, plan, reactor), plan.payloads, progress)

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
        document = reportDocument(results, plan.config.source, _settingsRecord(options))
        try:
            writeReport(options["report"], document)
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
    stdout.flush()
    errors = sum(r.total.errors for r in results)
    dropped = sum(r.total.dropped for r in results)
    if errors + dropped > options["max-errors"]:
        stderr.write(
            f"{PROG}: {errors} error(s) and {dropped} dropped message(s), "
            f"more than --max-errors {options['max-errors']} allows\n"
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


def run(argv: list[str], stdout: TextIO, stderr: TextIO, react=None) -> int:
    """
    L{main} without the exit, for tests.

    @param react: runs C{load} on a reactor (default L{reactLoad}); tests
        replace it, as they cannot run the global reactor themselves.
    """
    options = TesterOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        hint = f"{PROG} {options.subCommand} --help" if options.subCommand else f"{PROG} --help"
        return _fail(stderr, f"{str(e).removeprefix(COERCION_FAILED)}\n(see {hint})", EXIT_USAGE)
    sub = options.subOptions
    try:
        if options.subCommand == "check":
            return runCheck(sub, stdout)
        plan = planLoad(sub)
        return (react or reactLoad)(sub, plan, stdout, stderr)
    except UserError as e:
        return _fail(stderr, str(e), e.status)


def reactLoad(options: LoadOptions, plan: LoadPlan, stdout: TextIO, stderr: TextIO) -> int:
    """
    Run C{load} on the global reactor; Ctrl-C ends the run as C{--end} says
    and still prints the figures.

    @raise UserError: as L{runLoad} does.
    """
    from twisted.internet import defer, reactor
    from twisted.internet.error import ReactorNotRunning

    status: list[int] = []
    errors: list[UserError] = []

    async def body() -> None:
        try:
            status.append(await runLoad(reactor, options, plan, stdout, stderr))
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
