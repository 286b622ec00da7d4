"""
System test: the local simulation of many nodes (C{examples/cluster/run.py})
as a user runs it: three real C{twistd tcpproxy} nodes, HAProxy in front
checking their C{/ready} and sending PROXY v2, targets from the script's own
DNS server; a node killed under load, a DNS change reaching every node.
Bounded in time.

Where network namespaces can be made (root, and C{ip}: Debian's iproute2,
which C{.ci/run} installs), the nodes each run in a namespace of their own,
made and deleted by the script; elsewhere on loopback addresses.  Only one
of the two runs: the other is skipped, saying which ran and why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import childEnvironment

BOUND = 120
"""
Seconds the whole simulation may take (it takes about 10).
"""
SCRIPT_BOUND = 100
"""
Seconds the script itself gives the namespace variant before it stops it
and deletes the namespaces (before L{BOUND}, which kills the script).
"""


def haproxyMissing() -> None:
    if not (shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")):
        raise SkipTest("HAProxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)")


def whyNoNamespaces() -> str | None:
    """
    Why network namespaces cannot be made here, or None: root, C{ip}, and
    one namespace actually made and deleted (root in a container may lack
    the capability).
    """
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no ip command (Debian: iproute2)"
    probe = f"tcpxprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if made.returncode != 0:
        return f"ip netns add: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def ip(*args: str) -> list[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout.splitlines()


class ClusterTests(TestCase):
    def simulate(self, variant: str) -> tuple[str, list[str]]:
        """
        Run the script; its output, whole and in lines.  Exit status 2 (it
        cannot run here, and says why) skips the loopback variant; for the
        namespace variant, which this test found possible, it is a failure.
        """
        haproxyMissing()
        # The repository's example, next to this test (not an installed copy).
        script = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cluster", "run.py"
        )
        work = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [
                sys.executable,
                script,
                "--dir",
                work,
                "--load-seconds",
                "2",
                "--variant",
                variant,
                "--bound",
                str(SCRIPT_BOUND),
            ],
            env=childEnvironment(),
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
        if done.returncode == 2 and variant == "loopback":
            raise SkipTest(done.stdout.strip())
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, output)
        return output, output.splitlines()

    def assertSimulated(self, output: str, lines: list[str], nodes: tuple[str, str, str]) -> None:
        self.assertIn("   every node found its targets in DNS: a, b", lines)
        self.assertIn(f"== killed node {nodes[1]} (SIGKILL) under load", lines)
        # After the kill, the two other nodes took the clients, and after
        # the DNS change, every node left has the new targets.
        for node in (nodes[0], nodes[2]):
            seen = [line for line in lines if line.startswith(f"   node {node}: targets b, c after")]
            self.assertEqual(len(seen), 1, output)
        self.assertIn("== OK", lines)

    def test_networkNamespaces(self) -> None:
        """
        The nodes in namespaces of their own, on 10.255.0.0/24, behind a
        bridge in the hub namespace; nothing left behind after: no
        namespace, no interface in the host's namespace.
        """
        why = whyNoNamespaces()
        if why is not None:
            raise SkipTest(
                f"network namespaces cannot be made here ({why}): test_loopbackAddresses runs instead"
            )
        links = ip("-o", "link", "show")
        output, lines = self.simulate("netns")
        self.assertTrue(lines[0].startswith("== variant: network namespaces (hub tcpx"), output)
        self.assertSimulated(output, lines, ("10.255.0.11", "10.255.0.12", "10.255.0.13"))
        self.assertTrue(lines[-1].startswith("== namespaces tcpx") and lines[-1].endswith(" deleted"), output)
        # This run's namespaces (named for its pid) are gone; another run on
        # the machine may have its own meanwhile.
        prefix = lines[0].split("(hub ", 1)[1].split("-hub", 1)[0] + "-"
        self.assertEqual([name for name in ip("netns", "list") if name.startswith(prefix)], [])
        self.assertEqual(
            [line.split(":")[1] for line in ip("-o", "link", "show")], [line.split(":")[1] for line in links]
        )

    def test_loopbackAddresses(self) -> None:
        """
        The nodes on loopback addresses 127.0.0.11, .12, .13, where network
        namespaces cannot be made.
        """
        if whyNoNamespaces() is None:
            raise SkipTest(
                "network namespaces can be made here: test_networkNamespaces runs the simulation in them"
            )
        output, lines = self.simulate("loopback")
        self.assertTrue(lines[0].startswith("== variant: loopback addresses"), output)
        self.assertSimulated(output, lines, ("127.0.0.11", "127.0.0.12", "127.0.0.13"))
        self.assertEqual(lines[-1], "== OK", output)
