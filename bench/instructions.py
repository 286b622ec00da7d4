"""
``python -m bench.instructions``: the instructions a proxy process runs for
each new connection (connect, one small echo, close), counted by callgrind.

CPU time per connection, as the main benchmark measures it, moves with
whatever else runs on the machine (these machines are shared), and with the
proxy's own speed: a slower proxy lets the load generator and the backend
sleep between connections, and waking them costs the proxy kernel time.  An
instruction count does neither: run twice, it agrees to about 1%, so a
change of a few per cent to what a connection costs can be seen in one
run.  It counts the proxy's own instructions in user space (Python, the
libraries and the proxy's code; not the kernel's work for its system
calls, nor cache misses), so it is a companion to the CPU time, not a
replacement.

Each proxy (tcpproxy, the C{--baseline} checkout, HAProxy) runs under
C{valgrind --tool=callgrind} with instrumentation off while it starts and
warms up; C{callgrind_control} turns it on for C{--connections}
connections, made C{--concurrency} at a time by the main benchmark's load
generator, then off.  Needs valgrind (C{apt-get install valgrind}).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from bench.backends import BackendProcess
from bench.load import LoadError, connectMany
from bench.proxies import HAProxy, ProxyStartError, TcpProxy, findHAProxy

WARMUP = 100
"""
Connections made before counting: imports done, caches filled.
"""

START_TIMEOUT = 120.0
"""
Seconds a proxy under valgrind may take to start (a few times its usual).
"""

LOAD_TIMEOUT = 300.0


class InstructionCountError(Exception):
    """
    A count could not be taken; the text says why.
    """


def callgrind(outFile: str) -> tuple[str, ...]:
    """
    The command a proxy runs under: callgrind, counting nothing until told.
    """
    return ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={outFile}")


def _control(*arguments: str) -> None:
    done = subprocess.run(["callgrind_control", *arguments], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise InstructionCountError(
            f"callgrind_control {' '.join(arguments)}: {done.stdout}{done.stderr}".strip()
        )


def totalInstructions(outFile: str) -> int:
    """
    The largest count among the dumps callgrind wrote for C{outFile} (the
    one asked for, the others being what ran before or after it).

    @raise InstructionCountError: no dump holds a count.
    """
    best = 0
    for path in glob.glob(outFile + "*"):
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    best = max(best, int(line.split()[1]))
    if not best:
        raise InstructionCountError(f"no count in {outFile}*")
    return best


def count(proxy, backend: tuple[str, int], connections: int, concurrency: int, workdir: str) -> float:
    """
    Start C{proxy} under callgrind, relaying to C{backend}, and count its
    instructions for C{connections} new connections.

    @return: instructions per connection.
    @raise InstructionCountError: the proxy did not start, or the count failed.
    """
    outFile = os.path.join(workdir, f"{proxy.name}.callgrind")
    proxy.wrapper = callgrind(outFile)
    proxy.startTimeout = START_TIMEOUT
    try:
        proxy.start(backend)
    except ProxyStartError as e:
        raise InstructionCountError(str(e)) from None
    try:
        connectMany(proxy.address, concurrency, WARMUP, LOAD_TIMEOUT)
        _control("--instr=on", str(proxy.pid))
        figures = connectMany(proxy.address, concurrency, connections, LOAD_TIMEOUT)
        _control("--instr=off", str(proxy.pid))
        _control("--dump", str(proxy.pid))
    except LoadError as e:
        raise InstructionCountError(f"{proxy.name}: {e}") from None
    finally:
        proxy.stop()
    if figures["errors"]:
        raise InstructionCountError(
            f"{proxy.name}: {figures['errors']} connections failed: {figures['errorKinds']}"
        )
    return totalInstructions(outFile) / connections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="Instructions per new connection (connect, small echo, close), counted by callgrind.",
    )
    parser.add_argument("--connections", type=int, default=500, help="connections counted (default 500)")
    parser.add_argument("--concurrency", type=int, default=1, help="connections at a time (default 1)")
    parser.add_argument("--baseline", metavar="DIR", help="also count tcpproxy from another checkout")
    parser.add_argument("--haproxy", metavar="PATH", help="the haproxy binary (default: found on PATH)")
    options = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="tcpproxy-instructions-")
    proxies = [TcpProxy(workdir, None)]
    if options.baseline:
        proxies.append(TcpProxy(workdir, None, root=os.path.abspath(options.baseline)))
    haproxy = options.haproxy or findHAProxy()
    if haproxy is not None:
        proxies.append(HAProxy(workdir, None, haproxy))
    else:
        print("haproxy is not installed (apt-get install haproxy): skipped", file=sys.stderr)
    backend = BackendProcess(None)
    backend.start()
    figures = {}
    try:
        for proxy in proxies:
            try:
                figures[proxy.name] = count(
                    proxy, backend.address, options.connections, options.concurrency, workdir
                )
            except InstructionCountError as e:
                print(f"{proxy.name}: {e}", file=sys.stderr)
                return 1
            print(
                f"{proxy.name:10} {figures[proxy.name] / 1000:8.1f} k instructions per connection", flush=True
            )
    finally:
        backend.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"({options.connections} connections, {options.concurrency} at a time: connect, "
        "16-byte echo, close; user-space instructions of the proxy process)"
    )
    for name in ("baseline", "haproxy"):
        if name in figures:
            print(f"tcpproxy / {name}: {figures['tcpproxy'] / figures[name]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
