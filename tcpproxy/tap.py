"""
C{twistd tcpproxy}: command-line options and the service they describe.

The configuration is read and every port bound here, while C{twistd} is
still parsing options: a mistake in the file or a port in use is then
reported as one line on standard error with a non-zero exit status, before
any pidfile is written or the process goes into the background.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.application.service import IService, MultiService
from twisted.python import usage

from tcpproxy.collector import tuneCollector
from tcpproxy.config import (
    ConfigError,
    checkWorkers,
    parseConfigBytes,
    parseTarget,
    parseWorkers,
    readConfigBytes,
)
from tcpproxy.triggers import EarlySignal, ReloadOnChange, ReloadOnSignal, fileSignature

# The relay, TLS and the demo backends (OpenSSL, cryptography: a tenth of a
# second to import) are imported by buildService, after makeService has
# caught SIGHUP: this module is what twistd imports first.


class Options(usage.Options):
    synopsis = (
        "[--config FILE] [--watch] [--workers N|auto] [--json-log FILE]"
        " [--demo-backends [--demo-down HOST:PORT ...]]"
    )
    longdesc = (
        "Listen on every port of every app in the configuration and relay each "
        "connection to one of the app's targets, round-robin, failing over to "
        "the next target when one cannot be reached.  SIGHUP reloads the "
        "configuration file without dropping a connection."
    )
    optParameters = [
        ["config", "c", "config.json", "The JSON configuration file."],
        [
            "json-log",
            None,
            None,
            "Also write every log event, with all its fields, as a JSON line appended to this file.",
        ],
        [
            "workers",
            None,
            None,
            "Worker processes that share the ports, or auto (one per CPU); "
            'overrides the configuration\'s "Workers" (default 1: one process).',
        ],
    ]
    optFlags = [
        ["watch", None, "Also reload the configuration whenever its file changes (checked every second)."],
        [
            "demo-backends",
            None,
            "Also serve echo backends on the configuration's loopback targets, "
            "to try the proxy with no real backend.",
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["demo-down"] = []

    def opt_demo_down(self, target: str) -> None:
        """
        With --demo-backends, leave this target dead on purpose (repeatable).
        """
        try:
            parseTarget(target)
        except ValueError as e:
            raise usage.UsageError(f"--demo-down {target!r} {e}") from None
        self["demo-down"].append(target)

    def postOptions(self) -> None:
        if self["workers"] is not None:
            try:
                self["workers"] = parseWorkers(self["workers"])
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        if self["demo-down"] and not self["demo-backends"]:
            raise usage.UsageError("--demo-down only makes sense with --demo-backends")


def buildService(options: Options, reactor=None, early: EarlySignal | None = None) -> IService:
    """
    Read the configuration and bind every port.

    @param early: the C{SIGHUP} caught since start-up, handed over to the
        reload trigger (see L{EarlySignal}).

    @raise ConfigError: the configuration is refused, or the C{--json-log}
        file cannot be written.
    @raise ListenError: a port cannot be bound.
    """
    if reactor is None:
        from twisted.internet import reactor
    if options["json-log"] is None:
        return _buildProxy(options, reactor, early)
    from tcpproxy.jsonlog import JSONLogService

    # Opened first: a file that cannot be written is refused before any
    # port is bound.
    try:
        logging = JSONLogService(options["json-log"])
    except OSError as e:
        raise ConfigError(f"--json-log {options['json-log']}: cannot be written: {e.strerror}") from None
    try:
        _buildProxy(options, reactor, early).setServiceParent(logging)
    except BaseException:
        logging.close()
        raise
    return logging


def _buildProxy(options: Options, reactor, early: EarlySignal | None) -> IService:
    """
    L{buildService} but for C{--json-log}.
    """
    from tcpproxy.demo import DemoBackendsService
    from tcpproxy.listening import ListenError
    from tcpproxy.service import ProxyService

    # Absolute, so a reload still finds the file whatever the working directory.
    path = os.path.abspath(options["config"])
    # Taken before reading: an edit made from now on is reloaded by --watch.
    seen = fileSignature(path)
    raw = readConfigBytes(options["config"])
    config = parseConfigBytes(raw, options["config"])
    triggers = [ReloadOnSignal(reactor, signal.SIGHUP, early)]
    if options["watch"]:
        triggers.append(ReloadOnChange(path, reactor, seen=seen))
    workers = options.get("workers") or config.workers
    checkWorkers(config, workers)
    if workers > 1:
        from tcpproxy.supervisor import WorkerPool

        proxy = WorkerPool(config, raw, reactor, workers, path, triggers)
    else:
        proxy = ProxyService(config, reactor, path, triggers)
    if not options["demo-backends"]:
        proxy.bind()
        return proxy
    down = frozenset(str(parseTarget(t)) for t in options["demo-down"])
    served = {str(t) for app in config.apps for t in app.targets}
    unknown = sorted(down - served)
    if unknown:
        raise ConfigError(f"--demo-down: {', '.join(unknown)} is not a target of {config.source}")
    demo = DemoBackendsService(config, reactor, down)
    demo.bind()
    try:
        proxy.bind()
    except ListenError:
        demo.unbind()
        raise
    both = MultiService()
    demo.setServiceParent(both)
    proxy.setServiceParent(both)
    return both


def makeService(options: Options) -> IService:
    """
    The C{twistd} entry point: L{buildService}, with a refusal shown as one
    line on standard error and exit status 1, not as a traceback.

    The first thing it does is catch C{SIGHUP} (L{EarlySignal}): from then
    on the signal never ends the process, and one that comes before the
    proxy serves is applied once it does.  The last is to set the process's
    garbage collector for serving (L{tuneCollector}).
    """
    early = EarlySignal(signal.SIGHUP)
    from tcpproxy.listening import ListenError

    try:
        service = buildService(options, early=early)
    except (ConfigError, ListenError) as e:
        early.release()
        sys.stderr.write(f"tcpproxy: error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    except BaseException:
        early.release()
        raise
    tuneCollector()
    return service
