"""
Support for system tests: the real C{twistd} run as a user runs it, in a
directory of its own, on free loopback ports, with every wait bounded.

The tests are plain blocking code (a C{twistd} is another process; there is
nothing for the test's own reactor to do).  Waiting is polling with a
deadline -- for a port to answer, a log line to appear, a process to end --
never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import tcpproxy
from tcpproxy.tests.loopback import blockPort, freePorts  # noqa: F401 (used by the system tests)

T = TypeVar("T")

TIMEOUT = 10.0
"""
The longest any single wait may take: far above what each needs, so it only
ends a test that would otherwise hang.
"""

TWISTD = (
    sys.executable,
    "-c",
    # python -m twisted runs "twist", not "twistd".  A parent that ignores
    # SIGINT (a shell's background job, some CI runners) would pass that on
    # and twistd would then ignore Ctrl-C: give it what a terminal gives.
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from twisted.scripts.twistd import run; run()",
)
"""
The command that runs the C{twistd} of the Python running the tests.
"""


def sourceRoot() -> str:
    """
    The folder holding the C{tcpproxy} package the tests import (the
    repository, or site-packages), so that C{twistd} runs the same code.
    """
    return os.path.dirname(os.path.dirname(os.path.abspath(tcpproxy.__file__)))


def childEnvironment() -> dict[str, str]:
    """
    The environment for C{twistd}: the tests' own, with L{sourceRoot} first
    on the path (it also holds the C{twisted/plugins/tcpproxy_plugin.py}
    that makes C{twistd tcpproxy} known).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (sourceRoot(), env.get("PYTHONPATH")) if p)
    return env


def waitUntil(predicate: Callable[[], T], what: str, timeout: float = TIMEOUT) -> T:
    """
    Call C{predicate} until it returns something true, and return that.

    @raise AssertionError: naming C{what}, if C{timeout} seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def connect(port: int) -> socket.socket:
    """
    A blocking client connected to C{127.0.0.1:port}, every operation of
    which times out after L{TIMEOUT}.
    """
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def accepts(port: int) -> bool:
    """
    Whether a connection to C{127.0.0.1:port} is accepted (it is closed again).
    """
    try:
        connect(port).close()
    except ConnectionRefusedError:
        return False
    return True


def describe(sock: socket.socket) -> str:
    """
    The client's own address as the proxy logs it: C{host:port}.
    """
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def receive(sock: socket.socket, size: int) -> bytes:
    """
    Read exactly C{size} bytes, or fewer if the peer closes first.
    """
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def receiveAll(sock: socket.socket) -> bytes:
    """
    Read until the peer closes.
    """
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def echoThrough(port: int, message: bytes) -> tuple[bytes, str]:
    """
    Send C{message} to C{127.0.0.1:port}, then EOF, and read until closed.

    @return: what came back, and the client's address.
    """
    with connect(port) as sock:
        client = describe(sock)
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        return receiveAll(sock), client


def processGone(pid: int) -> bool:
    """
    Whether process C{pid} has ended.  A daemon's parent is init, which may
    never reap it, so a zombie counts as ended.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


def pidsMentioning(text: str) -> list[int]:
    """
    The live processes (other than this one) whose command line contains
    C{text}, on a system with C{/proc}.
    """
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                commandLine = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if text in commandLine:
            pids.append(int(entry))
    return pids


class Twistd:
    """
    C{twistd} runs for one test, all in one new directory (the working
    directory of each run), all killed when the test ends whatever happened.

    @ivar directory: the absolute path of the directory.
    @ivar process: the last process started.
    """

    def __init__(self, testCase) -> None:
        self.directory = os.path.abspath(testCase.mktemp())
        os.makedirs(self.directory)
        self.process: subprocess.Popen | None = None
        self._processes: list[subprocess.Popen] = []
        self._runs = 0
        testCase.addCleanup(self.killAll)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def writeConfig(self, document: object, name: str = "config.json") -> str:
        """
        Write C{document} as JSON (or a string as it is) into the directory.

        @return: the file's absolute path.
        """
        path = self.path(name)
        with open(path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document, indent=2))
        return path

    def start(self, *arguments: str, fileLimit: int | None = None) -> subprocess.Popen:
        """
        Start C{twistd} with C{arguments}; its standard output and error go
        to files, read by L{stdout} and L{stderr} at any time.

        @param fileLimit: if given, the process's soft and hard
            C{RLIMIT_NOFILE}, so that it runs out of descriptors early.
        """

        def limitFiles() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fileLimit, fileLimit))

        self._runs += 1
        self._stdout = self.path(f"stdout.{self._runs}")
        self._stderr = self.path(f"stderr.{self._runs}")
        with open(self._stdout, "wb") as out, open(self._stderr, "wb") as err:
            self.process = subprocess.Popen(
                [*TWISTD, *arguments],
                cwd=self.directory,
                env=childEnvironment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=limitFiles if fileLimit is not None else None,
            )
        self._processes.append(self.process)
        return self.process

    def run(self, *arguments: str) -> int:
        """
        Run C{twistd} with C{arguments} until it exits.

        @return: its exit status.
        """
        self.start(*arguments)
        return self.wait()

    def runDaemon(self, config: str) -> tuple[int, str, str]:
        """
        Start C{twistd tcpproxy --demo-backends} on C{config} in the
        background, with a pidfile and a logfile in L{directory}.

        @return: the daemon's pid, the pidfile and the logfile.
        @raise AssertionError: with the output, if twistd did not exit 0.
        """
        pidfile, logfile = self.path("twistd.pid"), self.path("twistd.log")
        status = self.run(
            "--pidfile", pidfile, "--logfile", logfile, "tcpproxy", "--config", config, "--demo-backends"
        )
        if status != 0:
            raise AssertionError(f"twistd exited with status {status}:\n{self.output()}")
        with open(pidfile) as f:
            return int(f.read()), pidfile, logfile

    def wait(self, timeout: float = TIMEOUT) -> int:
        """
        Wait for the last process started to exit.

        @return: its exit status (minus the signal number if one ended it).
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"twistd still runs after {timeout:g}s:\n{self.output()}") from None

    def stdout(self) -> str:
        with open(self._stdout, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self._stderr, encoding="utf-8", errors="replace") as f:
            return f.read()

    def output(self) -> str:
        """
        Both outputs of the last run, labelled, for failure messages.
        """
        return f"--- stdout:\n{self.stdout()}--- stderr:\n{self.stderr()}"

    def assertRunning(self) -> bool:
        """
        @raise AssertionError: with its output, if the process has exited.
        """
        status = self.process.poll()
        if status is not None:
            raise AssertionError(f"twistd exited with status {status}:\n{self.output()}")
        return True

    def waitUntilServing(self, *ports: int) -> None:
        """
        Wait until every one of C{ports} accepts connections, failing at
        once if the process exits instead.
        """
        for port in ports:
            waitUntil(lambda port=port: self.assertRunning() and accepts(port), f"port {port} to accept")

    def killAll(self) -> None:
        """
        Kill whatever is left of this test's runs: the children, and any
        daemon, found by this directory (unique to the test) in its command
        line.
        """
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
        for pid in pidsMentioning(self.directory):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
