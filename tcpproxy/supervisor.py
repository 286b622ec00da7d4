"""
The main process of C{twistd tcpproxy --workers N}: it binds every port,
starts N worker processes that accept on those very sockets and run the
whole relay (L{tcpproxy.worker}), and supervises them.  It relays nothing.

  - B{Ports.}  Bound here, before C{twistd} forks or writes its pidfile,
    as with one process; each worker inherits the descriptors
    (C{spawnProcess}'s C{childFDs}) and accepts on them.  One socket shared
    by every worker, rather than a C{SO_REUSEPORT} socket per worker: the
    kernel then gives a client to a worker that is waiting in C{epoll}
    (an idle one), where C{SO_REUSEPORT} hashes the client's address to a
    worker whether it is busy or not; and a worker that dies takes no
    queue of clients with it (see the README's sizing note for the
    measurement).
  - B{Supervision.}  A worker that ends is logged, with its exit status or
    signal, and started again, after a back-off that grows while it keeps
    dying (L{backoffPolicy}); the others keep serving the same sockets
    meanwhile.
  - B{Reload} (C{SIGHUP}, C{--watch}).  The file is read and checked here,
    once: a refused file is logged once and no worker hears of it.  A
    valid one is sent, as the bytes read, to every worker, which applies
    it as one process does; a port added is bound here first and its
    socket passed to every worker (L{AdoptPort}), a port removed is closed
    here and by every worker.
  - B{Stop} (C{SIGTERM}, C{SIGINT}).  The ports close here; every worker
    gets C{SIGTERM} and drains (C{DrainTimeout}); the main process ends
    when the last worker has.
  - B{Logs.}  Every worker's events come here (JSON lines on a pipe) and
    are published in this process's log, with C{log_system} C{worker N}
    (the text log's C{[worker N]}) and a C{worker} field: one log file,
    which C{twistd} reopens on C{SIGUSR1}.
  - B{Admin endpoint.}  Served here: C{/metrics} sums the workers'
    (L{tcpproxy.workerstats}), C{/status} shows the sums and each worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import sys
from collections import Counter
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.web.server import NOT_DONE_YET

import tcpproxy
from tcpproxy.admin import AdminResource, AdminServer, statusDocument
from tcpproxy.applying import NOT_APPLIED, REFUSED, owner
from tcpproxy.config import (
    ConfigError,
    ProxyConfig,
    checkWorkers,
    parseConfigBytes,
    parseTarget,
    readConfigBytes,
)
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
from tcpproxy.eventpipe import decodeEvent
from tcpproxy.listening import ListenError, bindAll
from tcpproxy.metrics import RELOAD_RESULTS
from tcpproxy.reload import planReload
from tcpproxy.statuspage import renderPage
from tcpproxy.tls import loadAppTLS
from tcpproxy.triggers import IReloadTrigger
from tcpproxy.workerstats import mergeStatus, sumMetrics

log = Logger(namespace="tcpproxy.supervisor")

STABLE = 10.0
"""
Seconds a worker must have run for its end not to count as one more
failure in a row: the back-off starts again from its shortest delay.
"""

STOP_GRACE = 5.0
"""
Seconds a stopping worker is given beyond C{DrainTimeout} before it is
killed (C{SIGKILL}).
"""

ASK_TIMEOUT = 2.0
"""
Seconds the admin endpoint waits for a worker's metrics or status before
answering without them.
"""

CONFIG_FD, CONTROL_FD, LOG_FD = 5, 3, 4
FIRST_LISTEN_FD = 6


class _Once(Factory):
    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


class _Control(QuietAMP):
    """
    The main process's end of one worker's control channel.
    """

    def __init__(self) -> None:
        QuietAMP.__init__(self)
        self.lost = False

    def connectionLost(self, reason) -> None:
        self.lost = True
        QuietAMP.connectionLost(self, reason)


def endOf(reason) -> str:
    """
    How a process ended, for a person: C{exited with status 1}, C{killed
    by signal SIGKILL}.
    """
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = str(value.signal)
        return f"killed by signal {name}"
    if isinstance(value, ProcessDone | ProcessTerminated):
        return f"exited with status {value.exitCode}"
    return str(value)


class WorkerProcess(ProcessProtocol):
    """
    One worker process, as the main process sees it.

    @ivar number: from 1.
    @ivar pid: its process id.
    @ivar control: the AMP end of its control channel.
    @ivar ended: fires once the process has ended.
    @ivar startedAt: when it was started (the reactor's time).
    """

    def __init__(self, pool: WorkerPool, number: int, control: _Control, config: bytes) -> None:
        self.pool = pool
        self.number = number
        self.control = control
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()
        self.startedAt = pool.reactor.seconds()
        self._config = config
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.writeToChild(CONFIG_FD, self._config)
        self.transport.closeChildFD(CONFIG_FD)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.pop(childFD, b"") + data).split(b"\n")
        if lines[-1]:
            self._partial[childFD] = lines[-1]
        for line in lines[:-1]:
            self._line(childFD, line)

    def _line(self, childFD: int, line: bytes) -> None:
        if not line.strip():
            return
        text = line.decode("utf-8", "replace")
        if childFD == LOG_FD:
            try:
                event = decodeEvent(line)
            except ValueError:
                pass
            else:
                self.pool.forward(self.number, event)
                return
        # Its standard output or error: a crash before logging started.
        log.warn("worker {worker}: {line}", worker=self.number, line=text)

    def childConnectionLost(self, childFD: int) -> None:
        rest = self._partial.pop(childFD, b"")
        if rest:
            self._line(childFD, rest)

    def processEnded(self, reason) -> None:
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


@dataclasses.dataclass
class _Slot:
    """
    A worker number, and what the pool knows of it.
    """

    number: int
    process: WorkerProcess | None = None
    failures: int = 0
    restarts: int = 0
    pending: object = None  # the delayed call of a restart


class WorkerPool(Service):
    """
    Bind the ports of a configuration, serve them with C{count} worker
    processes, supervise them, reload and stop them (see the module).

    Has what the admin endpoint reads of the service it serves
    (C{config}, C{configPath}, C{running}, C{reactor}, C{loadedAt}).

    @ivar sockets: C{(address, port)} to the listening socket bound here.
    @ivar reloadCounts: reloads by result.
    """

    def __init__(
        self,
        config: ProxyConfig,
        raw: bytes,
        reactor,
        count: int,
        configPath: str | None = None,
        triggers: Sequence[IReloadTrigger] = (),
        publisher=globalLogPublisher,
    ) -> None:
        """
        @param raw: the bytes C{config} was read from, for the workers.
        @param count: how many workers.
        """
        self.config = config
        self.configBytes = raw
        self.configPath = configPath if configPath is not None else config.source
        self.reactor = reactor
        self.count = count
        self._triggers = tuple(triggers)
        self._publisher = publisher
        self._policy = backoffPolicy(
            initialDelay=0.2, maxDelay=30.0, factor=2.0, jitter=lambda: random.random() * 0.1
        )
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.slots = [_Slot(n) for n in range(1, count + 1)]
        self.admin = WorkersAdminServer(self, reactor)
        self.reloadCounts: Counter[str] = Counter()
        self.loadedAt = reactor.seconds()

    # Ports

    def bind(self) -> None:
        """
        Bind every port and the admin endpoint, or none (as
        L{tcpproxy.service.ProxyService.bind}).

        @raise ListenError: naming the file, the app and the port.
        """
        if self.sockets:
            return
        config = self.config
        listeners = config.listeners()
        wanted = [
            (f"{config.source}: {owner(app.name)}", config.bindAddress, port) for app, port in listeners
        ]
        for (_, address, port), sock in zip(wanted, bindAll(wanted), strict=True):
            self.sockets[(address, port)] = sock
        try:
            self.admin.bind(config.admin)
        except BaseException:
            self.unbind()
            raise

    def unbind(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        self.admin.unbind()

    # Workers

    def startService(self) -> None:
        self.bind()
        Service.startService(self)
        log.info(
            "starting {count} worker processes on port(s) {ports}",
            count=self.count,
            ports=", ".join(str(port) for _, port in self.sockets),
        )
        for slot in self.slots:
            self._spawn(slot)
        self.admin.start()
        for trigger in self._triggers:
            trigger.start(self.reload)

    def _spawn(self, slot: _Slot) -> None:
        slot.pending = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control = _Control()
        try:
            self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, _Once(control))
        finally:
            parent.close()
        childFDs: dict[int, object] = {
            0: "w",
            1: "r",
            2: "r",
            CONTROL_FD: child.fileno(),
            LOG_FD: "r",
            CONFIG_FD: "w",
        }
        listen = []
        for fd, ((address, port), sock) in enumerate(self.sockets.items(), FIRST_LISTEN_FD):
            childFDs[fd] = sock.fileno()
            listen.append([fd, address, port])
        arguments = [
            sys.executable,
            "-m",
            "tcpproxy.worker",
            "--number",
            str(slot.number),
            "--workers",
            str(self.count),
            "--config",
            self.configPath,
            "--config-fd",
            str(CONFIG_FD),
            "--control-fd",
            str(CONTROL_FD),
            "--log-fd",
            str(LOG_FD),
            "--listen",
            json.dumps(listen),
        ]
        process = WorkerProcess(self, slot.number, control, self.configBytes)
        try:
            self.reactor.spawnProcess(
                process, sys.executable, arguments, env=_environment(), childFDs=childFDs
            )
        finally:
            child.close()
        slot.process = process
        log.info("worker {worker} started (pid {pid})", worker=slot.number, pid=process.pid)

    def forward(self, number: int, event: dict) -> None:
        """
        Publish an event of worker C{number} in this process's log.
        """
        event["worker"] = number
        event["log_system"] = f"worker {number}"
        self._publisher(event)

    def workerEnded(self, process: WorkerProcess, reason) -> None:
        """
        A worker ended: log how; start it again unless the proxy stops.
        """
        slot = self.slots[process.number - 1]
        if slot.process is process:
            slot.process = None
        how = endOf(reason)
        if not self.running:
            log.info("worker {worker} (pid {pid}) {how}", worker=process.number, pid=process.pid, how=how)
            return
        lived = self.reactor.seconds() - process.startedAt
        slot.failures = 0 if lived >= STABLE else slot.failures + 1
        delay = self._policy(max(0, slot.failures - 1)) if slot.failures else 0.0
        log.warn(
            "worker {worker} (pid {pid}) {how}; starting it again in {delay:.1f}s",
            worker=process.number,
            pid=process.pid,
            how=how,
            delay=delay,
        )
        slot.restarts += 1
        slot.pending = self.reactor.callLater(delay, self._spawn, slot)

    def live(self) -> list[WorkerProcess]:
        return [slot.process for slot in self.slots if slot.process is not None]

    # Reload

    def reload(self) -> Deferred[str]:
        """
        Read and check the file once, then have every worker apply it.

        @return: fires with the reload's status once every worker answered.
        """
        if not self.running:
            log.info("reload ignored: the proxy is stopping", path=self.configPath, result=REFUSED)
            return succeed(REFUSED)
        try:
            raw = readConfigBytes(self.configPath)
            new = parseConfigBytes(raw, self.configPath)
            # As at start-up: the workers that run are those to reckon with.
            checkWorkers(new, self.count)
            # Checked here too, so a refused TLS file is said once.
            for app in new.apps:
                loadAppTLS(app, new.source)
        except ConfigError as e:
            log.error(
                "reload refused, nothing changed: {error}", path=self.configPath, result=REFUSED, error=str(e)
            )
            self.reloadCounts[REFUSED] += 1
            return succeed(REFUSED)
        old = self.config
        plan = planReload(old, new)
        notes: list[str] = []
        address = new.bindAddress
        fresh: dict[tuple[str, int], socket.socket] = {}
        if plan.bindAddress is not None:
            ports = [(app.name, port) for app, port in new.listeners()]
            try:
                sockets = bindAll([(owner(name), address, port) for name, port in ports])
            except ListenError as e:
                notes.append(f"BindAddress not changed: {e}")
                address = old.bindAddress
            else:
                fresh = {(address, port): sock for (_, port), sock in zip(ports, sockets, strict=True)}
        for port, name in plan.addedPorts:
            if (address, port) in fresh or (address, port) in self.sockets:
                continue
            try:
                [fresh[(address, port)]] = bindAll([(owner(name), address, port)])
            except ListenError as e:
                notes.append(str(e))
        if plan.admin is not None:
            try:
                self.admin.reconfigure(new.admin)
            except ListenError as e:
                notes.append(str(e))
        if new.workers != old.workers:
            notes.append(f"Workers: {self.count} -> {new.workers} takes a restart; {self.count} run")

        wanted = {(address, port) for _, port in new.listeners()}
        for key in list(self.sockets):
            if key not in wanted:
                self.sockets.pop(key).close()
        self.sockets.update(fresh)
        self.config = dataclasses.replace(new, bindAddress=address)
        self.configBytes = raw

        workers = self.live()
        log.info(
            "reload of {path}: checked; sent to {count} worker(s){notes}",
            path=self.configPath,
            count=len(workers),
            notes="".join(f"; {note}" for note in notes),
        )
        answers = [self._reloadWorker(worker, fresh) for worker in workers]
        return gatherResults(answers).addCallback(self._reloaded)

    def _reloadWorker(self, worker: WorkerProcess, fresh: dict) -> Deferred[str]:
        call = worker.control.callRemote
        for (address, port), sock in fresh.items():
            call(AdoptPort, address=address, port=port, socket=sock.fileno())
        raw = self.configBytes
        for offset in range(0, len(raw), CHUNK):
            call(ConfigChunk, data=raw[offset : offset + CHUNK])
        answer = call(Reload)
        answer.addCallback(lambda response: response["status"])
        # A worker that dies meanwhile is started again with this file.
        return answer.addErrback(lambda _: NOT_APPLIED)

    def _reloaded(self, statuses: list[str]) -> str:
        status = statuses[0] if statuses and len(set(statuses)) == 1 else "applied with errors"
        if not statuses:
            status = "no change"
        self.reloadCounts[status.replace(" ", "_")] += 1
        if status != NOT_APPLIED:
            self.loadedAt = self.reactor.seconds()
        return status

    # Stop

    def stopService(self) -> Deferred[None]:
        """
        Close the ports, have every worker drain and end, then end.
        """
        Service.stopService(self)
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        for slot in self.slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            slot.pending = None
        workers = self.live()
        log.info(
            "stopping: {count} worker(s) draining for up to {timeout:g}s",
            count=len(workers),
            timeout=self.config.drainTimeout,
        )
        for worker in workers:
            _signal(worker, "TERM")
        killer = self.reactor.callLater(self.config.drainTimeout + STOP_GRACE, self._kill)
        done = gatherResults([worker.ended for worker in workers])

        def stopped(result: object) -> object:
            if killer.active():
                killer.cancel()
            for trigger in self._triggers:
                trigger.stop()
            self.admin.stop()
            return result

        return done.addBoth(stopped)

    def _kill(self) -> None:
        for worker in self.live():
            log.warn(
                "worker {worker} (pid {pid}) still runs: killing it", worker=worker.number, pid=worker.pid
            )
            _signal(worker, "KILL")

    # For the admin endpoint

    def fetch(self, worker: WorkerProcess, what: str) -> Deferred[bytes | None]:
        """
        Worker C{worker}'s metrics or status document, or C{None} if it
        does not answer.
        """
        parts: list[bytes] = []
        result: Deferred[bytes | None] = Deferred()

        def got(response: dict, offset: int) -> None:
            if result.called:
                return  # given up on (a timeout)
            parts.append(response["chunk"])
            offset += len(response["chunk"])
            if offset >= response["total"] or not response["chunk"]:
                result.callback(b"".join(parts))
            else:
                ask(response["token"], offset)

        def failed(_: object) -> None:
            if not result.called:
                result.callback(None)

        def ask(token: int, offset: int) -> None:
            d = worker.control.callRemote(Fetch, what=what, token=token, offset=offset)
            d.addCallbacks(got, failed, callbackArgs=(offset,))

        if worker.control.lost:
            return succeed(None)
        ask(0, 0)
        return result

    def gather(self, what: str) -> Deferred[list[tuple[WorkerProcess, bytes | None]]]:
        """
        Every live worker's metrics or status document; C{None} for a
        worker that does not answer within L{ASK_TIMEOUT} seconds (one
        stopped, or stuck: the admin endpoint still answers, without it).
        """
        workers = self.live()
        answers = [
            self.fetch(worker, what)
            .addTimeout(ASK_TIMEOUT, self.reactor)
            .addErrback(lambda _: None)
            for worker in workers
        ]
        return gatherResults(answers).addCallback(lambda results: list(zip(workers, results, strict=True)))


def _signal(worker: WorkerProcess, name: str) -> None:
    try:
        worker.transport.signalProcess(name)
    except OSError:
        pass
    except Exception:  # ProcessExitedAlready
        pass


def _environment() -> dict[str, str]:
    """
    The workers' environment: this process's, with the folder that holds
    the C{tcpproxy} package first on the path, so that the workers run the
    very code this process runs.
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(tcpproxy.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class WorkersAdminResource(AdminResource):
    """
    The admin endpoint of the main process: the pages of L{AdminResource},
    made from what every worker answers.
    """

    def __init__(self, service: WorkerPool, allow) -> None:
        AdminResource.__init__(self, service, allow)

    def _later(self, request, what: str, make) -> object:
        """
        Answer C{request} with C{make(answers)} once every worker answered.
        """
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def answer(body: bytes) -> None:
            if not finished:
                request.write(body)
                request.finish()

        def failed(failure) -> None:
            log.failure("admin endpoint: asking the workers failed", failure)
            if not finished:
                request.setResponseCode(500)
                request.finish()

        self.service.gather(what).addCallback(make).addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _metrics(self, request) -> object:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._later(request, "metrics", self._sum)

    def _sum(self, answers: list) -> bytes:
        families = sumMetrics(text for _, text in answers if text is not None)
        families += self._own(len([1 for _, text in answers if text is not None]))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(families))
        return generate_latest(registry)

    def _own(self, running: int) -> list:
        pool = self.service
        reloads = CounterMetricFamily(
            "tcpproxy_reloads", "Configuration reloads, by result.", labels=["result"]
        )
        for result in [*RELOAD_RESULTS, *sorted(set(pool.reloadCounts) - set(RELOAD_RESULTS))]:
            reloads.add_metric([result], pool.reloadCounts[result])
        restarts = CounterMetricFamily(
            "tcpproxy_worker_restarts", "Worker processes started again after they ended.", labels=["worker"]
        )
        for slot in pool.slots:
            restarts.add_metric([str(slot.number)], slot.restarts)
        return [
            reloads,
            GaugeMetricFamily(
                "tcpproxy_config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded (Unix time).",
                value=pool.loadedAt,
            ),
            GaugeMetricFamily("tcpproxy_workers", "Worker processes configured.", value=pool.count),
            GaugeMetricFamily("tcpproxy_workers_running", "Worker processes that answered.", value=running),
            restarts,
        ]

    def status(self, answers: list) -> dict:
        pool = self.service
        documents = {worker.number: json.loads(text) for worker, text in answers if text is not None}
        config = pool.config
        workers = []
        for slot in pool.slots:
            process = slot.process
            workers.append(
                {
                    "worker": slot.number,
                    "pid": process.pid if process is not None else None,
                    "running": slot.number in documents,
                    "restarts": slot.restarts,
                    "apps": documents[slot.number]["apps"] if slot.number in documents else [],
                }
            )
        apps = mergeStatus([documents[n] for n in sorted(documents)])
        for app in apps:
            configured = next((a for a in config.apps if a.name == app["name"]), None)
            if configured is not None:
                app["limits"]["maxConnections"] = configured.maxConnections
        return {**statusDocument(pool, config, apps), "workers": workers}

    def _status(self, request) -> object:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return self._later(
            request, "status", lambda answers: (json.dumps(self.status(answers), indent=1) + "\n").encode()
        )

    def _page(self, request) -> object:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        now = self.service.reactor.seconds()
        return self._later(
            request, "status", lambda answers: renderPage(self.status(answers), now).encode("utf-8")
        )

    def _control(self, request, appName: str, targetText: str, action: str) -> object:
        pool = self.service
        app = next((a for a in pool.config.apps if a.name == appName), None)
        if app is None:
            return self._json(request, 404, {"error": f"no app named {appName!r}"})
        try:
            target = parseTarget(targetText)
        except ValueError as e:
            return self._json(request, 404, {"error": f"target {targetText!r} {e}"})
        if target not in app.targets:
            return self._json(request, 404, {"error": f"{target} is not a target of app {appName!r}"})
        why = f"set by the admin endpoint (POST from {request.getClientAddress().host})"
        calls = [
            worker.control.callRemote(
                SetTargetState, app=appName, target=str(target), action=action, why=why
            ).addErrback(lambda f: f.trap(UnknownTarget) and None)
            for worker in pool.live()
        ]

        def answer(results: list) -> bytes:
            known = [r for r in results if r]
            return (
                json.dumps(
                    {
                        "app": appName,
                        "target": str(target),
                        "state": known[0]["state"] if known else None,
                        "changed": any(r["changed"] for r in known),
                        "workers": len(known),
                    }
                ).encode("utf-8")
                + b"\n"
            )

        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def send(body: bytes) -> None:
            if not finished:
                request.write(body)
                request.finish()

        gatherResults(calls).addCallback(answer).addCallback(send)
        return NOT_DONE_YET


class _Fixed:
    """
    A collector of families already made.
    """

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)


class WorkersAdminServer(AdminServer):
    resourceFactory = WorkersAdminResource
