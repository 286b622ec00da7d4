#!/usr/bin/env python3
"""
A local simulation of tcpproxy at scale, set up and torn down by this one
script (see the README, "Running at scale"):

  - three tcpproxy nodes, each with its admin endpoint (/ready) and
    "AcceptProxy", the same port on each, as three machines would have it;
  - HAProxy in front, health-checking each node's /ready and sending PROXY
    v2, so the nodes see the real clients;
  - the targets, three echo servers, found by every node in DNS: SRV
    records served by this script's own DNS server (twisted.names; no
    other name server is asked).

Two variants, chosen by --variant (default: auto, the first that can be
made here):

  - netns: each node in a network namespace of its own, made by this
    script (ip netns, veth pairs), linked by a bridge in a fourth
    namespace, the hub, that holds HAProxy, the DNS server, the echo
    servers and the clients.  Private addresses (10.255.0.0/24) only
    inside those namespaces, no default route, nothing in the host's own
    namespace; all of it deleted at exit, even on failure.  Needs root and
    ip (Debian: iproute2).
  - loopback: each node on its own loopback address (127.0.0.11, .12,
    .13), HAProxy, DNS and echo servers on 127.0.0.1.

It then runs clients through the front, kills one node under that load and
shows the front moving the clients to the other two; then changes the SRV
records and shows the change reaching every node.  It exits 0 if all of
that happened as it should, 1 if not (the system test runs it).

    python examples/cluster/run.py            # needs haproxy (Debian: apt-get install haproxy)

It stops by itself: the namespace variant is given --bound seconds (90)
before everything is killed and deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.names.server import DNSServerFactory

NODES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
HUB = "127.0.0.1"
"""The address of HAProxy, the DNS server, the echo servers and the clients."""
TRUSTED = "127.0.0.0/8"
"""Where the nodes take PROXY headers from ("AcceptProxy")."""
PREFIX: dict[str, list[str]] = {}
"""The command that runs a node in its namespace, by node address."""

NETNS_HUB = "10.255.0.1"
NETNS_NODES = ("10.255.0.11", "10.255.0.12", "10.255.0.13")
NETNS_NET = "10.255.0.0/24"
SRV = "_echo._tcp.cluster.test"
TWISTD = (
    sys.executable,
    "-c",
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from twisted.scripts.twistd import run; run()",
)


def freePort(address: str = HUB, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Zone(ResolverBase):
    """
    The script's DNS records, changed while it runs.
    """

    def __init__(self) -> None:
        ResolverBase.__init__(self)
        self.records: dict[tuple[bytes, int], list[dns.RRHeader]] = {}

    def setSRV(self, backends: dict[str, int]) -> None:
        self.records[(SRV.encode(), dns.SRV)] = [
            dns.RRHeader(
                SRV.encode(), dns.SRV, ttl=1, payload=dns.Record_SRV(10, 1, port, f"{name}.cluster.test", 1)
            )
            for name, port in backends.items()
        ]
        for name in backends:
            host = f"{name}.cluster.test".encode()
            self.records[(host, dns.A)] = [dns.RRHeader(host, dns.A, ttl=1, payload=dns.Record_A(HUB, 1))]

    def _lookup(self, name, cls, type, timeout):
        found = self.records.get((name, type))
        if found is None:
            return (
                fail(error.DNSNameError(name))
                if not any(k[0] == name for k in self.records)
                else succeed(([], [], []))
            )
        return succeed((list(found), [], []))


class _Name(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(self.factory.name + b"\n")
        self.transport.loseConnection()


def call(f, *args):
    """
    Run C{f(*args)} in the reactor's thread and wait for it.
    """
    done = threading.Event()
    result = []

    def run():
        result.append(f(*args))
        done.set()

    reactor.callFromThread(run)
    done.wait(10)
    return result[0]


def ask(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def waitFor(what: str, predicate, seconds: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            if predicate():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"FAILED: {what} not within {seconds:g} s")


def haproxyPath() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


class Load:
    """
    Clients through the front, one after the other in a few threads; each
    reads the name of the echo server that answered.
    """

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.ok = 0
        self.failed = 0
        self.answers: dict[str, int] = {}
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        while self.running:
            try:
                with socket.create_connection((HUB, self.port), timeout=3) as s:
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = s.recv(100)
                        if not chunk:
                            break
                        data += chunk
                name = data.decode().strip()
                with self.lock:
                    if name:
                        self.ok += 1
                        self.answers[name] = self.answers.get(name, 0) + 1
                    else:
                        self.failed += 1
            except OSError:
                with self.lock:
                    self.failed += 1
            time.sleep(0.01)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.ok, self.failed

    def stop(self) -> None:
        self.running = False
        for t in self.threads:
            t.join(5)


def simulate(options, haproxy: str, work: str) -> int:

    # The DNS server and the three echo servers, on this script's reactor.
    zone = Zone()
    names = {}
    for name in ("a", "b", "c"):
        factory = Factory.forProtocol(_Name)
        factory.name, factory.noisy = name.encode(), False
        names[name] = reactor.listenTCP(0, factory, interface=HUB).getHost().port
    zone.setSRV({"a": names["a"], "b": names["b"]})
    dnsPort = reactor.listenUDP(0, dns.DNSDatagramProtocol(DNSServerFactory(clients=[zone])), interface=HUB)
    dnsAddress = f"{HUB}:{dnsPort.getHost().port}"
    threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
    print(f"== DNS server on {dnsAddress}: {SRV} -> a, b (echo servers on ports {names})")

    if PREFIX:
        # Each node has a namespace of its own, where every port is free.
        appPort, adminPort, front = 7000, 9000, freePort()
    else:
        appPort, adminPort, front = freePort(NODES[0]), freePort(NODES[0]), freePort()
    processes: list[subprocess.Popen] = []
    nodes = []
    try:
        for index, address in enumerate(NODES, 1):
            config = {
                "BindAddress": address,
                "Resolvers": [dnsAddress],
                "Admin": {"Listen": f"{address}:{adminPort}", "Allow": [TRUSTED]},
                "Apps": [
                    {
                        "Name": "echo",
                        "Ports": [appPort],
                        "Targets": [f"srv:{SRV}"],
                        "Refresh": 1,
                        "AcceptProxy": {"From": [TRUSTED], "Required": True},
                    }
                ],
            }
            path = os.path.join(work, f"node{index}.json")
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
            log = os.path.join(work, f"node{index}.log")
            command = [
                *PREFIX.get(address, []),
                *TWISTD,
                "-n",
                "--pidfile=",
                "-l",
                log,
                "tcpproxy",
                "--config",
                path,
            ]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            nodes.append((address, processes[-1], log))
        haproxyConfig = os.path.join(work, "haproxy.cfg")
        with open(haproxyConfig, "w") as f:
            f.write(
                "defaults\n    mode tcp\n    timeout connect 2s\n"
                "    timeout client 10s\n    timeout server 10s\n"
                "    retries 2\n    option redispatch\n"
                f"frontend front\n    bind {HUB}:{front}\n    default_backend nodes\n"
                "backend nodes\n    balance roundrobin\n    option httpchk GET /ready\n"
                "    http-check expect status 200\n"
                + "".join(
                    f"    server node{i} {a}:{appPort} send-proxy-v2"
                    f" check port {adminPort} inter 300 fall 2 rise 1\n"
                    for i, a in enumerate(NODES, 1)
                )
            )
        processes.append(
            subprocess.Popen(
                [haproxy, "-db", "-f", haproxyConfig],
                stdout=open(os.path.join(work, "haproxy.log"), "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        print(f"== three nodes on {', '.join(NODES)} port {appPort} (admin {adminPort})")
        print(f"   HAProxy on {HUB}:{front}: /ready checked on each, PROXY v2 sent")
        for address, _, _ in nodes:
            took = waitFor(
                f"node {address} ready", lambda a=address: ask(f"http://{a}:{adminPort}/ready")[0] == 200, 20
            )
            print(f"   node {address}: /ready 200 after {took:.1f} s")

        def targetsOf(address: str) -> set[str]:
            status = json.loads(ask(f"http://{address}:{adminPort}/status")[1])
            return {t["target"] for t in status["apps"][0]["targets"]}

        wanted = {f"{HUB}:{names['a']}", f"{HUB}:{names['b']}"}
        for address, _, _ in nodes:
            waitFor(f"node {address} finding a and b in DNS", lambda a=address: targetsOf(a) == wanted, 5)
        print("   every node found its targets in DNS: a, b")
        waitFor(
            "HAProxy seeing the three nodes up",
            lambda: "3 active and 0 backup servers online" in open(os.path.join(work, "haproxy.log")).read(),
            10,
        )

        def served(address: str) -> int:
            status = json.loads(ask(f"http://{address}:{adminPort}/status")[1])
            return status["apps"][0]["connections"]["total"]

        load = Load(front)
        time.sleep(options.load_seconds)
        before = {a: served(a) for a, _, _ in nodes}
        ok, failed = load.snapshot()
        print(f"== under load: {ok} clients served, {failed} failed; per node: {before}")
        if min(before.values()) == 0:
            raise SystemExit("FAILED: a node got no clients from the front")

        victim, process, _ = nodes[1]
        process.send_signal(signal.SIGKILL)
        process.wait()
        killedAt = time.monotonic()
        okAtKill, failedAtKill = load.snapshot()
        print(f"== killed node {victim} (SIGKILL) under load")
        time.sleep(options.load_seconds)
        after = {a: served(a) for a, _, _ in nodes if a != victim}
        ok, failed = load.snapshot()
        moved = {a: after[a] - before[a] for a in after}
        print(
            f"   {time.monotonic() - killedAt:.1f} s later: {ok - okAtKill} more clients served, "
            f"{failed - failedAtKill} failed; new clients per remaining node: {moved}"
        )
        if min(moved.values()) == 0 or ok - okAtKill == 0:
            raise SystemExit("FAILED: the front did not move the clients to the other nodes")
        haproxyLog = open(os.path.join(work, "haproxy.log"), errors="replace").read()
        down = [line for line in haproxyLog.splitlines() if "node2 is DOWN" in line]
        if down:
            # The last one: those before are from before the nodes were up.
            print("   HAProxy: " + down[-1].strip())

        print("== DNS change: SRV records now b, c")
        changedAt = time.monotonic()
        call(zone.setSRV, {"b": names["b"], "c": names["c"]})
        wanted = {f"{HUB}:{names['b']}", f"{HUB}:{names['c']}"}
        for address, _, _ in nodes:
            if address == victim:
                continue
            waitFor(f"node {address} seeing b, c", lambda a=address: targetsOf(a) == wanted, 3)
            print(f"   node {address}: targets b, c after {time.monotonic() - changedAt:.1f} s")
        with load.lock:
            load.answers.clear()
        time.sleep(1)
        load.stop()
        print(f"   answers since: {dict(sorted(load.answers.items()))}")
        if "a" in load.answers or "c" not in load.answers:
            raise SystemExit("FAILED: clients still reach a, or none reach c")
        print("== OK")
        return 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        reactor.callFromThread(reactor.stop)


def ip(*args: str) -> subprocess.CompletedProcess:
    """
    Run C{ip args}; raise L{OSError} with its message if it fails.
    """
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


class Namespaces:
    """
    The namespaces of the netns variant: a hub, with a bridge, and a node
    namespace per node, each linked to the bridge by a veth pair made in the
    hub with its peer end created directly in the node's namespace (no
    interface ever appears in the host's own namespace).  Routes: only
    those of the 10.255.0.0/24 subnet on each link; no default route.
    """

    def __init__(self) -> None:
        stem = f"tcpx{os.getpid()}"
        self.hub = f"{stem}-hub"
        self.nodes = [f"{stem}-n{i}" for i in range(1, len(NETNS_NODES) + 1)]
        self.made: list[str] = []

    def make(self) -> None:
        hub = self.hub
        for name in (hub, *self.nodes):
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{NETNS_HUB}/24", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        for index, (name, address) in enumerate(zip(self.nodes, NETNS_NODES, strict=True), 1):
            ip("-n", hub, "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", hub, "link", "set", f"v{index}", "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
        for name in self.made:
            if ip("-n", name, "route", "show", "default").stdout.strip():
                raise OSError(f"namespace {name} has a default route")

    def delete(self) -> None:
        """
        Kill whatever still runs in the namespaces, then delete them (their
        interfaces and bridge go with them).
        """
        for name in reversed(self.made):
            try:
                pids = ip("netns", "pids", name).stdout.split()
            except (OSError, subprocess.TimeoutExpired):
                pids = []
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for name in reversed(self.made):
            try:
                ip("netns", "del", name)
            except (OSError, subprocess.TimeoutExpired) as e:
                print(f"   could not delete namespace {name}: {e}")
        self.made = []


def netnsPossible() -> str | None:
    """
    Why network namespaces cannot be made here, or None if they can.
    """
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no ip command (Debian: apt-get install iproute2)"
    return None


def runInNamespaces(options, work: str) -> int | None:
    """
    Make the namespaces, run this script inside the hub (--inside), delete
    the namespaces whatever happens.  Returns None if the namespaces could
    not be made (the caller falls back to loopback addresses).
    """
    spaces = Namespaces()
    # A SIGTERM (or Ctrl-C) still deletes the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        try:
            spaces.make()
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"   network namespaces cannot be made here: {e}")
            return None
        print(
            f"== variant: network namespaces (hub {spaces.hub} on {NETNS_HUB}, nodes "
            f"{', '.join(spaces.nodes)} on {', '.join(NETNS_NODES)}; no default route)",
            flush=True,
        )
        command = [
            "ip",
            "netns",
            "exec",
            spaces.hub,
            sys.executable,
            os.path.abspath(__file__),
            "--inside",
            ",".join([spaces.hub, *spaces.nodes]),
            "--dir",
            work,
            "--load-seconds",
            str(options.load_seconds),
        ]
        try:
            return subprocess.run(command, timeout=options.bound).returncode
        except subprocess.TimeoutExpired:
            print(f"FAILED: not done within {options.bound:g} s (--bound)")
            return 1
    finally:
        spaces.delete()
        print(f"== namespaces {', '.join([spaces.hub, *spaces.nodes])} deleted", flush=True)


def main() -> int:
    global HUB, NODES, TRUSTED
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", help="where the configurations and logs go (default: a new temporary directory)"
    )
    parser.add_argument(
        "--load-seconds", type=float, default=3.0, help="seconds of load before and after the kill"
    )
    parser.add_argument(
        "--variant",
        choices=("auto", "netns", "loopback"),
        default="auto",
        help="nodes in network namespaces or on loopback addresses (default: netns where possible)",
    )
    parser.add_argument(
        "--bound", type=float, default=90.0, help="seconds the netns variant may run before it is stopped"
    )
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # hub,node1,node2,node3: run in the hub
    options = parser.parse_args()
    haproxy = haproxyPath()
    if haproxy is None:
        print("haproxy is not installed (Debian: apt-get install haproxy)")
        return 2
    work = options.dir or tempfile.mkdtemp(prefix="tcpproxy-cluster-")
    os.makedirs(work, exist_ok=True)
    if options.inside:
        _, *spaces = options.inside.split(",")
        HUB, NODES, TRUSTED = NETNS_HUB, NETNS_NODES, NETNS_NET
        for address, space in zip(NODES, spaces, strict=True):
            PREFIX[address] = ["ip", "netns", "exec", space]
        print(f"== working in {work}", flush=True)
        return simulate(options, haproxy, work)
    if options.variant != "loopback":
        why = netnsPossible()
        if why is None:
            result = runInNamespaces(options, work)
            if result is not None:
                return result
        else:
            print(f"   network namespaces cannot be made here: {why}")
        if options.variant == "netns":
            return 2
    for address in NODES:
        try:
            freePort(address)
        except OSError:
            print(f"cannot bind {address}: this system has no 127.0.0.0/8 on its loopback")
            return 2
    print(f"== variant: loopback addresses (nodes on {', '.join(NODES)})")
    print(f"== working in {work}")
    return simulate(options, haproxy, work)


if __name__ == "__main__":
    sys.exit(main())
