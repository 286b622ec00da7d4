"""
``python -m bench.pool``: the time to first byte a warm pool saves, with
the target 5 ms away, measured on the real ``twistd -n tcpproxy`` process.

One proxy process serves two apps with the same target: ``plain`` (no
pool) and ``pooled`` (``"Pool": {"Size": 2}``).  The target is a
server-first backend (it greets, as SMTP or SSH do) behind a delay line
(L{tcpproxy.tests.delayline.DelayLine}: every chunk held 5 ms each way, the
target connected 5 ms after the proxy's connect, when its SYN would get
there).  netem is missing from this project's kernels, so the delay line
is this process's own.

Clients connect one at a time, alternating between the two apps, each
after the pool had time to refill; a client's time to first byte runs from
its connect to the first byte of the greeting.  Without the pool that is
one round trip to the target (10 ms) plus the proxy's own time; with it,
the greeting is already in the proxy.  Prints the medians, the 90th
percentiles and the saving, in milliseconds and in round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from bench.proxies import freePort
from bench.system import checkoutEnvironment, checkoutRoot
from tcpproxy.tests.delayline import DelayLine

GREETING = b"220 bench.example ESMTP ready\r\n"


class _Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(GREETING)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class _FirstByte(Protocol):
    def __init__(self) -> None:
        self.began = reactor.seconds()
        self.answered: Deferred[float] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(reactor.seconds() - self.began)
            self.transport.loseConnection()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@inlineCallbacks
def _measure(options, result: dict):
    oneWay = options.delay / 1000
    backend = Factory.forProtocol(_Greeter)
    backend.noisy = False
    backendPort = reactor.listenTCP(0, backend, interface="127.0.0.1").getHost().port
    line = DelayLine(reactor, backendPort, oneWay, connectLate=True)
    line.noisy = False
    linePort = reactor.listenTCP(0, line, interface="127.0.0.1").getHost().port
    ports = {"plain": freePort(), "pooled": freePort()}
    target = f"127.0.0.1:{linePort}"
    config = {
        "BindAddress": "127.0.0.1",
        "Defaults": {"AccessLog": False},
        "Apps": [
            {"Name": "plain", "Ports": [ports["plain"]], "Targets": [target]},
            {"Name": "pooled", "Ports": [ports["pooled"]], "Targets": [target], "Pool": {"Size": 2}},
        ],
    }
    workdir = tempfile.mkdtemp(prefix="bench-pool-")
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    root = checkoutRoot()
    with open(os.path.join(workdir, "output.log"), "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "tcpproxy", "--config", path],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=checkoutEnvironment(root),
        )
    try:
        # The proxy answers once it has bound its ports.
        yield deferLater(reactor, 0, lambda: None)
        yield _waitListening(ports["plain"], process)
        times: dict[str, list[float]] = {"plain": [], "pooled": []}
        for index in range(options.clients):
            order = ("plain", "pooled") if index % 2 else ("pooled", "plain")
            for kind in order:
                # Time for the pool to refill (a dial through the line: 2 round trips).
                yield deferLater(reactor, 6 * oneWay, lambda: None)
                client = _FirstByte()
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", ports[kind])
                client.began = reactor.seconds()
                yield connectProtocol(endpoint, client)
                times[kind].append((yield client.answered))
        result.update(times=times, oneWay=oneWay)
    finally:
        process.terminate()
        process.wait()


@inlineCallbacks
def _waitListening(port: int, process):
    import socket

    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError("the proxy exited at start-up")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        yield deferLater(reactor, 0.05, lambda: None)
    raise RuntimeError("the proxy did not listen in 15 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="clients per app (default 200)")
    parser.add_argument("--delay", type=float, default=5.0, help="one-way delay to the target, ms")
    options = parser.parse_args(argv)
    result: dict = {}
    failure: list = []

    def run():
        d = _measure(options, result)
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    if failure:
        failure[0].printTraceback()
        return 1
    roundTrip = 2 * result["oneWay"] * 1000
    lines = [
        f"time to first byte (greeting), target {options.delay:g} ms away, {options.clients} clients each:"
    ]
    medians = {}
    for kind in ("plain", "pooled"):
        values = [t * 1000 for t in result["times"][kind]]
        medians[kind] = statistics.median(values)
        lines.append(
            f"  {kind:7} median {medians[kind]:6.2f} ms   p90 {_percentile(values, 0.9):6.2f} ms"
        )
    saving = medians["plain"] - medians["pooled"]
    lines.append(
        f"  saving  {saving:6.2f} ms = {saving / roundTrip:.2f} round trip(s);"
        f" pooled/plain = {medians['pooled'] / medians['plain']:.2f}"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
