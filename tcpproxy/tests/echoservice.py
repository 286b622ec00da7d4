"""
A small echo service that scale-to-zero tests start and stop with real
commands, as systemd or a container runtime would be:

  - C{python -m tcpproxy.tests.echoservice start PORT PIDFILE [DELAY]}
    launches an echo server on C{127.0.0.1:PORT} in the background (it
    listens after C{DELAY} seconds, as a slow service would), writes its
    process id to C{PIDFILE}, and exits 0 at once;
  - C{... stop PIDFILE} kills it (and exits 0 if it was not running);
  - C{... fail} prints a line and exits 3, as a unit that cannot start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def serve(port: int, delay: float) -> None:
    time.sleep(delay)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    while True:
        client, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            while True:
                data = client.recv(65536)
                if not data:
                    break
                client.sendall(data)
            os._exit(0)
        client.close()
        # Reap the children that are done.
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        serve(int(argv[1]), float(argv[2]))
        return 0
    if argv[0] == "start":
        port, pidfile = argv[1], argv[2]
        delay = argv[3] if len(argv) > 3 else "0"
        process = subprocess.Popen(
            [sys.executable, "-m", "tcpproxy.tests.echoservice", "serve", port, delay],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with open(pidfile, "w") as f:
            f.write(str(process.pid))
        print(f"echo service on port {port} started, process {process.pid}")
        return 0
    if argv[0] == "stop":
        try:
            with open(argv[1]) as f:
                pid = int(f.read())
        except FileNotFoundError:
            print("echo service not running")
            return 0
        os.remove(argv[1])
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            print(f"echo service process {pid} was gone")
            return 0
        print(f"echo service process {pid} killed")
        return 0
    if argv[0] == "fail":
        print("Job for app.service failed: unit not found")
        return 3
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
