"""
One worker process of C{twistd tcpproxy --workers N}: the whole relay, on
listening sockets its main process bound (L{tcpproxy.supervisor}).

Run by the main process, never by hand::

    python -m tcpproxy.worker --number 1 --workers 2 --config /etc/tcpproxy.json \\
        --config-fd 5 --control-fd 3 --log-fd 4 --listen '[[6, "0.0.0.0", 8000]]'

  - The listening sockets are inherited descriptors (C{--listen}: each
    descriptor's address and port); every worker accepts on the same
    sockets, and the kernel gives each client to one of them.
  - Its log events go to the main process as JSON lines on C{--log-fd}
    (L{tcpproxy.eventpipe});
    the main process writes them into its own log, marked with the
    worker's number.
  - Its configuration is the bytes its main process read and checked
    (on C{--config-fd} at start, over the control channel for a reload),
    named after C{--config} (for messages, and the TLS files' folder).
  - The main process drives it over AMP on C{--control-fd}
    (L{tcpproxy.control}): new ports, reloads, metrics and status.
  - C{SIGTERM} drains and exits, as the proxy does; C{SIGHUP}, C{SIGINT}
    and C{SIGUSR1} are ignored (they are the main process's: a C{kill} to
    the process group, or Ctrl-C in a terminal, must not stop a worker
    behind its main process's back).  If the main process goes away, the
    worker drains and exits too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
from itertools import count

from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner

from tcpproxy.collector import tuneCollector
from tcpproxy.config import AppConfig, ConfigError, ProxyConfig, Target, parseConfigBytes, parseTarget
from tcpproxy.control import (
    CHUNK,
    AdoptPort,
    ConfigChunk,
    Fetch,
    QuietAMP,
    Reload,
    SetTargetState,
    UnknownTarget,
)
from tcpproxy.describe import hostPort
from tcpproxy.eventpipe import PipeObserver
from tcpproxy.listening import ListenError
from tcpproxy.service import ProxyService


def share(total: int | None, index: int, workers: int) -> int | None:
    """
    Worker C{index}'s (0-based) part of a limit of C{total} divided among
    C{workers}: C{total // workers}, the remainder going one each to the
    first workers, so the parts add up to C{total} exactly; but never less
    than 1 (a limit below the number of workers is then exceeded, by at
    most one connection per worker).

    @return: C{None} for no limit.
    """
    if total is None:
        return None
    return max(1, total // workers + (1 if index < total % workers else 0))


def workerConfig(config: ProxyConfig, index: int, workers: int) -> ProxyConfig:
    """
    What worker C{index} (0-based) of C{workers} runs of C{config}: every
    app and port, C{MaxConnections} (proxy-wide, per app and per target)
    divided among the workers (L{share}), and no admin endpoint (the main
    process serves it, for all of them).  (A client queued for a full
    target waits for a slot of its own worker's share.)
    """

    def target(target: Target) -> Target:
        if target.maxConnections is None:
            return target
        return dataclasses.replace(target, maxConnections=share(target.maxConnections, index, workers))

    def app(app: AppConfig) -> AppConfig:
        return dataclasses.replace(
            app,
            maxConnections=share(app.maxConnections, index, workers),
            targets=tuple(map(target, app.targets)),
        )

    return dataclasses.replace(
        config,
        apps=tuple(app(a) for a in config.apps),
        maxConnections=share(config.maxConnections, index, workers),
        admin=None,
    )


class WorkerService(ProxyService):
    """
    A L{ProxyService} whose listening sockets are those its main process
    bound, and whose configuration is its L{share <workerConfig>}.

    @ivar inherited: C{(address, port)} to a listening socket received and
        not yet listened on.
    @ivar number: the worker's number, from 1.
    @ivar workers: how many workers there are.
    """

    def __init__(self, config: ProxyConfig, reactor, configPath: str, number: int, workers: int) -> None:
        self.number = number
        self.workers = workers
        self.inherited: dict[tuple[str, int], socket.socket] = {}
        self.pending = bytearray()
        ProxyService.__init__(self, workerConfig(config, number - 1, workers), reactor, configPath)

    def bindListeners(self, wanted: list[tuple[str, str, int]]) -> list[socket.socket]:
        """
        The sockets the main process bound for C{wanted}, all or none.

        @raise ListenError: the main process bound no socket for one of
            them (it could not, and has logged why).
        """
        missing = [(owner, a, p) for owner, a, p in wanted if (a, p) not in self.inherited]
        if missing:
            owner, address, port = missing[0]
            raise ListenError(
                f"{owner}: cannot listen on {hostPort(address, port)}: the main process could not bind it"
            )
        return [self.inherited.pop((address, port)) for _, address, port in wanted]

    def readConfig(self) -> ProxyConfig:
        raw, self.pending = bytes(self.pending), bytearray()
        return workerConfig(parseConfigBytes(raw, self.configPath), self.number - 1, self.workers)

    def closeUnused(self) -> None:
        """
        Close the inherited sockets no reload took (a reload that failed
        in this worker).
        """
        for sock in self.inherited.values():
            sock.close()
        self.inherited.clear()


class WorkerControl(QuietAMP):
    """
    The worker's end of the control channel (L{tcpproxy.control}).

    @ivar lost: fires when the main process's end is gone.
    """

    def __init__(self, service: WorkerService) -> None:
        QuietAMP.__init__(self)
        self.service = service
        self.lost: Deferred[None] = Deferred()
        self._documents: dict[int, bytes] = {}
        self._tokens = count(1)

    @AdoptPort.responder
    def adoptPort(self, address: str, port: int, socket: int) -> dict:
        import socket as sockets

        sock = sockets.socket(fileno=socket)
        sock.setblocking(False)
        previous = self.service.inherited.pop((address, port), None)
        if previous is not None:
            previous.close()
        self.service.inherited[(address, port)] = sock
        return {}

    @ConfigChunk.responder
    def configChunk(self, data: bytes) -> dict:
        self.service.pending += data
        return {}

    @Reload.responder
    def reload(self) -> Deferred[dict]:
        def done(result):
            self.service.closeUnused()
            return {"status": result.status}

        return self.service.reload().addCallback(done)

    @Fetch.responder
    def fetch(self, what: str, token: int, offset: int) -> dict:
        if offset == 0:
            token = next(self._tokens)
            self._documents[token] = self._make(what)
        document = self._documents.get(token, b"")
        chunk = document[offset : offset + CHUNK]
        if offset + CHUNK >= len(document):
            self._documents.pop(token, None)
        return {"token": token, "chunk": chunk, "total": len(document)}

    def _make(self, what: str) -> bytes:
        from tcpproxy.admin import AdminResource, statusOf

        if what == "status":
            return json.dumps(statusOf(self.service)).encode("utf-8")
        resource = AdminResource(self.service, ())
        return resource.metricsText()

    @SetTargetState.responder
    def setTargetState(self, app: str, target: str, action: str, why: str) -> dict:
        factory = self.service.factories.get(app)
        if factory is None:
            raise UnknownTarget(app)
        try:
            parsed = parseTarget(target)
        except ValueError:
            raise UnknownTarget(target) from None
        if parsed not in factory.health.states:
            raise UnknownTarget(target)
        change = factory.health.drain if action == "drain" else factory.health.ready
        changed = change(parsed, why)
        return {"state": factory.health.stateOf(parsed), "changed": bool(changed)}

    def connectionLost(self, reason) -> None:
        QuietAMP.connectionLost(self, reason)
        self.lost.callback(None)


class _Once(Factory):
    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tcpproxy.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--log-fd", type=int, required=True)
    parser.add_argument("--listen", default="[]", help="JSON: [[fd, address, port], ...]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """
    Run one worker until it is told to stop (C{SIGTERM}) or its main
    process goes away; exit 1 if its configuration is refused.
    """
    # Ours from the first moment: the main process's signals, not ours.
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    arguments = parseArguments(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor

    stream = open(arguments.log_fd, "wb")  # noqa: SIM115
    observer = PipeObserver(stream, reactor)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    log = Logger(namespace="tcpproxy.worker")
    try:
        serve(arguments, reactor, log)
    finally:
        observer.flush()


def serve(arguments: argparse.Namespace, reactor, log: Logger) -> None:
    """
    L{main} once logging is set up.
    """
    with open(arguments.config_fd, "rb") as f:
        raw = f.read()
    inherited = {}
    for fd, address, port in json.loads(arguments.listen):
        inherited[(address, port)] = sock = socket.socket(fileno=fd)
        sock.setblocking(False)
    try:
        config = parseConfigBytes(raw, arguments.config)
        service = WorkerService(config, reactor, arguments.config, arguments.number, arguments.workers)
        service.inherited.update(inherited)
        service.bind()
    except (ConfigError, ListenError) as e:
        # A TLS file gone since the main process checked it, say: one line,
        # and the main process starts this worker again after a back-off.
        log.error("worker {number} cannot start: {error}", number=arguments.number, error=str(e))
        raise SystemExit(1) from None
    service.closeUnused()
    tuneCollector()

    control = WorkerControl(service)
    reactor.adoptStreamConnection(arguments.control_fd, socket.AF_UNIX, _Once(control))
    os.close(arguments.control_fd)

    def gone(_: None) -> None:
        if not service.running:
            return  # stopping already: the channel closes as the worker ends
        log.warn("the main process is gone: stopping")
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    control.lost.addCallback(gone)

    def start() -> None:
        service.startService()
        # reactor.run installed its own SIGINT handler: ignore it again.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
