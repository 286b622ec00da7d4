"""
How evenly two worker processes share clients: one listening socket
inherited by both (what C{tcpproxy --workers} does), against a
C{SO_REUSEPORT} socket per worker.

    python -m bench.spread [--clients 2000]

Each worker is a plain C{epoll} accept loop (the same code in both cases,
so only the kernel's choice differs) that answers every client with its
number and closes.  Clients connect from this process, 20 at a time.  Two
rounds per way: both workers equally fast, then worker 1 made slow (it
spends 2 ms of CPU per client, as a worker busy with heavy connections
would): a good spread sends the slow worker fewer clients.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

LOOPBACK = "127.0.0.1"


def serve(listener: socket.socket, number: int, busy: float) -> None:
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    answer = str(number).encode()
    while True:
        for _ in poller.poll():
            while True:
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    break
                if busy:
                    until = time.perf_counter() + busy
                    while time.perf_counter() < until:
                        pass
                client.sendall(answer)
                client.close()


def worker(listener: socket.socket, number: int, busy: float) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            serve(listener, number, busy)
        finally:
            os._exit(0)
    return pid


def ask(port: int) -> int:
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        return int(sock.recv(16))


def bind(port: int, reusePort: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reusePort:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(1024)
    return sock


def measure(reusePort: bool, clients: int, busy: float) -> tuple[dict[int, int], float]:
    if reusePort:
        first = bind(0, True)
        port = first.getsockname()[1]
        listeners = [first, bind(port, True)]
    else:
        shared = bind(0, False)
        port = shared.getsockname()[1]
        listeners = [shared, shared]
    pids = [worker(listener, n, busy if n == 1 else 0.0) for n, listener in enumerate(listeners, 1)]
    for listener in listeners:
        listener.close()
    counts = {1: 0, 2: 0}
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(20) as pool:
            for number in pool.map(lambda _: ask(port), range(clients)):
                counts[number] += 1
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    return counts, time.monotonic() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    options = parser.parse_args(argv)
    print(f"{options.clients} clients, 20 at a time, two workers")
    print(f"{'listening':<28} {'worker 1 slow':<14} {'worker 1':>9} {'worker 2':>9} {'clients/s':>10}")
    for busy in (0.0, 0.002):
        for reusePort, label in ((False, "one socket, inherited"), (True, "SO_REUSEPORT, one each")):
            counts, seconds = measure(reusePort, options.clients, busy)
            print(
                f"{label:<28} {'yes' if busy else 'no':<14} {counts[1]:>9} {counts[2]:>9}"
                f" {options.clients / seconds:>10.0f}"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
