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


def checkoutRoot() -> str:
    """
    The directory holding the C{bench} package: the repository checkout.
    """
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkoutEnvironment(root: str | None = None) -> dict[str, str]:
    """
    This process's environment with a checkout (by default this one) first
    on C{PYTHONPATH}, so that a child imports that checkout's C{bench} and
    C{tcpproxy} (and C{twistd} finds its plugin) even when started in
    another directory.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root or checkoutRoot(), env.get("PYTHONPATH")]))
    return env


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


def _cpuTicks(cpus: frozenset[int]) -> tuple[int, int]:
    # (busy, total) clock ticks of these CPUs since boot, from /proc/stat.
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            fields = [int(x) for x in rest.split()]
            idle = fields[3] + fields[4]
            busy += sum(fields[:8]) - idle
            total += sum(fields[:8])
    return busy, total


def _processTicks(pid: int) -> int:
    # utime + stime of a process, in clock ticks; 0 if it is gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _treeTicks(pid: int) -> int:
    # utime + stime of a process and of its live descendants (the workers
    # of tcpproxy --workers N), in clock ticks.
    total = _processTicks(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return total
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(child) for child in f.read().split()]
        except OSError:
            continue
        total += sum(_treeTicks(child) for child in children)
    return total


def processCpuSeconds(pid: int) -> float:
    """
    The CPU time (user and system) a process and its live descendants have
    used so far, in seconds: a proxy with worker processes counts whole.
    """
    return _treeTicks(pid) / os.sysconf("SC_CLK_TCK")


_MIN_TICKS = 50
# Fewer clock ticks than this (half a second of one CPU at 100 Hz) are too
# coarse to tell anything.


class CpuWatch:
    """
    How much of some CPUs went to processes other than ours over a stretch
    of time: on a shared machine, the measure of how disturbed a figure is.

    Pinning keeps our processes apart, but not other people's off our CPUs.
    """

    def __init__(self, cpus: frozenset[int], pids: list[int]) -> None:
        self._cpus = cpus
        self._pids = pids
        self._cpuBefore = _cpuTicks(cpus)
        self._ours = sum(_treeTicks(pid) for pid in pids)

    def othersShare(self) -> float | None:
        """
        The share (0 to 1) of these CPUs' time since construction that was
        busy with anything but our processes, or C{None} if too short to say.
        """
        busy, total = _cpuTicks(self._cpus)
        busy -= self._cpuBefore[0]
        total -= self._cpuBefore[1]
        ours = sum(_treeTicks(pid) for pid in self._pids) - self._ours
        if total < _MIN_TICKS:
            return None
        return min(1.0, max(0.0, (busy - ours) / total))


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
