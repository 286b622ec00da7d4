"""
What the benchmark needs from the machine: CPU pinning, file descriptor
limits, a process's resident memory, and children that die with it.

Linux only: pinning is C{sched_setaffinity} (what C{taskset} does) and memory
is read from C{/proc/PID/status}.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass

FILE_LIMIT_WANTED = 16384
"""
File descriptors each process of the run should be allowed: the idle-memory
scenario holds thousands of connections, each a descriptor in the load
generator, in the proxy (twice) and in the backend.
"""

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CpuPlan:
    """
    Which CPUs the proxy under test gets, and which the load generator and
    the backends get, so that they do not compete.

    @ivar proxy: CPUs for the proxy, or C{None} to leave it unpinned.
    @ivar load: CPUs for the load generator and backends, or C{None}.
    @ivar description: one line for the report, saying what was done.
    """

    proxy: frozenset[int] | None
    load: frozenset[int] | None
    description: str


def planCpus() -> CpuPlan:
    """
    Give the first CPU this process may use to the proxy and the others to
    the load generator and backends; with a single CPU, pin nothing.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return CpuPlan(None, None, "one CPU only: nothing pinned, proxy and load generator share it")
    proxy, load = cpus[0], cpus[1:]
    shown = ",".join(map(str, load))
    return CpuPlan(
        frozenset([proxy]),
        frozenset(load),
        f"proxy pinned to CPU {proxy} (as taskset -c {proxy}); load generator and backends to CPU {shown}",
    )


def raiseFileLimit(wanted: int = FILE_LIMIT_WANTED) -> int:
    """
    Raise this process's soft C{RLIMIT_NOFILE} towards C{wanted}, as far as
    the hard limit allows.

    @return: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _dieWithParent() -> None:
    # PR_SET_PDEATHSIG: if the benchmark is killed outright, its children
    # (proxies, backends) are killed too instead of holding ports.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def childSetup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """
    A C{preexec_fn} for C{subprocess.Popen}: pin the child to C{cpus}, give it
    the file limit the run needs, and have it killed if this process dies.
    """

    def setup() -> None:
        _dieWithParent()
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        raiseFileLimit()

    return setup


def residentKiB(pid: int) -> int:
    """
    The resident set size of process C{pid}, in KiB (C{VmRSS}).

    @raise ProcessLookupError: the process is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    raise ProcessLookupError(pid)


def allowedCpus(pid: int) -> str:
    """
    The CPUs process C{pid} may run on, as the kernel says (C{Cpus_allowed_list}).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return "?"


def describeMachine() -> dict[str, str]:
    """
    What the report says about the machine the figures come from.
    """
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpus": str(os.cpu_count()),
        "cpuModel": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadAverageAtStart": load,
    }
